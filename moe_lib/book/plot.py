"""One figure style for the whole book (moderate size, readable on the web page, small PNGs), and the
figures' regression test: :func:`figure_data` (what a figure plots, as text that fonts do not change).

nbval compares every text output of a chapter with the stored one but skips images. :func:`book_style`
therefore also teaches the notebook's IPython to display each matplotlib figure with a second
representation besides the PNG: :data:`FIGURE_DATA_MIME`, the text of :func:`figure_data` (the plotted
data rounded to :data:`SIGNIFICANT_DIGITS` significant digits and hashed, the labels, titles and legend
entries). The stored notebooks carry it, strict nbval compares it like any text output, and the book's
HTML never shows it (myst-nb renders only the mime types it knows, and ``_config.yml`` drops this one
explicitly). Nothing of it depends on how the figure is rendered: no font, antialiasing, tick placement
or layout enters it. A figure of timings is exempted with :func:`not_compared` (or its cell is tagged
``nbval-ignore-output``).
"""
from __future__ import annotations

import hashlib

#: Colours for experts 0..9, consistent across every chapter.
EXPERT_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3",
                 "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]


def book_style() -> None:
    """Apply the book's matplotlib style, and show table cells whole (call once at the top of a notebook).

    pandas cuts text cells at 50 characters by default, which hides the "what differs" column of the
    book's comparison tables; the book shows them in full.
    """
    import matplotlib as mpl

    try:
        import pandas as pd
    except ImportError:  # pandas is a book dependency, not a library one
        pass
    else:
        pd.set_option("display.max_colwidth", None)

    mpl.rcParams.update({
        "figure.figsize": (7.0, 3.6),
        "figure.dpi": 90,
        "savefig.dpi": 90,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "font.size": 10,
        "legend.frameon": False,
        "axes.prop_cycle": mpl.cycler(color=EXPERT_COLORS),
    })
    install_figure_data_formatter()


#: The mime type of a figure's plotted data in a notebook's outputs (compared by nbval, never rendered).
FIGURE_DATA_MIME = "text/x-moe-book-figure-data"
#: Every plotted number enters :func:`figure_data` rounded to this many significant digits.
SIGNIFICANT_DIGITS = 4
_NOT_COMPARED = "_moe_book_not_compared"


def not_compared(artist, reason: str = "timings"):
    """Exempt a figure, or one of its axes, from the figure regression test (:func:`figure_data` then
    gives only ``reason``): for plots of timings or of anything else that differs from run to run, in a
    cell whose printed output is compared. Returns ``artist``."""
    setattr(artist, _NOT_COMPARED, str(reason))
    return artist


def _numbers(values) -> list[str]:
    """``values`` as strings of SIGNIFICANT_DIGITS significant digits (NaN for masked entries)."""
    import numpy as np

    a = np.ma.filled(np.ma.asarray(values, dtype=float), np.nan).ravel() + 0.0  # -0.0 -> 0.0
    return [f"{v:.{SIGNIFICANT_DIGITS - 1}e}" for v in a.tolist()]


def _g(v) -> str:
    return f"{float(v):.{SIGNIFICANT_DIGITS}g}"


def _digest(*parts) -> str:
    """A short hash of numbers (rounded) and strings, in order."""
    import numpy as np

    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, str):
            h.update(b"s" + part.encode())
        elif part is None:
            h.update(b"n")
        else:
            a = np.ma.asarray(part)
            h.update(f"a{a.shape}".encode())
            h.update(",".join(_numbers(a)).encode())
        h.update(b"|")
    return h.hexdigest()[:12]


def _span(values) -> str:
    import numpy as np

    a = np.ma.filled(np.ma.asarray(values, dtype=float), np.nan).ravel()
    a = a[np.isfinite(a)]
    return "-" if a.size == 0 else f"{_g(a.min())}..{_g(a.max())}"


def _color(c) -> str:
    from matplotlib.colors import to_hex

    try:
        return to_hex(c, keep_alpha=True)
    except (ValueError, TypeError):
        return "none"


def _colors(cs) -> list[str]:
    import numpy as np

    cs = np.asarray(cs)
    if cs.ndim == 2:
        return [_color(c) for c in cs]
    return [_color(cs)] if cs.size else []


def _label(artist) -> str:
    label = artist.get_label()
    return "" if not label or str(label).startswith("_") else f" {str(label)!r}"


def _line(line) -> str:
    xy = line.get_xydata()
    return (f"line{_label(line)}: {len(xy)} points, x {_span(xy[:, 0])}, y {_span(xy[:, 1])}, "
            f"#{_digest(xy, _color(line.get_color()))}")


