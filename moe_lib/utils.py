"""Small helpers shared by notebooks and tests: seeding, counted FLOPs, rankings that follow the
printed digits, the book's committed files found from any working directory, the device a chapter
runs on, and the git state a recorded result is stamped with."""
from __future__ import annotations

import dataclasses
import os
import random
import subprocess
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


def relative_norm_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64 (``‖out − ref‖`` when the reference is zero; NaN anywhere gives NaN):
    how the library's equivalence checks (Hugging Face interop, the benchmark, the kernels' GPU check)
    compare an implementation with its reference."""
    ref64, out64 = ref.double(), out.double()
    denom = ref64.norm()
    diff = (out64 - ref64).norm()
    return float(diff / denom) if denom > 0 else float(diff)


def seed_everything(seed: int = 0, threads: int | None = None) -> torch.Generator:
    """Seed Python, NumPy and torch; optionally fix torch's CPU threads. Returns a seeded generator.

    Every notebook calls this once, so re-running a chapter gives the same numbers.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.Generator().manual_seed(seed)


def rank_by(scores: Mapping[Hashable, float], decimals: int, descending: bool = False) -> list:
    """The keys of ``scores`` ordered by their score rounded to ``decimals``, the digits a table prints;
    equal rounded scores keep the order of ``scores`` (a documented tie-break, not a coin flip).

    A choice made on full-precision floats ("the best restart", "the best method") flips on a near tie
    when a last bit changes (another CPU, another library version) even though every printed number
    stays the same. Ranked on the printed digits, the choice changes only when a printed number does.
    ``scores`` is any mapping with ``.items()``, e.g. a dict or a pandas Series; ``scores[0]`` is the lowest
    (``descending=True``: the highest).

    >>> rank_by({"a": 0.30004, "b": 0.29996, "c": 0.1}, decimals=3)
    ['c', 'a', 'b']
    """
    if not isinstance(decimals, int) or isinstance(decimals, bool):
        raise TypeError(f"decimals must be an int (digits after the point), got {decimals!r}")
    sign = -1.0 if descending else 1.0
    rounded = {key: sign * round(float(value), decimals) for key, value in scores.items()}
    return sorted(rounded, key=rounded.__getitem__)


