"""Tables and figures from benchmark JSON: the harness's own (``benchmarks/results/``) and the committed
H200 anchors (``benchmarks/anchors/``), normalised into one long table with a row per (case,
implementation). pandas and matplotlib are imported only by the functions that need them, so the harness
itself runs with torch alone.

Columns of :func:`results_frame` / :func:`anchor_frame`: ``source, date, gpu, shape, phase, mode,
routing, T, d, f, E, k, fine_grained, impl, family, ms, tflops, ratio_to_dense, relerr, relerr_dx,
relerr_dw, correct, peak_mem_gb, workspace_gb, TBps, bw_share, routing_mismatch, impl_used, error, skipped``
(:data:`COLUMNS`).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable, Sequence

from ..utils import book_root
from .shapes import SHAPES, Shape

#: Display names, in the order tables and figures use.
LABELS = {
    "dense_equal_flops": "dense (equal FLOPs)",
    "moe_lib_triton": "moe_lib Triton",
    "moe_lib_fused": "moe_lib fused_moe",
    "moe_lib_torch": "moe_lib torch backend",
    "moe_lib_loop": "moe_lib loop backend",
    "moe_lib_backend_grouped_mm": "moe_lib grouped_mm backend",
    "moe_lib_backend_triton": "moe_lib triton backend",
    "torch_grouped_mm": "torch _grouped_mm",
    "hf_grouped_mm": "HF grouped_mm",
    "hf_batched_mm": "HF batched_mm",
    "hf_eager": "HF eager",
    "naive_loop": "naive loop",
}
PEERS = ("torch_grouped_mm", "hf_grouped_mm", "hf_eager", "naive_loop")
MOE_LIB = ("moe_lib_triton", "moe_lib_fused", "moe_lib_torch")
COLORS = {"moe_lib_triton": "#C44E52", "moe_lib_fused": "#DA8BC3", "moe_lib_torch": "#937860",
          "moe_lib_backend_grouped_mm": "#DD8452", "moe_lib_backend_triton": "#E8A0A0",
          "torch_grouped_mm": "#4C72B0", "hf_grouped_mm": "#55A868", "hf_batched_mm": "#64B5CD",
          "hf_eager": "#8172B3", "naive_loop": "#8C8C8C", "dense_equal_flops": "#CCB974"}
COLUMNS = ["source", "date", "gpu", "shape", "phase", "mode", "routing", "T", "d", "f", "E", "k", "fine_grained",
           "impl", "family", "ms", "tflops", "ratio_to_dense", "relerr", "relerr_dx", "relerr_dw", "correct",
           "peak_mem_gb", "workspace_gb", "TBps", "bw_share", "routing_mismatch", "impl_used", "error", "skipped"]

#: The issue's targets for moe_lib's Triton path.
TARGETS = {"fwd_ratio_to_dense": 0.80, "decode_bw_share": 0.85, "fwdbwd_speedup_vs_grouped_mm": 1.5}


def label(impl: str) -> str:
    return LABELS.get(impl, impl)


def family(impl: str) -> str:
    if impl == "dense_equal_flops":
        return "baseline"
    return "moe_lib" if impl.startswith("moe_lib") else "peer"


# --------------------------------------------------------------------------------- console tables
def _fmt(v, spec: str = ".4g") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_case(row: dict, impls: Sequence[str] | None = None) -> str:
    """Lines for one case of a harness result: time, TFLOP/s, ratio to dense, error, or why not."""
    head = (f"{row['shape']} {row['phase']} T={row['T']} {row['mode']} routing={row['routing']} "
            f"({row.get('gflop', 0):.4g} GFLOP, experts touched {row.get('experts_touched', '-')}/{row['E']}, "
            f"max/mean load {_fmt(row.get('imbalance'), '.3g')})")
    if row.get("error"):
        return head + f"\n    setup failed: {row['error']}"
    lines = [head]
    width = max([20] + [len(n) for n in row.get("results", {})])
    for name in impls or list(row.get("results", {})):
        r = row.get("results", {}).get(name)
        if r is None:
            continue
        err = [f"{k}={r[k]:.2e}" for k in ("relerr", "relerr_dx", "relerr_dw") if r.get(k) is not None]
        flag = "" if r.get("correct") in (True, None) else "  INCORRECT"
        if r.get("ms") is None:
            why = r.get("error") or f"skipped: {r.get('skipped')}"
            checked = f"{' '.join(err)}{flag}  " if err else ""
            lines.append(f"    {name:{width}s} {checked}{why[:150]}")
            continue
        extra = f" share of copy BW {r['bw_share']:.3f}" if r.get("bw_share") is not None else ""
        used = f" (ran impl={r['impl_used']})" if r.get("impl_used") not in (None, "triton") else ""
        lines.append(f"    {name:{width}s} {r['ms']:9.4g} ms {r['tflops']:8.4g} TFLOP/s  ratio to dense "
                     f"{_fmt(r.get('ratio_to_dense'), '.3f')}{extra}  {' '.join(err)}{flag}{used}")
    return "\n".join(lines)


def format_summary(result: dict) -> str:
    """Ratio to dense of every implementation per case (prefill), share of copy bandwidth (decode)."""
    impls = result.get("config", {}).get("impls") or sorted({i for c in result["cases"] for i in c.get("results", {})})
    short = {i: (label(i)[:14]) for i in impls}
    out = []
    for title, phase, key in (("ratio to dense (dense ms / impl ms)", "prefill", "ratio_to_dense"),
                              ("share of measured copy bandwidth on the touched experts' weights", "decode", "bw_share")):
        rows = [c for c in result["cases"] if c["phase"] == phase and "results" in c]
        if not rows:
            continue
        out.append(f"\n{phase}: {title}")
        out.append(" " * 46 + "".join(short[i].rjust(15) for i in impls))
        for c in rows:
            name = f"{c['shape']} T={c['T']} {c['mode']} {c['routing']}"[:45].ljust(46)
            cells = []
            for i in impls:
                r = c["results"].get(i, {})
                v = r.get(key)
                cell = (_fmt(v, ".3f") if r.get("ms") is not None else "err" if r.get("error")
                        else "untimed" if r.get("correct") is not None else "skip")
                if r.get("correct") is False:
                    cell += "!"
                cells.append(cell.rjust(15))
            out.append(name + "".join(cells))
    out.append("(err = failed, see the JSON; skip = not applicable or over budget; untimed = checked, not timed "
               "(Triton interpreter); ! = failed the correctness check)")
    return "\n".join(out)


# ------------------------------------------------------------------------------------ data frames
def _date(path: Path) -> str | None:
    m = re.search(r"(\d{4}-\d{2}-\d{2})", path.name)
    return m.group(1) if m else None


def anchor_frame(fwd: dict | None, train: list | None = None, source: str = "anchors", date: str | None = None):
    """The anchor runs (``anchor_bench.py``: ``{"info", "rows"}``; ``anchor_bench_train.py``: a list of
    rows) as rows of :data:`COLUMNS`. The train file's ``fwd_*_ms`` entries (GPT-OSS forward) become
    forward rows. Ratios, bandwidth shares and bytes are recomputed here from the stored times."""
    import pandas as pd

    info = (fwd or {}).get("info", {})
    copy = info.get("copy_TBps")
    records = []

    def add(base: dict, impl: str, ms: float, flops: float, **extra):
        rec = dict.fromkeys(COLUMNS)
        rec.update(base, impl=impl, family=family(impl), ms=ms, tflops=flops / ms / 1e9, **extra)
        records.append(rec)

    for row in (fwd or {}).get("rows", []):
        shape, phase = row["shape"].split("/")
        base = {"source": source, "date": date, "gpu": info.get("gpu"), "shape": shape, "phase": phase, "mode": "fwd",
                "routing": "router", "T": row["T"], "d": row["d"], "f": row["f"], "E": row["E"], "k": row["k"],
                "fine_grained": row["E"] >= 64}
        dense = row.get("dense_equal_flops_ms")
        flops = row["GFLOP"] * 1e9
        for impl in LABELS:
            ms = row.get(f"{impl}_ms")
            if ms is None:
                continue
            tb = row["weight_MB_touched"] / ms / 1e3 if phase == "decode" else None
            add(base, impl, ms, flops, ratio_to_dense=dense / ms if dense else None, relerr=row.get(f"{impl}_relerr"),
                TBps=tb, bw_share=tb / copy if tb is not None and copy else None)
    for row in train or []:
        shape = row["shape"].split("/")[0]
        base = {"source": source, "date": date, "gpu": info.get("gpu"), "shape": shape, "phase": "prefill",
                "routing": "router", "T": row["T"], "d": row["d"], "f": row["f"], "E": row["E"], "k": row["k"],
                "fine_grained": row["E"] >= 64}
        flops = row["GFLOP_fwd"] * 1e9
        fwd_dense = row.get("fwd_dense_ms")
        for impl, key in (("dense_equal_flops", "fwd_dense_ms"), ("torch_grouped_mm", "fwd_torch_grouped_mm_ms")):
            if row.get(key):
                add({**base, "mode": "fwd"}, impl, row[key], flops, ratio_to_dense=fwd_dense / row[key] if fwd_dense else None)
        dense = row.get("dense_equal_flops_ms")
        for impl in LABELS:
            ms = row.get(f"{impl}_ms")
            if ms is None:
                continue
            add({**base, "mode": "fwdbwd"}, impl, ms, 3 * flops, ratio_to_dense=dense / ms if dense else None,
                peak_mem_gb=row.get(f"{impl}_peakGB"))
    return pd.DataFrame(records, columns=COLUMNS)


def results_frame(result: dict, source: str = "moe_lib.bench"):
    """A harness JSON (``python -m moe_lib.bench``) as rows of :data:`COLUMNS`; failed and skipped
    implementations are kept with ``ms`` empty and ``error`` / ``skipped`` set."""
    import pandas as pd

    meta = result.get("meta", {})
    records = []
    for case in result.get("cases", []):
        for impl, r in case.get("results", {}).items():
            rec = dict.fromkeys(COLUMNS)
            rec.update({k: case.get(k) for k in ("shape", "phase", "mode", "routing", "T", "d", "f", "E", "k",
                                                 "fine_grained")})
            rec.update({k: r.get(k) for k in COLUMNS if k in r})
            rec.update(source=source, date=(meta.get("date") or "")[:10] or None, gpu=meta.get("gpu"), impl=impl,
                       family=family(impl))
            records.append(rec)
    return pd.DataFrame(records, columns=COLUMNS)


def load_json(path: str | Path):
    return json.loads(Path(path).read_text())


def load_all(root: str | Path | None = None, results_glob: str = "h200_*.json"):
    """Every committed measurement: the anchors (forward and train files of each date) and the harness
    results ``benchmarks/results/<results_glob>``. Returns ``(frame, sources)`` where ``sources`` lists
    ``{"source", "path", "kind", "date", "ceilings", "meta"}`` for each file read."""
    import pandas as pd

    root = Path(root) if root is not None else book_root()
    frames, sources = [], []
    anchors = root / "benchmarks" / "anchors"
    for fwd_path in sorted(anchors.glob("h200_*.json")):
        if "_train_" in fwd_path.name:
            continue
        date = _date(fwd_path)
        train_path = anchors / f"h200_train_{date}.json"
        fwd = load_json(fwd_path)
        train = load_json(train_path) if train_path.exists() else None
        name = f"anchors {date}"
        frames.append(anchor_frame(fwd, train, name, date))
        info = fwd.get("info", {})
        sources.append({"source": name, "kind": "anchor", "date": date,
                        "path": [str(p.relative_to(root)) for p in (fwd_path, train_path) if p.exists()],
                        "ceilings": {"dense_tflops": info.get("dense_8192_tflops"), "copy_TBps": info.get("copy_TBps")},
                        "meta": info})
    for path in sorted((root / "benchmarks" / "results").glob(results_glob)):
        result = load_json(path)
        name = f"moe_lib.bench {_date(path) or path.stem}"
        frames.append(results_frame(result, name))
        sources.append({"source": name, "kind": "results", "date": _date(path), "path": [str(path.relative_to(root))],
                        "ceilings": result.get("ceilings"), "meta": result.get("meta")})
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    return frame, sources


def select(frame, phase: str, mode: str, routing: str = "router", T: int | None = None):
    """One measurement per (shape, implementation): for each shape the newest source that measured this
    phase and mode, at ``T`` if given and measured, else at its largest ``T``. Only timed rows."""
    df = frame[(frame.phase == phase) & (frame["mode"] == mode) & (frame.routing == routing) & frame.ms.notna()]
    keep = []
    for shape, g in df.groupby("shape", sort=False):
        newest = g[g.date == g.date.max()] if g.date.notna().any() else g
        t = T if T is not None and (newest["T"] == T).any() else newest["T"].max()
        keep.append(newest[newest["T"] == t])
    if not keep:
        return df.iloc[0:0]
    out = df.loc[[i for k in keep for i in k.index]]
    order = {s: i for i, s in enumerate(SHAPES)}
    return out.sort_values("shape", key=lambda s: s.map(lambda x: order.get(x, 99)), kind="stable")


def pivot(frame, value: str, impls: Iterable[str] | None = None):
    """``shape × implementation`` table of ``value`` (``T`` as the first column)."""
    impls = [i for i in (impls or LABELS) if i in set(frame.impl)]
    table = frame.pivot_table(index="shape", columns="impl", values=value, aggfunc="first")
    table = table.reindex(columns=impls)
    table.insert(0, "T", frame.groupby("shape")["T"].first())
    order = [s for s in SHAPES if s in table.index] + [s for s in table.index if s not in SHAPES]
    return table.loc[order].rename(columns=LABELS)


def moe_lib_value(g, value: str):
    """moe_lib's Triton number in one selection, or ``None`` when it was not measured with Triton."""
    r = g[(g.impl == "moe_lib_triton") & (g.impl_used.fillna("triton") == "triton")]
    return None if r.empty else float(r[value].iloc[0])