def _collection(c) -> str:
    from matplotlib.collections import LineCollection, PathCollection, QuadMesh

    kind = type(c).__name__
    c.update_scalarmappable()  # colours of colour-mapped data, as drawing would set them
    array = c.get_array()
    colors = ",".join(_colors(c.get_facecolor()) + _colors(c.get_edgecolor()))
    if isinstance(c, PathCollection):  # scatter: marker paths are in points, the data are the offsets
        off = c.get_offsets()
        return (f"{kind}{_label(c)}: {len(off)} points, x {_span(off[:, 0])}, y {_span(off[:, 1])}, "
                f"#{_digest(off, c.get_sizes(), array, colors)}")
    if isinstance(c, QuadMesh):
        return f"{kind}{_label(c)}: array {None if array is None else array.shape}, #{_digest(c.get_coordinates(), array, colors)}"
    if isinstance(c, LineCollection):
        segs = c.get_segments()
        return f"{kind}{_label(c)}: {len(segs)} segments, #{_digest(*segs, array, colors)}"
    paths = [p.vertices for p in c.get_paths()]
    return (f"{kind}{_label(c)}: {len(paths)} paths, {sum(len(v) for v in paths)} vertices, "
            f"#{_digest(*paths, c.get_offsets(), array, colors)}")


def _patch(p) -> str:
    from matplotlib import patches as P

    kind = type(p).__name__
    fc = _color(p.get_facecolor()) if p.get_fill() else "none"
    ec = _color(p.get_edgecolor())
    if isinstance(p, P.Rectangle):
        return f"{kind}{_label(p)}: #{_digest([p.get_x(), p.get_y(), p.get_width(), p.get_height(), p.get_angle()], fc, ec)}"
    if isinstance(p, P.Wedge):
        return f"{kind}{_label(p)}: #{_digest([*p.center, p.r, p.theta1, p.theta2, p.width or 0], fc, ec)}"
    if isinstance(p, P.Ellipse):
        return f"{kind}{_label(p)}: #{_digest([*p.get_center(), p.get_width(), p.get_height(), p.get_angle()], fc, ec)}"
    if isinstance(p, P.Polygon):
        return f"{kind}{_label(p)}: {len(p.get_xy())} vertices, #{_digest(p.get_xy(), fc, ec)}"
    if isinstance(p, P.PathPatch):
        return f"{kind}{_label(p)}: #{_digest(p.get_path().vertices, fc, ec)}"
    if isinstance(p, P.FancyArrowPatch):  # its drawn path depends on the display: record its ends
        ends = getattr(p, "_posA_posB", None)
        return f"{kind}{_label(p)}: #{_digest(None if ends is None else list(ends), fc, ec)}"
    return f"{kind}{_label(p)}"  # other patches: drawn in display units, not compared


def _text(t) -> str:
    from matplotlib.text import Annotation

    if not t.get_text():
        return ""
    if isinstance(t, Annotation):
        return f"annotation {t.get_text()!r} at ({', '.join(map(_g, t.xy))}), text at ({', '.join(map(_g, t.get_position()))})"
    return f"text {t.get_text()!r} at ({', '.join(map(_g, t.get_position()))})"


def _axis(ax, name: str) -> list[str]:
    from matplotlib.category import StrCategoryFormatter
    from matplotlib.ticker import FixedFormatter, FixedLocator

    axis = getattr(ax, f"{name}axis")
    out = [f"{name} {axis.get_label_text()!r} ({axis.get_scale()})"]
    if not getattr(ax, f"get_autoscale{name}_on")() and not (ax.get_aspect() != "auto" and ax.get_adjustable() == "datalim"):
        out.append(f"{name}lim {', '.join(map(_g, getattr(ax, f'get_{name}lim')()))}")  # set by the code
    locator, formatter = axis.get_major_locator(), axis.get_major_formatter()
    if isinstance(locator, FixedLocator):
        out.append(f"{name}ticks {', '.join(map(_g, locator.locs))}")
    if isinstance(formatter, FixedFormatter):
        out.append(f"{name}ticklabels {list(formatter.seq)!r}")
    elif isinstance(formatter, StrCategoryFormatter):
        out.append(f"{name} categories {list(formatter._units)!r}")
    return out


def _legend(legend, indent: str) -> list[str]:
    if legend is None:
        return []
    return [f"{indent}legend {[t.get_text() for t in legend.get_texts()]!r}"]


