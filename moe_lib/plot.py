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


def expert_color(e: int) -> str:
    return EXPERT_COLORS[e % len(EXPERT_COLORS)]
