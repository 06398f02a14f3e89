"""Block sizes for the kernels, chosen from the shape (no autotuning unless ``MOE_LIB_AUTOTUNE=1``).

``block_m`` — rows of one expert per tile — is the one choice the metadata and the GEMMs must share, so it is
fixed before the tile schedule is built. A tile is wasted where an expert's row count is not a multiple of
``block_m``: with ``R = T·k/E`` rows per expert on average, a tile of ``block_m ≈ R`` or smaller keeps that
waste low, while a large tile keeps the tensor cores busy. The heuristic picks the smallest of 16, 32, 64,
128 that is at least ``R`` (capped at 128). Under the Triton interpreter (CPU) every block is small: its cost
is per element, not per tile.

Decode (``R < 16``) gets the smallest tile, 16 rows. Sizing the tile for the busiest expert instead would need
its row count, which only the device knows; without reading it back, the bound is ``min(T, N)`` rows (a token
picks an expert at most once), always ≥ ``R``. A tile that large multiplies the masked rows of every other
expert: DeepSeek-V3 at ``T = 64`` (``k = 8``, ``E = 256``, two rows per expert on average) would run 64-row
tiles for two real rows, 32× the useful MMA work (≈ 1.4 TFLOP per layer, a few ms), to save the re-reads of
the hot expert's weights by its extra 16-row tiles — re-reads that the grouped tile order serves from L2, as
those tiles run side by side. Masked rows cost no bytes but do cost MMA issue slots and registers, so the
mean, not the bound on the maximum, sets ``block_m``; the grid's slot count (see ``max_tiles``) is what
follows the live tiles.
"""
from __future__ import annotations

import os

BLOCK_M_CHOICES = (16, 32, 64, 128)


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, set on machines without
    CUDA when :mod:`moe_lib.kernels` is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning() -> bool:
    """Autotune the GEMM tile shapes (``MOE_LIB_AUTOTUNE=1``; GPU only)."""
    return os.environ.get("MOE_LIB_AUTOTUNE", "0") == "1" and not interpreting()


def block_m_for(num_assignments: int, num_experts: int) -> int:
    """Rows per tile for ``num_assignments`` rows spread over ``num_experts`` experts."""
    if interpreting():
        return 16
    per_expert = num_assignments / max(num_experts, 1)
    for bm in BLOCK_M_CHOICES:
        if per_expert <= bm:
            return bm
    return BLOCK_M_CHOICES[-1]


def gemm_meta(kind: str, block_m: int) -> dict:
    """``BN``, ``BK``, ``num_warps``, ``num_stages`` of one grouped GEMM kernel for a given ``block_m``.

    ``up`` computes a ``BM × 2·BN`` block (gate and up columns interleaved, one wide dot) and ``dh`` has an
    epilogue with a ``BM × 2·BN`` load, so their N block is narrower at large ``block_m`` and they take 8 warps
    at ``block_m = 64`` (on 4 warps ptxas spilled ``dh``); ``wgrad`` reduces over rows (its ``BK``) with a fixed
    128×128 output block. Small
    ``block_m`` (decode) is memory bound: a deeper pipeline over a longer K block keeps loads in flight.
    """
    if interpreting():
        return {"BN": 32, "BK": 32} if kind != "wgrad" else {"BM": 32, "BN": 32, "BK": 16}
    if kind == "wgrad":
        return {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}
    if block_m >= 128:
        bn = 128 if kind == "down" else 64
        return {"BN": bn, "BK": 64, "num_warps": 8, "num_stages": 4 if kind == "down" else 3}
    if block_m == 64:  # up/dh: a 64 × 256 float32 block (the wide gate|up dot) needs two warpgroups
        return {"BN": 128, "BK": 64, "num_warps": 8 if kind in ("up", "dh") else 4, "num_stages": 4}
    return {"BN": 64, "BK": 128, "num_warps": 4, "num_stages": 5}


#: Rows a split unit of the weight gradient reduces at least (its pipeline prologue must pay off).
WGRAD_MIN_SPLIT_ROWS = 256
#: Programs a hot expert's weight gradient should spread over: two waves of the H200's 132 SMs.
WGRAD_TARGET_PROGRAMS = 264


def wgrad_split_rows(num_rows: int, num_experts: int, m: int, n_out: int, meta: dict | None = None,
                     min_rows: int | None = None) -> int:
    """Rows per unit ``R`` of the weight-gradient GEMM's deterministic split-K, from the shapes only.

    One expert's ``dW[e]`` (``m × n_out``) has ``⌈m/BM⌉·⌈n_out/BN⌉`` output blocks; when one expert takes most
    of the ``N`` rows (Zipf-skewed routing) only that many programs work. An expert with ``n_e > R`` rows is
    cut into ``⌈n_e / R⌉`` units, so ``R`` is chosen for an expert holding all ``N`` rows to spread over
    about :data:`WGRAD_TARGET_PROGRAMS` programs, with two limits: ``R ≥`` :data:`WGRAD_MIN_SPLIT_ROWS`, and
    the float32 partials (``< 2N/R`` slots of ``m × n_out``) stay within half the bytes of a bfloat16
    ``dW`` (``≤ E/4`` slots). Balanced routing (``n_e ≈ N/E``) then never splits on fine-grained shapes: with
    ``E/4`` slots a unit holds at least ``8N/E`` rows. Returns ``R ≥ N`` when no split helps."""
    meta = meta or gemm_meta("wgrad", 0)
    blocks = -(-m // meta["BM"]) * -(-n_out // meta["BN"])
    want = -(-WGRAD_TARGET_PROGRAMS // blocks)          # units for an expert that holds every row
    if want <= 1 or num_rows == 0:
        return max(num_rows, 1)
    if min_rows is None:  # the interpreter's tiny tests split at one BK
        min_rows = meta["BK"] if interpreting() else WGRAD_MIN_SPLIT_ROWS
    budget = max(num_experts // 4, 1)                   # partial slots allowed
    rows = max(min_rows, -(-num_rows // want), -(-2 * num_rows // budget))
    return -(-rows // meta["BK"]) * meta["BK"]


def autotune_configs(kind: str) -> list[dict]:
    """Candidate ``(BN, BK, num_warps, num_stages)`` for :func:`triton.autotune` (``block_m`` fixed)."""
    if kind == "wgrad":
        return [
            {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
            {"BM": 128, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 4},
            {"BM": 64, "BN": 128, "BK": 64, "num_warps": 4, "num_stages": 4},
            {"BM": 128, "BN": 256, "BK": 64, "num_warps": 8, "num_stages": 3},
        ]
    return [
        {"BN": 64, "BK": 64, "num_warps": 4, "num_stages": 4},
        {"BN": 128, "BK": 64, "num_warps": 4, "num_stages": 4},
        {"BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
        {"BN": 64, "BK": 128, "num_warps": 4, "num_stages": 5},
        {"BN": 256, "BK": 64, "num_warps": 8, "num_stages": 3},
        {"BN": 128, "BK": 128, "num_warps": 8, "num_stages": 3},
    ]