def figure_data(fig) -> str:
    """What ``fig`` plots, as text that changes when a plotted result changes and never with the rendering.

    Per axes: the title, axis labels and scales, the limits, ticks and tick labels the code set
    (autoscaled ones follow from the data; automatic ticks depend on the font size and are left out),
    the legend entries; per artist (lines, scatter points, bars and other patches, collections such as
    error bars and bands, images, texts): its kind, label and a hash of its data rounded to
    :data:`SIGNIFICANT_DIGITS` significant digits and of its colours, with the data's range for lines
    and points. Figures and axes marked by :func:`not_compared` give only that mark.
    """
    if getattr(fig, _NOT_COMPARED, None) is not None:
        return f"figure data not compared: {getattr(fig, _NOT_COMPARED)}"
    lines = [f"figure data ({SIGNIFICANT_DIGITS} significant digits), {len(fig.axes)} axes"]
    lines += [f"figure {s}" for s in map(_text, fig.texts) if s]  # suptitle and figure texts
    for legend in fig.legends:
        lines += _legend(legend, "figure ")
    for i, ax in enumerate(fig.axes):
        if getattr(ax, _NOT_COMPARED, None) is not None:
            lines.append(f"axes {i}: not compared: {getattr(ax, _NOT_COMPARED)}")
            continue
        titles = [t for t in (ax.get_title(loc) for loc in ("left", "center", "right")) if t]
        lines.append(f"axes {i}: title {' / '.join(titles)!r}; " + "; ".join(_axis(ax, "x") + _axis(ax, "y")))
        own = {id(a) for group in (ax.lines, ax.collections, ax.patches, ax.images, ax.texts) for a in group}
        for artist in ax.get_children():  # in drawing order; spines, axis, title, legend are not data
            if id(artist) not in own or not artist.get_visible():
                continue
            row = _artist(artist)
            if row:
                lines.append(f"  {row}")
        lines += _legend(ax.get_legend(), "  ")
    return "\n".join(lines) + "\n"


def _artist(artist) -> str:
    from matplotlib.collections import Collection
    from matplotlib.image import AxesImage
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.text import Text

    if isinstance(artist, Line2D):
        return _line(artist)
    if isinstance(artist, Collection):
        return _collection(artist)
    if isinstance(artist, Patch):
        return _patch(artist)
    if isinstance(artist, AxesImage):
        a = artist.get_array()
        clim = artist.get_clim()
        return (f"image {tuple(a.shape)}, values {_span(a)}, cmap {artist.get_cmap().name}, "
                f"#{_digest(a, list(artist.get_extent()), [c if c is not None else float('nan') for c in clim])}")
    if isinstance(artist, Text):
        return _text(artist)
    return ""


def _figure_data_or_error(fig) -> str:
    try:
        return figure_data(fig)
    except Exception as exc:  # a display hook must not break a chapter; the message is compared instead
        return f"figure data failed: {type(exc).__name__}: {exc}\n"


def install_figure_data_formatter(shell=None) -> bool:
    """Make IPython display every matplotlib figure with :data:`FIGURE_DATA_MIME` besides its PNG (called
    by :func:`book_style`; a no-op outside IPython). Returns whether a shell was found."""
    try:
        from IPython import get_ipython
        from IPython.core.formatters import BaseFormatter
        from traitlets import ObjectName, Unicode
    except ImportError:
        return False
    shell = shell or get_ipython()
    if shell is None:
        return False
    formatters = shell.display_formatter.formatters
    if FIGURE_DATA_MIME not in formatters:

        class FigureDataFormatter(BaseFormatter):
            format_type = Unicode(FIGURE_DATA_MIME)
            print_method = ObjectName("_repr_moe_book_figure_data_")

        formatters[FIGURE_DATA_MIME] = FigureDataFormatter(parent=shell.display_formatter)
    # The formatter finds the representation as a method of the figure (its print_method), not in its type
    # registry: matplotlib's inline backend clears every formatter's entry for Figure when it activates.
    from matplotlib.figure import Figure

    Figure._repr_moe_book_figure_data_ = _figure_data_or_error
    return True


def mean_band(ax, x, curves, label: str | None = None, color=None, alpha: float = 0.2, **kwargs):
    """Plot the mean of ``curves`` (``[n_seeds, len(x)]``) as a line and its 95 % t-interval as a band
    (:func:`moe_lib.stats.summarize_curves`); the label gets ``(n=…)``. Returns the line."""
    from ..stats import summarize_curves

    mean, half = summarize_curves(curves)
    n = len(curves)
    (line,) = ax.plot(x, mean, label=None if label is None else f"{label} (n={n})", color=color, **kwargs)
    ax.fill_between(x, mean - half, mean + half, color=line.get_color(), alpha=alpha, linewidth=0)
    return line


