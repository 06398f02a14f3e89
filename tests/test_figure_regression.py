"""The figure regression test (moe_lib.book.plot.figure_data): it must change when a plotted result changes
and must not change when only the rendering does (fonts, sizes, antialiasing, layout, resolution).

Strict nbval compares the text that figure_data gives for every figure of a chapter (the notebook's
outputs carry it under moe_lib.book.plot.FIGURE_DATA_MIME); these tests pin what that text is sensitive to.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from moe_lib.book.plot import (  # noqa: E402
    FIGURE_DATA_MIME,
    SIGNIFICANT_DIGITS,
    book_style,
    figure_data,
    install_figure_data_formatter,
    mean_band,
    not_compared,
    plot_permutation,
    plot_row_layouts,
)

KINDS = ["line", "scatter", "bar", "barh", "errorbar", "fill_between", "image", "pcolormesh", "band", "text",
         "hist", "step", "categorical bar", "permutation", "row layouts"]


def _values(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return np.linspace(0.5, 3.0, n), 1.0 + rng.random(n)


def draw(kind: str, scale: float = 1.0, index: int = 3, label: str = "series") -> plt.Figure:
    """A figure of ``kind`` whose ``index``-th plotted value is multiplied by ``scale``."""
    x, y = _values()
    y = y.copy()
    y[index] *= scale
    fig, ax = plt.subplots()
    if kind == "line":
        ax.plot(x, y, "-o", label=label)
    elif kind == "scatter":
        ax.scatter(x, y, c=x, label=label)
    elif kind == "bar":
        ax.bar(x, y, width=0.1, label=label)
    elif kind == "barh":
        ax.barh(x, y, height=0.1, label=label)
    elif kind == "errorbar":
        err = np.full_like(y, 0.1)
        err[index] *= scale
        ax.errorbar(x, np.ones_like(y), yerr=[err, err], fmt="o", capsize=2, label=label)
    elif kind == "fill_between":
        ax.fill_between(x, 0.0, y, alpha=0.3, label=label)
    elif kind == "image":
        ax.imshow(y.reshape(3, 4))
    elif kind == "pcolormesh":
        ax.pcolormesh(y.reshape(3, 4))
    elif kind == "band":
        curves = np.stack([y, y + 0.1, y - 0.05])
        mean_band(ax, x, curves, label=label)
    elif kind == "text":
        ax.plot(x, np.ones_like(x))
        ax.annotate(f"{label}", (x[index] * scale, 1.0), xytext=(5, 5), textcoords="offset points")
    elif kind == "hist":
        ax.hist(y, bins=4, range=(1.0, 2.0 * max(scale, 1.0)), label=label)
    elif kind == "step":
        ax.step(x, y, where="mid", label=label)
    elif kind == "categorical bar":
        ax.bar(["a", "b", "c", "d"], y[:4] if index < 4 else y[-4:], label=label)
    elif kind == "permutation":
        ids = [[0, 1], [2, 0], [1, 3], [3, 2]]
        if scale != 1.0:
            ids[1] = [2, 1]  # one token routed elsewhere
        plt.close(fig)
        fig, ax = plt.subplots()
        plot_permutation(ids, 4, ax=ax)
    elif kind == "row layouts":
        counts = [5, 9, 2, 7]
        if scale != 1.0:
            counts[1] += 1
        plot_row_layouts(counts, block_m=4, ax=ax, title=label)
    else:  # pragma: no cover
        raise ValueError(kind)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title("a figure")
    if ax.get_legend_handles_labels()[1]:
        ax.legend()
    return fig


def data_of(kind: str, **kwargs) -> str:
    fig = draw(kind, **kwargs)
    try:
        return figure_data(fig)
    finally:
        plt.close(fig)


RENDERINGS = {
    "serif, 14 pt": {"font.family": "serif", "font.size": 14},
    "monospace, 6 pt, bold": {"font.family": "monospace", "font.size": 6, "font.weight": "bold"},
    "no antialiasing": {"lines.antialiased": False, "patch.antialiased": False, "text.antialiased": False},
    "other dpi and size": {"figure.dpi": 200, "figure.figsize": (3.0, 2.0)},
    "large ticks and labels": {"xtick.labelsize": 20, "ytick.labelsize": 20, "axes.labelsize": 18,
                               "axes.titlesize": 22, "legend.fontsize": 16},
}


@pytest.fixture(autouse=True)
def _book_style():
    with matplotlib.rc_context():
        book_style()
        yield
    plt.close("all")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rendering", sorted(RENDERINGS))
def test_rendering_leaves_figure_data_unchanged(kind, rendering):
    """Fonts, font sizes, antialiasing, resolution and layout change the pixels, not figure_data."""
    reference = data_of(kind)
    with matplotlib.rc_context(RENDERINGS[rendering]):
        fig = draw(kind)
        try:
            before_drawing = figure_data(fig)
            fig.tight_layout()
            fig.canvas.draw()  # layout, ticks and text extents now computed under the other fonts
            after_drawing = figure_data(fig)
        finally:
            plt.close(fig)
    assert before_drawing == reference
    assert after_drawing == reference


def test_rendering_changes_the_pixels():
    """The renderings above really are different pictures (else the test before would prove nothing)."""
    def pixels(rc):
        with matplotlib.rc_context(rc):
            fig = draw("line")
            fig.canvas.draw()
            img = np.asarray(fig.canvas.buffer_rgba()).copy()
            plt.close(fig)
        return img

    reference = pixels({})
    for name, rc in RENDERINGS.items():
        img = pixels(rc)
        assert img.shape != reference.shape or not np.array_equal(img, reference), name


@pytest.mark.parametrize("kind", KINDS)
def test_a_plotted_value_changed_by_a_thousandth_changes_figure_data(kind):
    """One plotted number 1e-3 larger (relative): figure_data differs (SIGNIFICANT_DIGITS = 4 resolve it)."""
    assert data_of(kind, scale=1.001) != data_of(kind)


@pytest.mark.parametrize("index", range(12))
def test_every_point_of_a_line_is_compared(index):
    assert data_of("line", scale=1.001, index=index) != data_of("line")


def test_changes_below_the_significant_digits_are_not_compared():
    assert SIGNIFICANT_DIGITS == 4
    assert data_of("line", scale=1 + 1e-9) == data_of("line")


@pytest.mark.parametrize("kind", ["line", "scatter", "bar", "band"])
def test_a_changed_label_changes_figure_data(kind):
    assert data_of(kind, label="another") != data_of(kind)


def test_axis_labels_titles_scales_limits_and_fixed_ticks_are_compared():
    def with_(edit):
        fig = draw("line")
        edit(fig.axes[0])
        try:
            return figure_data(fig)
        finally:
            plt.close(fig)

    reference = with_(lambda ax: None)
    for edit in (lambda ax: ax.set_xlabel("other"), lambda ax: ax.set_title("other"),
                 lambda ax: ax.set_yscale("log"), lambda ax: ax.set_ylim(0, 4),
                 lambda ax: ax.set_xticks([1, 2], ["one", "two"]), lambda ax: ax.axhline(1.5)):
        assert with_(edit) != reference


def test_colours_are_compared():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], color="C0")
    a = figure_data(fig)
    ax.lines[0].set_color("C1")
    assert figure_data(fig) != a


def test_not_compared_exempts_a_figure_or_one_axes():
    fig, axes = plt.subplots(1, 2)
    axes[0].plot([0, 1], [0, 1])
    axes[1].plot([0, 1], [2, 3])
    full = figure_data(fig)
    not_compared(axes[1], "timings")
    partly = figure_data(fig)
    assert "axes 1: not compared: timings" in partly and partly != full
    axes[1].lines[0].set_ydata([5, 6])  # a timing that changed: not seen
    assert figure_data(fig) == partly
    axes[0].lines[0].set_ydata([0, 2])  # the compared axes still is
    assert figure_data(fig) != partly
    assert figure_data(not_compared(fig, "timings")) == "figure data not compared: timings"


def test_the_notebook_display_carries_figure_data():
    """book_style() installs the formatter: IPython's display of a figure has FIGURE_DATA_MIME (text)."""
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        assert install_figure_data_formatter(shell)
        assert install_figure_data_formatter(shell)  # idempotent
        fig = draw("line")
        data, _ = shell.display_formatter.format(fig)
        assert data[FIGURE_DATA_MIME] == figure_data(fig)
        assert "image/png" in data or "text/plain" in data
    finally:
        InteractiveShell.clear_instance()


def test_book_style_outside_ipython_is_harmless():
    book_style()  # no shell: nothing installed, nothing raised
    assert not install_figure_data_formatter()