def targets_table(frame, decode_T: int = 64):
    """The issue's three targets, one row per shape, with each peer's measured number and moe_lib's
    Triton path's (``"pending"`` until a harness result measured with the Triton kernels is committed).

    * forward, share of dense: ``dense ms / impl ms`` on every prefill shape, goal ≥ 0.80;
    * decode, share of copy bandwidth on the touched experts' weights (``T = decode_T``), goal ≥ 0.85;
    * fwd+bwd, speed-up over the torch ``_grouped_mm`` path on the fine-grained shapes, goal ≥ 1.5.
    """
    import pandas as pd

    def column(g, impl, value):
        v = g.loc[g.impl == impl, value]
        return float(v.iloc[0]) if len(v) and pd.notna(v.iloc[0]) else None

    def speedup(g, impl, value):
        base, mine = column(g, "torch_grouped_mm", "ms"), column(g, impl, "ms")
        return base / mine if base and mine else None

    specs = [("forward, share of dense", f">= {TARGETS['fwd_ratio_to_dense']:.2f}",
              select(frame, "prefill", "fwd"), "ratio_to_dense", column, False),
             ("decode, share of copy BW", f">= {TARGETS['decode_bw_share']:.2f}",
              select(frame, "decode", "fwd", T=decode_T), "bw_share", column, False),
             ("fwd+bwd, speed-up over torch _grouped_mm", f">= {TARGETS['fwdbwd_speedup_vs_grouped_mm']:.1f}x",
              select(frame, "prefill", "fwdbwd"), "ms", speedup, True)]
    rows = []
    for target, goal, sel, value, fn, fine_only in specs:
        for shape, g in sel.groupby("shape", sort=False):
            if fine_only and not bool(g.fine_grained.iloc[0]):
                continue
            rec = {"target": target, "shape": shape, "T": int(g["T"].iloc[0]), "goal": goal}
            for impl in PEERS:
                rec[label(impl)] = fn(g, impl, value)
            mine = fn(g, "moe_lib_triton", value) if moe_lib_value(g, "ms") is not None else None
            rec["moe_lib (Triton)"] = "pending" if mine is None else mine
            rec["measured in"] = ", ".join(sorted(set(g.source)))
            rows.append(rec)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ plots