def expert_color(e: int) -> str:
    return EXPERT_COLORS[e % len(EXPERT_COLORS)]


def plot_permutation(experts, num_experts: int, ax=None):
    """Chapter 11: the permutation that groups a routing's assignments by expert.

    Left, the tokens and their ``k`` choices; right, the ``T·k`` assignments as expert-grouped rows, by a
    stable sort of the assignment order ``t·k + j`` by expert (the order of
    ``moe_lib.kernels.permute_metadata``; :func:`moe_lib.dispatch.make_plan` holds the same rows per expert,
    ordered by choice first); a line joins each assignment to its row. ``experts`` is ``[T, k]`` (tensor or
    nested lists). Returns the axes.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    ids = np.asarray(experts.tolist() if hasattr(experts, "tolist") else experts, dtype=int)
    num_tokens, top_k = ids.shape
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")  # row r holds assignment order[r]
    row_of = np.empty_like(order)
    row_of[order] = np.arange(flat.size)
    if ax is None:
        _, ax = plt.subplots(figsize=(6.0, 0.28 * flat.size + 0.8))
    n = flat.size

    def y(i):  # top to bottom
        return n - 1 - i

    for a in range(n):
        t, j = divmod(a, top_k)
        yt = y(t * top_k) - (top_k - 1) / 2  # the token's k choices side by side, centred on its rows
        x0 = 0.34 * j
        ax.add_patch(Rectangle((x0, yt - 0.4), 0.3, 0.8, color=expert_color(flat[a])))
        ax.add_patch(Rectangle((2.0, y(row_of[a]) - 0.4), 0.6, 0.8, color=expert_color(flat[a])))
        ax.plot([0.34 * (top_k - 1) + 0.32, 2.0], [yt + 0.25 * (j - (top_k - 1) / 2), y(row_of[a])],
                color="0.55", lw=0.7)
        ax.text(x0 + 0.15, yt, str(flat[a]), ha="center", va="center", fontsize=7, color="white")
        ax.text(2.3, y(row_of[a]), f"t{t}", ha="center", va="center", fontsize=7, color="white")
    for t in range(num_tokens):
        ax.text(-0.08, y(t * top_k) - (top_k - 1) / 2, f"token {t}", ha="right", va="center", fontsize=7)
    start = 0
    for e in range(num_experts):
        count = int((flat == e).sum())
        if count:
            ax.text(2.7, y(start) - (count - 1) / 2, f"expert {e}: rows {start}–{start + count - 1}",
                    va="center", fontsize=7)
        start += count
    ax.text(0.34 * top_k / 2, n + 0.3, "tokens and their\nk experts", ha="center", va="bottom", fontsize=8)
    ax.text(2.3, n + 0.3, "grouped rows\n(expert order)", ha="center", va="bottom", fontsize=8)
    ax.set_xlim(-0.9, 4.1)
    ax.set_ylim(-0.8, n + 1.6)
    ax.axis("off")
    return ax


def plot_row_layouts(counts, block_m: int, ax=None, title: str | None = None, width: float | None = None):
    """Chapter 11: the rows each grouping multiplies, for per-expert row counts ``counts``.

    Three lanes, one rectangle per expert (its colour) along an axis of multiplied rows: the padded
    ``[E, C, d]`` batch of the ``torch`` backend (``E`` blocks of ``C = max n_e`` rows, padding hatched
    grey), the grouped rows of ``torch._grouped_mm`` (``N = Σ n_e`` rows, nothing wasted) and the
    ``block_m``-row tiles of a grouped-GEMM kernel (one outlined box per tile, masked rows hatched).
    ``width`` fixes the x range so that several calls share a scale. Returns the axes.
    """
    import math

    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    c = [int(v) for v in (counts.tolist() if hasattr(counts, "tolist") else counts)]
    if ax is None:
        _, ax = plt.subplots(figsize=(7.0, 1.9))
    cap = max(c)
    pad_kw = dict(facecolor="0.92", edgecolor="0.6", hatch="////", lw=0.0)
    lanes = {2: "padded batch (bmm)", 1: "grouped rows", 0: f"tiles, BLOCK_M = {block_m}"}
    start = 0
    tile_x = 0
    for e, n in enumerate(c):
        color = expert_color(e)
        ax.add_patch(Rectangle((e * cap, 1.65), n, 0.7, color=color, lw=0))
        if cap > n:
            ax.add_patch(Rectangle((e * cap + n, 1.65), cap - n, 0.7, **pad_kw))
        ax.add_patch(Rectangle((start, 0.65), n, 0.7, color=color, lw=0))
        for i in range(math.ceil(n / block_m)):
            real = min(block_m, n - i * block_m)
            ax.add_patch(Rectangle((tile_x, -0.35), real, 0.7, color=color, lw=0))
            if real < block_m:
                ax.add_patch(Rectangle((tile_x + real, -0.35), block_m - real, 0.7, **pad_kw))
            ax.add_patch(Rectangle((tile_x, -0.35), block_m, 0.7, fill=False, edgecolor="white", lw=0.6))
            tile_x += block_m
        start += n
    total = len(c) * cap
    ax.set_xlim(0, (width or max(total, tile_x)) * 1.01)
    ax.set_ylim(-0.6, 2.6)
    ax.set_yticks(list(lanes), list(lanes.values()))
    ax.grid(False)
    ax.set_xlabel("rows multiplied")
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_tile_schedule(tile_expert, tile_row, offsets, block_m: int, ax=None):
    """Chapter 11: the tile schedule a grouped-GEMM kernel launches (``moe_lib.kernels.Metadata``).

    One column per tile slot (one program of the GEMM grid): its ``block_m`` rows coloured by the
    expert the tile belongs to, rows past that expert's end (masked: loaded as zeros, never stored)
    hatched, and unused slots (``tile_expert = -1``: the program exits at once) drawn as empty dashed
    boxes. Each used tile is labelled with its first grouped row. Returns the axes.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    te = [int(v) for v in (tile_expert.tolist() if hasattr(tile_expert, "tolist") else tile_expert)]
    tr = [int(v) for v in (tile_row.tolist() if hasattr(tile_row, "tolist") else tile_row)]
    off = [int(v) for v in (offsets.tolist() if hasattr(offsets, "tolist") else offsets)]
    if ax is None:
        _, ax = plt.subplots(figsize=(7.0, 2.6))
    pad_kw = dict(facecolor="0.92", edgecolor="0.6", hatch="////", lw=0.0)
    for slot, (e, r0) in enumerate(zip(te, tr)):
        if e < 0:
            ax.add_patch(Rectangle((slot + 0.1, 0), 0.8, block_m, fill=False, ls="--", edgecolor="0.6", lw=0.8))
            continue
        real = max(0, min(block_m, off[e + 1] - r0))
        ax.add_patch(Rectangle((slot + 0.1, block_m - real), 0.8, real, color=expert_color(e), lw=0))
        if real < block_m:
            ax.add_patch(Rectangle((slot + 0.1, 0), 0.8, block_m - real, **pad_kw))
        ax.text(slot + 0.5, block_m + 0.4, str(r0), ha="center", va="bottom", fontsize=7)
        ax.text(slot + 0.5, block_m - min(real, block_m) / 2, f"e{e}", ha="center", va="center",
                fontsize=7, color="white")
    ax.set_xlim(0, len(te))
    ax.set_ylim(0, block_m * 1.22)
    ax.set_xticks([i + 0.5 for i in range(len(te))], [str(i) for i in range(len(te))], fontsize=7)
    ax.set_yticks([0, block_m], [str(block_m), "0"])
    ax.set_xlabel("tile slot (one program of the GEMM grid)")
    ax.set_ylabel("row in tile")
    ax.grid(False)
    return ax


