"""Sphinx extension of the book: launch buttons only when the repository URL is set.

``_config.yml`` names the launch providers (``launch_buttons``: Binder and Colab) once, and
``repository.url`` is the one switch: while it is empty (as in this repository), this extension removes the
providers before any page is written, so no page has a launch button and nothing links outside (the
sphinx-book-theme would otherwise fail on a provider without a repository). With ``repository.url`` set to
a GitHub repository, every chapter (every notebook page) gets a "launch" menu whose entries are plain
links to Binder and Colab for that repository's ``repository.branch``.

Loaded through ``sphinx.local_extensions`` (which puts ``scripts/`` on the path) and listed in
``sphinx.config.extensions`` of ``_config.yml``.
"""
from __future__ import annotations

PROVIDER_KEYS = ("binderhub_url", "jupyterhub_url", "colab_url", "deepnote_url", "jupyterlite_url", "thebe")


def _switch_launch_buttons(app, config) -> None:
    options = config.html_theme_options
    launch = options.get("launch_buttons") or {}
    if not str(options.get("repository_url") or "").strip():
        options["launch_buttons"] = {k: v for k, v in launch.items() if k not in PROVIDER_KEYS}


def setup(app):
    app.connect("config-inited", _switch_launch_buttons)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