def _bars(ax, table, impls, ylabel, goal=None, goal_label=None):
    import numpy as np

    impls = [i for i in impls if i in table.columns]
    x = np.arange(len(table.index))
    width = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        ax.bar(x + (j - (len(impls) - 1) / 2) * width, table[impl].astype(float).values, width, label=label(impl),
               color=COLORS.get(impl))
    ax.set_xticks(x, [f"{s}\nT={int(t)}" for s, t in zip(table.index, table["T"])], fontsize=8)
    ax.set_ylabel(ylabel)
    if goal is not None:
        ax.axhline(goal, color="#C44E52", ls="--", lw=1, label=goal_label)


def _raw_pivot(sel, value):
    table = sel.pivot_table(index="shape", columns="impl", values=value, aggfunc="first")
    table.insert(0, "T", sel.groupby("shape")["T"].first())
    order = [s for s in SHAPES if s in table.index]
    return table.loc[order]


def plot_ratio_to_dense(frame, ax, mode: str = "fwd", impls: Sequence[str] = MOE_LIB + PEERS, goal: float | None = None):
    """Bars: ratio to dense (dense ms / impl ms) per shape and implementation, newest run per shape."""
    table = _raw_pivot(select(frame, "prefill", mode), "ratio_to_dense")
    _bars(ax, table, impls, "ratio to dense (1 = speed of light)", goal, f"target {goal:.2f}" if goal else None)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_title("forward" if mode == "fwd" else "forward + backward", fontsize=10)


