"""``moe_lib.book.plot.data_path_figure``: the MoE data-path diagram every chapter shows (issue 19).

Its bad inputs name ``highlight`` and the accepted parts; each part, highlighted, is drawn differently from
the same part un-highlighted (colours, line widths, font weights of the artists that carry its gid) and
from the muted parts; the banner and the full diagram have their sizes; ``ax`` draws into given axes.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from moe_lib.book.plot import DATA_PATH_PARTS, data_path_figure  # noqa: E402

PARTS = ["router", "aux_loss", "dispatch", "capacity", "experts", "backend", "parallel", "combine"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _look(fig, part):
    """How the artists of ``part`` are drawn: per artist, its kind and colours / width / weight."""
    out = []
    for artist in fig.axes[0].get_children():
        if artist.get_gid() != part:
            continue
        if isinstance(artist, Text):
            out.append(("text", to_hex(artist.get_color()), str(artist.get_fontweight())))
        elif isinstance(artist, Patch):
            fill = to_hex(artist.get_facecolor(), keep_alpha=True) if artist.get_fill() else "none"
            out.append(("patch", fill, to_hex(artist.get_edgecolor(), keep_alpha=True), artist.get_linewidth()))
    return out


def test_parts_are_the_documented_ones():
    assert list(DATA_PATH_PARTS) == PARTS


@pytest.mark.parametrize("small", [False, True])
@pytest.mark.parametrize("part", PARTS)
def test_a_highlighted_part_is_drawn_differently(part, small):
    plain = _look(data_path_figure(small=small), part)
    on = _look(data_path_figure(part, small=small), part)
    other = next(p for p in PARTS if p != part)
    off = _look(data_path_figure(other, small=small), part)
    assert plain, f"no artist carries the gid {part!r}"
    assert len(on) == len(plain) == len(off)
    assert on != plain and on != off and off != plain
    for a, b in zip(on, off):  # every artist of the part changes, not just one of them
        assert a != b, (part, a, b)
    weights = {look[2] for look in on if look[0] == "text"}
    if weights:
        assert weights == {"bold"}, (part, on)
    assert {look[2] for look in off if look[0] == "text"} <= {"normal"}


def test_string_and_iterable_highlight_agree():
    a = data_path_figure("router", small=True)
    b = data_path_figure(["router"], small=True)
    c = data_path_figure(("router", "router"), small=True)
    for part in PARTS:
        assert _look(a, part) == _look(b, part) == _look(c, part)
    both = data_path_figure({"router", "capacity"})
    assert all(look[2] == "bold" for p in ("router", "capacity") for look in _look(both, p) if look[0] == "text")
    assert all(look[2] == "normal" for look in _look(both, "experts") if look[0] == "text")


@pytest.mark.parametrize(
    "highlight",
    ["routers", ["router", "gates"], 3, None, [1], ["router", None], b"router"],
)
def test_bad_highlight_names_the_argument_and_accepted_values(highlight):
    with pytest.raises(ValueError) as info:
        data_path_figure(highlight)
    message = str(info.value)
    assert "highlight" in message
    for part in PARTS:
        assert repr(part) in message


def test_unknown_name_is_quoted_in_the_message():
    with pytest.raises(ValueError, match="'gates'"):
        data_path_figure(["router", "gates"])


def test_sizes_small_and_full():
    small = data_path_figure(small=True).get_size_inches()
    full = data_path_figure().get_size_inches()
    assert 6.5 <= small[0] <= 7.5 and 1.0 <= small[1] <= 1.6, small
    assert 7.5 <= full[0] <= 8.5 and 3.0 <= full[1] <= 4.0, full
    # the banner has fewer annotations: shorter texts in all
    chars = [sum(len(t.get_text()) for t in fig.axes[0].texts)
             for fig in (data_path_figure(small=True), data_path_figure())]
    assert chars[0] < chars[1] / 2


def test_draws_into_given_axes_and_returns_its_figure():
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
    assert data_path_figure("experts", small=True, ax=right) is fig
    assert not left.texts and right.texts
    assert len(fig.axes) == 2
    fig.canvas.draw()  # renders without error


def test_new_figure_is_left_open_and_renders():
    fig = data_path_figure(["parallel", "backend"])
    assert plt.fignum_exists(fig.number)
    fig.canvas.draw()


class _FakeShell:
    """What ``_ipython_display_`` uses of an IPython kernel shell."""

    def __init__(self):
        self.parent_header = {"header": {"msg_id": "request-1"}}
        self.execution_count = 1
        self.display_formatter = self
        self.hidden_while_formatting = []

    def format(self, obj):
        from IPython.utils.dir2 import get_real_method

        self.hidden_while_formatting.append(get_real_method(obj, "_ipython_display_") is None)
        return {"text/plain": repr(obj)}, {}


def test_a_notebook_shows_the_figure_once_per_executed_cell(monkeypatch):
    """``data_path_figure(...);`` shows once even where the kernel ignores the ``;`` (nbval runs cells with
    store_history=False): the inline backend's display and the returned value's are one display."""
    import pickle

    import IPython
    import IPython.display

    shell, published = _FakeShell(), []
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    monkeypatch.setattr(IPython.display, "publish_display_data",
                        lambda data, metadata=None: published.append(data))
    fig = data_path_figure("router", small=True)
    fig._ipython_display_()  # the returned value, where ';' is ignored
    fig._ipython_display_()  # the inline backend at the end of the same cell
    assert len(published) == 1 and shell.hidden_while_formatting == [True]
    shell.parent_header = {"header": {"msg_id": "request-2"}}  # a later cell shows it again
    fig._ipython_display_()
    assert len(published) == 2
    assert "_ipython_display_" not in fig.__dict__  # the method is back after formatting
    assert type(pickle.loads(pickle.dumps(fig))) is type(fig)


def test_outside_ipython_displaying_does_nothing(monkeypatch):
    import IPython

    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    data_path_figure()._ipython_display_()