#: The parts of the MoE layer's data path that :func:`data_path_figure` can highlight, in data-path order.
DATA_PATH_PARTS = ("router", "aux_loss", "dispatch", "capacity", "experts", "backend", "parallel", "combine")

# Three looks for a part: "normal" (nothing highlighted), "on" (highlighted) and "off" (muted).
_DP_BOX = {
    "normal": dict(facecolor="#DCE6F2", edgecolor="#4C72B0", linewidth=1.2),
    "on": dict(facecolor="#F6C9A6", edgecolor="#C0581F", linewidth=2.2),
    "off": dict(facecolor="#F4F4F4", edgecolor="#C4C4C4", linewidth=0.8),
}
_DP_TEXT = {
    "normal": dict(color="#1F2A3A", fontweight="normal"),
    "on": dict(color="#8A3A0E", fontweight="bold"),
    "off": dict(color="#A6A6A6", fontweight="normal"),
}
_DP_NOTE = {  # the annotations of the sub-parts (aux_loss, capacity, backend, parallel)
    "normal": dict(color="#3A4A60", fontweight="normal"),
    "on": dict(color="#A8470F", fontweight="bold"),
    "off": dict(color="#B0B0B0", fontweight="normal"),
}
_DP_LINE = {"normal": "#4C72B0", "on": "#C0581F", "off": "#C4C4C4", "flow": "#8C8C8C"}
_DP_ENDS = dict(facecolor="white", edgecolor="#7F7F7F", linewidth=1.0)  # the x and y boxes