def plot_decode_bandwidth(frame, ax, T: int = 64, impls: Sequence[str] = MOE_LIB + PEERS + ("hf_batched_mm",),
                          goal: float | None = TARGETS["decode_bw_share"]):
    """Bars: share of the measured copy bandwidth spent reading the touched experts' weights (decode)."""
    table = _raw_pivot(select(frame, "decode", "fwd", T=T), "bw_share")
    _bars(ax, table, impls, "share of copy bandwidth", goal, f"target {goal:.2f}" if goal else None)
    ax.set_ylim(0, 1.05)


SHAPE_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]


def plot_intensity(ax, shapes: Sequence[Shape], peak_tflops: float, bandwidth_TBps: float,
                   prefill_T: Sequence[int] = (4096, 16384), decode_T: Sequence[int] = (1, 16, 64, 128),
                   T_range: tuple[int, int] = (1, 32768), bytes_per_element: float = 2.0):
    """Arithmetic intensity of the layer (minimum traffic) against ``T`` per shape, with the ridge point
    ``peak / bandwidth``: below it the layer is bound by bandwidth, above it by arithmetic. Decode
    token counts are open markers, prefill filled."""
    import numpy as np

    from .roofline import arithmetic_intensity, ridge_point

    Ts = np.unique(np.geomspace(T_range[0], T_range[1], 200).astype(int))
    for j, s in enumerate(shapes):
        c = SHAPE_COLORS[j % len(SHAPE_COLORS)]
        ax.plot(Ts, arithmetic_intensity(s, Ts, bytes_per_element), color=c, lw=1.2, label=s.name)
        ax.plot(decode_T, arithmetic_intensity(s, decode_T, bytes_per_element), "o", mfc="white", color=c, ms=5)
        ax.plot(prefill_T, arithmetic_intensity(s, prefill_T, bytes_per_element), "o", color=c, ms=5)
    ridge = ridge_point(peak_tflops, bandwidth_TBps)
    ax.axhline(ridge, color="k", ls="--", lw=1)
    ax.text(T_range[0] * 1.3, ridge * 1.15, f"ridge {ridge:.0f} FLOP/B: compute-bound above", fontsize=8)
    ax.text(T_range[0] * 1.3, ridge / 1.6, "bandwidth-bound below", fontsize=8)
    ax.plot([], [], "o", mfc="white", color="gray", label="decode T")
    ax.plot([], [], "o", color="gray", label="prefill T")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens T in the layer's batch")
    ax.set_ylabel("FLOP per byte (minimum traffic)")


