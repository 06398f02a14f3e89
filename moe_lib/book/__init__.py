"""What the book's chapters use to teach — not part of the MoE data path.

The layer and everything it runs (router, dispatch, backends, experts, combine) live in the top-level
modules of :mod:`moe_lib`; this subpackage holds what the chapters build around them:

* :mod:`moe_lib.book.data` — the data sets of Part I (the 1991 vowels, the arm's inverse dynamics, the
  clustered and piecewise regressions);
* :mod:`moe_lib.book.tasks` — the multi-domain task and model of Part II (chapters 5–7, 16);
* :mod:`moe_lib.book.corpus` — the offline byte corpus of Part III (the Python standard library);
* :mod:`moe_lib.book.plot` — the book's figure style, the data-path diagram and the chapters' plots;
* :mod:`moe_lib.book.grouping` — chapter 11's cost models (padding, tiles, FLOPs, memory traffic);
* :mod:`moe_lib.book.serving`, :mod:`moe_lib.book.business` — decode cost, expert caches, the cost
  calculator (chapters 13, 14 and 18);
* :mod:`moe_lib.book.full_scale` — the full-scale experiment records (``python -m moe_lib.book.full_scale``);
* :mod:`moe_lib.book.reproducibility` — the reproducibility contract and the ``moe-book`` Jupyter kernel
  (``python -m moe_lib.book.reproducibility``).

Nothing is imported here: each module loads when it is imported (``from moe_lib.book import tasks``).
"""
