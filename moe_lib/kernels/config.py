"""Block sizes for the kernels, chosen from the shape (no autotuning unless ``MOE_LIB_AUTOTUNE=1``).

Per GEMM the blocks come, in order, from: a tuned table for this device (``tuned/*.json``, written on the GPU
by ``python -m moe_lib.kernels.tune``; keyed on the GEMM — ``op``, ``block_m`` and its ``k``/``n`` sizes — like
vLLM's per-(E, N, device) fused-MoE configs), else the heuristic of :func:`gemm_meta`. A table is used only on
the device it names; an absent table (no GPU session has filled it yet) means the heuristic everywhere.

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

import contextlib
import functools
import json
import os
from pathlib import Path

BLOCK_M_CHOICES = (16, 32, 64, 128)


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, set on machines without
    CUDA when :mod:`moe_lib.kernels` is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning() -> bool:
    """Autotune the GEMM tile shapes (``MOE_LIB_AUTOTUNE=1``; GPU only)."""
    return os.environ.get("MOE_LIB_AUTOTUNE", "0") == "1" and not interpreting()


def persistent() -> bool:
    """Persistent grids for the tile-slot GEMMs (``up``, ``down``, ``dh``; ``MOE_LIB_PERSISTENT=1``, off by
    default): :func:`persistent_programs` programs, each looping over work items, instead of one program per
    item. Off until a GPU run shows it helps: each item still runs its own K loop with its own pipeline
    prologue (Triton pipelines the inner loop only; overlapping the next item's loads needs its flattened
    persistent loops, not attempted here), so what it saves is block scheduling and launch width."""
    return os.environ.get("MOE_LIB_PERSISTENT", "0") == "1" and not autotuning()


def persistent_programs() -> int:
    """Programs of a persistent grid: one per SM of the current GPU (3 in the interpreter, to test the loop;
    an H200's 132 where no GPU is visible, e.g. when compiling for sm_90 on a CPU)."""
    if interpreting():
        return 3
    import torch

    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def block_m_for(num_assignments: int, num_experts: int) -> int:
    """Rows per tile for ``num_assignments`` rows spread over ``num_experts`` experts."""
    if interpreting():
        return 16
    per_expert = num_assignments / max(num_experts, 1)
    for bm in BLOCK_M_CHOICES:
        if per_expert <= bm:
            return bm
    return BLOCK_M_CHOICES[-1]


#: Folder of the tuned tables, one JSON file per device (see :func:`load_tables`).
TUNED_DIR = Path(__file__).with_name("tuned")
TABLE_FORMAT = 1
#: The GEMMs a table entry can name → the kernel each launches (``dx`` is the down kernel run backwards).
TUNED_OPS = {"up": "up", "down": "down", "dh": "dh", "dx": "down", "wgrad_gu": "wgrad", "wgrad_down": "wgrad"}
_OVERRIDES: dict[str, dict] = {}


def table_key(op: str, block_m: int, k: int, n: int) -> str:
    """Key of one GEMM in a tuned table: ``op``, rows per tile (0 for the weight gradients), reduction size
    ``k`` and output width ``n`` (``up``: ``d → f``; ``down``: ``f → d_out``; ``dh``: ``d_out → f``; ``dx``:
    ``2f → d``; ``wgrad_gu``: ``[d, 2f]``; ``wgrad_down``: ``[f, d_out]``)."""
    if op not in TUNED_OPS:
        raise ValueError(f"op must be one of {sorted(TUNED_OPS)}, got {op!r}")
    return f"{op}/bm{int(block_m)}/k{int(k)}/n{int(n)}"


def _check_config(kind: str, cfg, where: str) -> dict:
    need = {"BN", "BK", "num_warps", "num_stages"} | ({"BM"} if kind == "wgrad" else set())
    if not isinstance(cfg, dict) or set(cfg) != need or not all(isinstance(v, int) and v > 0 for v in cfg.values()):
        raise ValueError(f"{where}: a {kind!r} config must map exactly {sorted(need)} to positive integers, "
                         f"got {cfg!r}")
    return cfg


@functools.lru_cache(maxsize=None)
def load_tables(directory: str | None = None) -> dict[str, dict[str, dict]]:
    """Every tuned table in ``directory`` (default :data:`TUNED_DIR`): device name → {:func:`table_key` →
    config}. A file is ``{"format": 1, "device": <torch.cuda.get_device_name()>, "entries": [{"op", "block_m",
    "k", "n", "config": {"BN", "BK", "num_warps", "num_stages"[, "BM"]}, ...}], ...metadata}``; a malformed
    one raises naming the file."""
    tables: dict[str, dict[str, dict]] = {}
    folder = Path(directory) if directory is not None else TUNED_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
            if data.get("format") != TABLE_FORMAT or not isinstance(data.get("device"), str):
                raise ValueError(f"needs 'format': {TABLE_FORMAT} and a 'device' name")
            table = tables.setdefault(data["device"], {})
            for entry in data["entries"]:
                key = table_key(entry["op"], entry["block_m"], entry["k"], entry["n"])
                table[key] = _check_config(TUNED_OPS[entry["op"]], entry["config"], key)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"tuned table {path} is malformed: {err}") from None
    return tables


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    import torch

    return torch.cuda.get_device_name(index)