def plot_roofline(ax, shapes: Sequence[Shape], peak_tflops: float, bandwidth_TBps: float,
                  prefill_T: Sequence[int] = (16384,), decode_T: Sequence[int] = (64,), measured=None,
                  bytes_per_element: float = 2.0):
    """The roofline ``min(peak, I·BW)`` with each shape's decode (open) and prefill (filled) points on
    it, and optionally ``measured`` points ``[(shape, T, tflops)]`` (crosses) below it."""
    import numpy as np

    from .roofline import arithmetic_intensity, ridge_point, roofline_tflops

    ais = [float(arithmetic_intensity(s, T, bytes_per_element)) for s in shapes for T in (*prefill_T, *decode_T)]
    grid = np.geomspace(min(ais) / 2, max(ais) * 3, 200)
    ax.plot(grid, roofline_tflops(grid, peak_tflops, bandwidth_TBps), color="k", lw=1.5)
    ridge = ridge_point(peak_tflops, bandwidth_TBps)
    ax.axvline(ridge, color="k", ls=":", lw=0.8)
    for j, s in enumerate(shapes):
        c = SHAPE_COLORS[j % len(SHAPE_COLORS)]
        for Ts, mfc in ((decode_T, "white"), (prefill_T, c)):
            a = arithmetic_intensity(s, list(Ts), bytes_per_element)
            ax.plot(a, roofline_tflops(a, peak_tflops, bandwidth_TBps), "o", color=c, mfc=mfc, ms=6)
        for shape_name, T, tflops in measured or []:
            if shape_name == s.name:
                ax.plot(float(arithmetic_intensity(s, T, bytes_per_element)), tflops, "x", color=c, ms=7, mew=1.5)
        ax.plot([], [], "s", color=c, label=s.name)
    ax.plot([], [], "o", mfc="white", color="gray", label=f"decode T={','.join(map(str, decode_T))} (bound)")
    ax.plot([], [], "o", color="gray", label=f"prefill T={','.join(map(str, prefill_T))} (bound)")
    if measured:
        ax.plot([], [], "x", color="gray", label="measured")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOP per byte (minimum traffic)")
    ax.set_ylabel("TFLOP/s")