def count_flops(module: torch.nn.Module, *inputs, **kwargs) -> int:
    """FLOPs of one forward call, counted by ``torch.utils.flop_counter`` (matmuls, 2 per multiply-add)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs, **kwargs)
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- files and devices
#: Environment variable that points :func:`book_root` at a checkout of the book (overrides the search).
BOOK_ROOT_ENV = "MOE_BOOK_ROOT"


def _is_book_root(folder: Path) -> bool:
    return (folder / "benchmarks").is_dir() and (folder / "_toc.yml").is_file()


def book_root() -> Path:
    """The checkout of the MoE Book that holds the committed files the chapters read (``benchmarks/``...).

    Found without regard to the working directory, in this order: the folder named by the environment
    variable ``MOE_BOOK_ROOT``; the checkout ``moe_lib`` itself is installed from (an editable install,
    as ``make install`` does); the working directory or one of its parents. A chapter run from the
    repository root, from ``notebooks/`` or from anywhere else therefore reads the same files.
    """
    override = os.environ.get(BOOK_ROOT_ENV)
    if override:
        folder = Path(override).expanduser().resolve()
        if not _is_book_root(folder):
            raise FileNotFoundError(f"{BOOK_ROOT_ENV}={override!r} is not a checkout of the MoE Book "
                                    "(expected benchmarks/ and _toc.yml in it)")
        return folder
    package_checkout = Path(__file__).resolve().parent.parent
    here = Path.cwd().resolve()
    for folder in (package_checkout, here, *here.parents):
        if _is_book_root(folder):
            return folder
    raise FileNotFoundError(
        "no checkout of the MoE Book found (a folder with benchmarks/ and _toc.yml): moe_lib is installed "
        f"from {package_checkout} and the working directory is {here}; set {BOOK_ROOT_ENV} to the checkout")


def book_file(*parts: str) -> Path:
    """The path of a committed file of the book, ``parts`` relative to the repository root
    (e.g. ``book_file("benchmarks", "anchors", "h200_2026-11-28.json")``), independent of the working
    directory (see :func:`book_root`). Raises ``FileNotFoundError`` naming the file if it does not exist."""
    if not parts or not all(isinstance(p, str) and p for p in parts):
        raise ValueError(f"parts must be non-empty path components relative to the book's root, got {parts!r}")
    relative = Path(*parts)
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"parts must stay inside the book's root (no absolute path, no '..'), got {relative}")
    path = book_root() / relative
    if not path.exists():
        raise FileNotFoundError(f"{relative.as_posix()} is not in the book's checkout {path.parent}")
    return path


class DeviceUnavailableError(RuntimeError):
    """A chapter or function was asked to run on a device this machine does not have."""


def resolve_device(device: str | torch.device, name: str = "device") -> str:
    """Check that ``device`` exists on this machine and return it as a string (``"cpu"``, ``"cuda"``,
    ``"cuda:1"``).

    Every chapter calls it in the cell after its ``parameters`` cell, so ``papermill ... -p device cuda``
    on a machine without CUDA stops there with a message that says what to pass instead, not deep inside
    a training loop. Accepted: ``"cpu"``, ``"cuda"`` and ``"cuda:<index>"``.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"{name} must be 'cpu', 'cuda' or 'cuda:<index>', got {device!r} of type "
                        f"{type(device).__name__}")
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise ValueError(f"unknown {name} {device!r}; accepted values: 'cpu', 'cuda', 'cuda:<index>'")
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise DeviceUnavailableError(
                f"{name}={device!r} was asked for, but this machine has no usable CUDA GPU "
                f"(torch {torch.__version__}, {build}: torch.cuda.is_available() is False); "
                f"run with {name}='cpu' (papermill: -p {name} cpu) or on a GPU machine")
        if index and int(index) >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"{name}={device!r}: this machine has {torch.cuda.device_count()} "
                                         f"CUDA device(s), indices 0 to {torch.cuda.device_count() - 1}")
    return device


def to_device(obj, device: str | torch.device, dtype: torch.dtype | None = None):
    """Move ``obj`` to ``device``: a tensor or module, or any tuple / list / dict / dataclass of them
    (other values pass through unchanged). Modules move in place and are returned. With ``dtype``,
    floating-point tensors and a module's floating-point parameters are also cast to it (integer tensors,
    such as token ids, keep theirs). The one way the chapters move their models and data, so a run on a
    GPU cannot leave part of them on the CPU."""
    device = resolve_device(device)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    if isinstance(obj, torch.nn.Module):
        return obj.to(device) if dtype is None else obj.to(device, dtype)
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if dtype is not None and obj.is_floating_point() else obj.to(device)
    if isinstance(obj, Mapping):
        return type(obj)((k, to_device(v, device, dtype)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(to_device(v, device, dtype) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, dtype) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device, dtype)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def git_state(paths: Sequence[str] = ()) -> dict[str, str | bool | None]:
    """The commit of the checkout moe_lib runs from and whether tracked files differ from it
    (``git_commit``, ``git_dirty``; with ``paths``, only changes under those paths of the repository count:
    a run of the library is not made "dirty" by an edited notebook). Where the code runs outside a git
    checkout (a copied working tree), the environment variable ``MOE_LIB_GIT_COMMIT`` supplies the commit;
    both are None when nothing does."""
    if os.environ.get("MOE_LIB_GIT_COMMIT"):
        return {"git_commit": os.environ["MOE_LIB_GIT_COMMIT"], "git_dirty": None}
    root = Path(__file__).resolve().parents[1]  # moe_lib/ -> the checkout
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths],
                               cwd=root, capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git_commit": None, "git_dirty": None}
