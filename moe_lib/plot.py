"""One figure style for the whole book (moderate size, readable on the web page, small PNGs)."""
from __future__ import annotations

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


def mean_band(ax, x, curves, label: str | None = None, color=None, alpha: float = 0.2, **kwargs):
    """Plot the mean of ``curves`` (``[n_seeds, len(x)]``) as a line and its 95 % t-interval as a band
    (:func:`moe_lib.stats.summarize_curves`); the label gets ``(n=…)``. Returns the line."""
    from .stats import summarize_curves

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