def headline_numbers(frame, peak_tflops: float) -> dict:
    """The ranges chapter 12's prose quotes, computed from ``frame`` (router routing, the peers of
    :data:`PEERS` only), so that no sentence carries a number typed by hand. ``(low, high)`` pairs:

    * ``coarse_fwd`` — forward ratio to dense on the shapes with few experts (Mixtral), every peer;
      ``coarse_fwd_slowest`` the peer at the low end and ``coarse_fwd_extra_time`` its time over the dense
      GEMM's, minus 1 (a ratio ``r`` means ``1/r`` times the dense time);
    * ``fine_fwd_<impl>`` — forward ratio on the fine-grained shapes for each peer, ``fine_fwd_loops`` for
      the two loops (``hf_eager``, ``naive_loop``) together; ``fine_fwdbwd_<impl>`` the same for
      forward + backward;
    * ``fine_fwd_best_share_of_peak`` — the best peer's TFLOP/s over ``peak_tflops``, per fine-grained shape;
    * ``fwdbwd_mem_hf_over_grouped`` — peak memory of ``hf_grouped_mm`` over ``torch_grouped_mm`` in
      forward + backward.

    The committed anchor files hold one median time per (shape, implementation) and no spread, so these
    are ranges over shapes and implementations, not confidence intervals.
    """
    def rng(values):
        v = [float(x) for x in values if x == x]  # drop NaN
        return (min(v), max(v)) if v else (float("nan"), float("nan"))

    out: dict = {}
    fwd, fb = select(frame, "prefill", "fwd"), select(frame, "prefill", "fwdbwd")
    fwd, fb = fwd[fwd.impl.isin(PEERS)], fb[fb.impl.isin(PEERS)]
    coarse, fine = fwd[~fwd.fine_grained.astype(bool)], fwd[fwd.fine_grained.astype(bool)]
    out["coarse_fwd"] = rng(coarse.ratio_to_dense)
    if len(coarse):
        slowest = coarse.loc[coarse.ratio_to_dense.idxmin()]
        out["coarse_fwd_slowest"] = str(slowest.impl)
        out["coarse_fwd_extra_time"] = 1.0 / float(slowest.ratio_to_dense) - 1.0
    fine_fb = fb[fb.fine_grained.astype(bool)]
    for impl in PEERS:
        out[f"fine_fwd_{impl}"] = rng(fine.loc[fine.impl == impl, "ratio_to_dense"])
        out[f"fine_fwdbwd_{impl}"] = rng(fine_fb.loc[fine_fb.impl == impl, "ratio_to_dense"])
    out["fine_fwd_loops"] = rng(fine.loc[fine.impl.isin(["hf_eager", "naive_loop"]), "ratio_to_dense"])
    out["fine_fwd_best_share_of_peak"] = rng(fine.groupby("shape").tflops.max() / peak_tflops)
    mem = fb.pivot_table(index="shape", columns="impl", values="peak_mem_gb", aggfunc="first")
    if {"hf_grouped_mm", "torch_grouped_mm"} <= set(mem.columns):
        out["fwdbwd_mem_hf_over_grouped"] = rng(mem["hf_grouped_mm"] / mem["torch_grouped_mm"])
    return out