def _data_path_highlight(highlight) -> frozenset:
    """``highlight`` (a part name or an iterable of them) as a set of names; ValueError naming the accepted
    values otherwise."""
    accepted = ", ".join(repr(p) for p in DATA_PATH_PARTS)
    names = (highlight,) if isinstance(highlight, str) else highlight
    try:
        names = list(names)
    except TypeError:
        raise ValueError(
            f"highlight must be a part name or an iterable of part names (accepted values: {accepted}), "
            f"got {highlight!r} of type {type(highlight).__name__}") from None
    unknown = [n for n in names if not isinstance(n, str) or n not in DATA_PATH_PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) in highlight: {', '.join(map(repr, unknown))}; "
                         f"accepted values: {accepted}")
    return frozenset(names)


def _dp_box(ax, part, look, x, y, w, h, label, fontsize, z=2):
    """A rounded box centred at (x, y), ``w`` × ``h`` in inches, with ``label``; its artists get gid ``part``."""
    from matplotlib.patches import FancyBboxPatch

    pad = min(0.06, h / 6)
    style = _DP_ENDS if part is None else _DP_BOX[look]
    box = FancyBboxPatch((x - w / 2 + pad, y - h / 2 + pad), w - 2 * pad, h - 2 * pad,
                         boxstyle=f"round,pad={pad}", zorder=z, **style)
    box.set_gid(part)
    ax.add_patch(box)
    if label:
        text = ax.text(x, y, label, ha="center", va="center", fontsize=fontsize, zorder=z + 1,
                       linespacing=1.15, **_DP_TEXT["normal" if part is None else look])
        text.set_gid(part)
    return box


def _dp_arrow(ax, a, b, part=None, look="normal", style="-|>", lw=1.2, ls="-", z=1, **kw):
    from matplotlib.patches import FancyArrowPatch

    arrow = FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=10, color=_DP_LINE[look], lw=lw,
                            linestyle=ls, zorder=z, shrinkA=0, shrinkB=0, **kw)
    arrow.set_gid(part)
    ax.add_patch(arrow)
    return arrow


def _dp_note(ax, part, look, x, y, text, fontsize, **kw):
    artist = ax.text(x, y, text, fontsize=fontsize, linespacing=1.15, zorder=4, **{**_DP_NOTE[look], **kw})
    artist.set_gid(part)
    return artist


def _shown_once_figure_class():
    """The figure class of :func:`data_path_figure`, built on first use (importing this module needs no
    matplotlib) and kept as the module attribute ``_ShownOnceFigure`` (so that its figures pickle)."""
    cls = globals().get("_ShownOnceFigure")
    if cls is not None:
        return cls
    from matplotlib.figure import Figure

    class ShownOnceFigure(Figure):
        """A figure that IPython displays at most once per executed cell.

        A notebook cell ``data_path_figure(...);`` shows the figure through the inline backend at the end of
        the cell; the ``;`` keeps IPython from showing the returned figure a second time. Kernels driven
        with ``store_history=False`` (nbval) ignore the ``;``, and the figure would appear twice there:
        every display of this figure within one execution request after the first is skipped.
        """

        def _ipython_display_(self):
            from IPython import get_ipython
            from IPython.display import publish_display_data

            shell = get_ipython()
            if shell is None:
                return
            header = (getattr(shell, "parent_header", None) or {}).get("header", {})
            request = (header.get("msg_id"), shell.execution_count)
            if self.__dict__.get("_moe_book_shown_in") == request:
                return
            self._moe_book_shown_in = request
            self._ipython_display_ = None  # hide this method while IPython formats the figure
            try:
                data, metadata = shell.display_formatter.format(self)
            finally:
                del self._ipython_display_
            if data:
                publish_display_data(data, metadata=metadata)

    ShownOnceFigure.__name__ = ShownOnceFigure.__qualname__ = "_ShownOnceFigure"
    ShownOnceFigure.__module__ = __name__
    globals()["_ShownOnceFigure"] = ShownOnceFigure
    return ShownOnceFigure