def device_name() -> str | None:
    """Name of the current CUDA device, ``None`` in the interpreter or without CUDA."""
    if interpreting():
        return None
    import torch

    return _device_name(torch.cuda.current_device()) if torch.cuda.is_available() else None


@contextlib.contextmanager
def override(op: str, block_m: int, k: int, n: int, cfg: dict):
    """Force ``cfg`` for one GEMM (any device, the interpreter included) inside the block: how
    ``python -m moe_lib.kernels.tune`` times each candidate through the real launchers."""
    key = table_key(op, block_m, k, n)
    _OVERRIDES[key] = _check_config(TUNED_OPS[op], dict(cfg), key)
    try:
        yield
    finally:
        del _OVERRIDES[key]


def tuned_meta(op: str, block_m: int, k: int, n: int, device: str | None = None) -> dict | None:
    """The tuned config of one GEMM on ``device`` (default: the current one), or ``None``."""
    key = table_key(op, block_m, k, n)
    if key in _OVERRIDES:
        return dict(_OVERRIDES[key])
    device = device if device is not None else device_name()
    hit = load_tables().get(device, {}).get(key) if device is not None else None
    return dict(hit) if hit is not None else None


def gemm_meta(kind: str, block_m: int, op: str | None = None, k: int | None = None, n: int | None = None,
              device: str | None = None) -> dict:
    """``BN``, ``BK``, ``num_warps``, ``num_stages`` of one grouped GEMM kernel for a given ``block_m``.

    With ``op``, ``k``, ``n`` (the GEMM, see :func:`table_key`) a tuned table entry for ``device`` (default:
    the current CUDA device) wins; otherwise, or where the table has no entry, the heuristic below.

    ``up`` computes a ``BM × 2·BN`` block (gate and up columns interleaved, one wide dot) and ``dh`` has an
    epilogue with a ``BM × 2·BN`` load, so their N block is narrower at large ``block_m`` and they take 8 warps
    at ``block_m = 64`` (on 4 warps ptxas spilled ``dh``); ``wgrad`` reduces over rows (its ``BK``) with a fixed
    128×128 output block. Small
    ``block_m`` (decode) is memory bound: a deeper pipeline over a longer K block keeps loads in flight.
    """
    if op is not None and k is not None and n is not None:
        if TUNED_OPS.get(op) != kind:
            raise ValueError(f"op {op!r} launches the {TUNED_OPS.get(op)!r} kernel, not {kind!r}")
        hit = tuned_meta(op, block_m, k, n, device)
        if hit is not None:
            return hit
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