def __getattr__(name):
    if name == "_ShownOnceFigure":
        return _shown_once_figure_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def data_path_figure(highlight=(), *, small=False, ax=None):
    """The MoE layer's data path as one diagram, with the parts a chapter works on highlighted.

    Tokens ``x`` (``T × d``) go to the **router** (scores, top-k experts per token and their gates; the
    auxiliary losses, **aux_loss**, leave the layer there), then to **dispatch** (the token copies grouped
    by expert; **capacity**: a capacity factor bounds each expert's rows and the overflow is dropped and
    counted), the **experts** (``E`` feed-forward networks; **backend**: the loop / torch / grouped_mm /
    triton ways to run them; **parallel**: the all-to-all exchanges around them when the experts live on
    several devices) and **combine** (each token's expert outputs summed, weighted by its gates) to ``y``.
    The layer as in Shazeer et al. (2017, sparsely-gated MoE); dispatch with a capacity and the all-to-all
    as in Lepikhin et al. (2021, GShard).

    ``highlight``: a part name or an iterable of them, from :data:`DATA_PATH_PARTS`; those parts are drawn
    emphasised (orange, bold), the others muted (grey); with none, every part is drawn plainly. ``small``:
    a compact banner (about 7 × 1.3 inches, short labels) for the top of a chapter; otherwise the full
    diagram (about 8 × 3.5 inches) with a sentence per part. ``ax``: draw into these axes (their limits
    are set and their frame turned off) instead of a new figure. Every artist of a part carries that
    part's name as its gid. Returns the figure; nothing is closed.
    """
    parts = _data_path_highlight(highlight)

    def look(part):  # part None: the arrows of the token flow
        if not parts:
            return "normal"
        return "flow" if part is None else ("on" if part in parts else "off")

    width, height = (7.0, 1.3) if small else (8.0, 3.5)
    if ax is None:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(width, height), FigureClass=_shown_once_figure_class())
        ax = fig.add_axes((0, 0, 1, 1))
    fig = ax.figure
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_aspect("equal", adjustable="box")
    ax.axis("off")
    if small:
        _data_path_small(ax, look)
    else:
        _data_path_full(ax, look)
    return fig


def _dp_experts(ax, look, x, y, w, h, label, fontsize, frame):
    """The experts as a deck of boxes, with the expert-parallel frame (dashed) around it."""
    from matplotlib.patches import FancyBboxPatch

    step = 0.05 if frame < 0.15 else 0.07
    for i in (2, 1):  # the deck behind the front box
        _dp_box(ax, "experts", look("experts"), x + i * step, y + i * step, w, h, None, fontsize, z=2 - i * 0.1)
    _dp_box(ax, "experts", look("experts"), x, y, w, h, label, fontsize)
    pad = frame
    par = look("parallel")
    rect = FancyBboxPatch((x - w / 2 - pad, y - h / 2 - pad), w + 2 * pad + 2 * step, h + 2 * pad + 2 * step,
                          boxstyle="round,pad=0.02", fill=False, linestyle=(0, (4, 2.5)), zorder=1.5,
                          edgecolor=_DP_LINE[par], linewidth={"on": 2.0, "normal": 1.1, "off": 0.9}[par])
    rect.set_gid("parallel")
    ax.add_patch(rect)
    return rect


def _dp_row(ax, look, xs, ws, y, h, fs, labels, frame, gaps):
    """What both variants draw: the boxes x, router, dispatch, combine and y, the stack of experts in its
    frame, and the token-flow arrows between them (``gaps``: how far into the frame the arrows to and from
    the experts reach). Returns the experts' frame."""

    def right(k):
        return xs[k] + ws[k] / 2

    def left(k):
        return xs[k] - ws[k] / 2

    _dp_box(ax, None, "normal", xs["x"], y, ws["x"], h, labels["x"], fs)
    _dp_box(ax, None, "normal", xs["y"], y, ws["y"], h, labels["y"], fs)
    for part in ("router", "dispatch", "combine"):
        _dp_box(ax, part, look(part), xs[part], y, ws[part], h, labels[part], fs)
    rect = _dp_experts(ax, look, xs["experts"], y, ws["experts"], h, labels["experts"], fs, frame=frame)
    fx0 = rect.get_x()
    fx1 = fx0 + rect.get_width()
    flow = look(None)
    for a, b in (("x", "router"), ("router", "dispatch")):
        _dp_arrow(ax, (right(a), y), (left(b), y), look=flow)
    _dp_arrow(ax, (right("dispatch"), y), (fx0 + gaps[0], y), look=flow)
    _dp_arrow(ax, (fx1 - gaps[1], y), (left("combine"), y), look=flow)
    _dp_arrow(ax, (right("combine"), y), (left("y"), y), look=flow)
    return rect


def _data_path_full(ax, look):
    y, h, fs = 2.0, 0.78, 9
    xs = {"x": 0.45, "router": 1.7, "dispatch": 3.2, "experts": 4.8, "combine": 6.35, "y": 7.58}
    ws = {"x": 0.75, "router": 1.2, "dispatch": 1.35, "experts": 1.05, "combine": 1.3, "y": 0.65}
    labels = {"x": "tokens x\nT × d", "y": "y\nT × d", "router": "router\nscores, top-k",
              "dispatch": "dispatch\ngroup by expert", "combine": "combine\nΣ gate · output",
              "experts": "experts\nE FFNs"}
    frame = _dp_row(ax, look, xs, ws, y, h, fs, labels, frame=0.16, gaps=(0.12, 0.02))
    fx0 = frame.get_x()
    fx1 = fx0 + frame.get_width()
    par = look("parallel")
    # The gates: from the router to combine, under the row.
    gy = 0.98
    gate = look("router") if look("router") != "off" or look("combine") == "off" else look("combine")
    ax.plot([xs["router"] + 0.2, xs["router"] + 0.2, xs["combine"]], [y - h / 2, gy, gy],
            color=_DP_LINE[gate], lw=1.1, zorder=1, gid="gates")
    _dp_arrow(ax, (xs["combine"], gy), (xs["combine"], y - h / 2), look=gate, lw=1.1)
    ax.text(xs["router"] + 0.3, gy + 0.06, "gates (T × k weights)", fontsize=8, va="bottom",
            color=_DP_NOTE[gate]["color"], zorder=4, gid="gates")
    # aux_loss: leaves the router upwards.
    aux = look("aux_loss")
    _dp_arrow(ax, (xs["router"], y + h / 2), (xs["router"], 3.0), part="aux_loss", look=aux,
              lw=2.0 if aux == "on" else 1.1, ls="--")
    _dp_note(ax, "aux_loss", aux, xs["router"], 3.05,
             "aux_loss: load-balancing (+ z) loss\nadded to the training loss", 8.5, ha="center", va="bottom")
    # parallel: the dashed frame, its note above.
    _dp_note(ax, "parallel", par, (fx0 + fx1) / 2, frame.get_y() + frame.get_height() + 0.08,
             "parallel: all-to-all to the experts'\ndevices and back (expert parallelism)", 8.5,
             ha="center", va="bottom")
    # capacity and backend: notes under the gates line, under their boxes.
    _dp_note(ax, "capacity", look("capacity"), xs["dispatch"] - 0.3, 0.8,
             "capacity: ≤ C rows per expert\n(capacity factor); overflow\ntokens dropped and counted", 8.5,
             ha="center", va="top")
    _dp_note(ax, "backend", look("backend"), xs["experts"] + 0.3, 0.8,
             "backend: the E FFNs run by\nloop / torch / grouped_mm /\ntriton kernels", 8.5, ha="center",
             va="top")


def _data_path_small(ax, look):
    y, h, fs = 0.62, 0.5, 8.5
    xs = {"x": 0.35, "router": 1.45, "dispatch": 2.85, "experts": 4.3, "combine": 5.7, "y": 6.7}
    ws = {"x": 0.55, "router": 0.95, "dispatch": 1.0, "experts": 0.9, "combine": 1.0, "y": 0.45}
    labels = {part: part for part in ("x", "y", "router", "dispatch", "combine", "experts")}
    _dp_row(ax, look, xs, ws, y, h, fs, labels, frame=0.09, gaps=(0.05, 0.01))
    aux = look("aux_loss")
    _dp_arrow(ax, (xs["router"], y + h / 2), (xs["router"], 1.05), part="aux_loss", look=aux,
              lw=1.8 if aux == "on" else 1.0, ls="--")
    _dp_note(ax, "aux_loss", aux, xs["router"] + 0.08, 1.12, "aux_loss", 8, ha="left", va="center")
    _dp_note(ax, "capacity", look("capacity"), xs["dispatch"], 0.18, "capacity", 8, ha="center", va="center")
    _dp_note(ax, "backend", look("backend"), xs["experts"] + 0.05, 0.1, "backend", 8, ha="center",
             va="center")
    _dp_note(ax, "parallel", look("parallel"), xs["experts"] + 0.05, 1.17, "parallel (all-to-all)", 8,
             ha="center", va="center")
