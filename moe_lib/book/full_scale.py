"""Full-scale runs: a chapter's experiment at a larger, stated scale, kept as a committed results file.

A chapter runs its experiment live at a size that fits CI (about a minute on 2 CPU cores). Some phenomena
need more: whether sparse language models overtake a dense one (chapter 8), whether z-loss rescues an
unstable router (chapter 6), whether sparse models overfit a small task (chapter 15), whether MMoE's
advantage grows as tasks decorrelate (chapter 17). This module runs those experiments at a larger scale,
with the *same library functions* the chapters call, and writes one JSON file per run::

    python -m moe_lib.book.full_scale --list
    python -m moe_lib.book.full_scale ch08 --set steps=2000 --set seeds=3    # writes full_scale/ch08_*.json

A results file is the unedited output of one run (as in ``benchmarks/``): a new run is a new file, never an
edit. It carries its provenance (:data:`PROVENANCE_FIELDS`: the command, every parameter, the seeds, the
git commit and whether the library differed from it, the machine, the library versions, the date and the
wall time) and its measurements in one schema (:data:`SCHEMA`):

* ``curves``: one entry per model and seed: ``x`` and ``y`` (e.g. training FLOPs and validation loss);
* ``finals``: one entry per model, seed and metric: a number (e.g. the final validation loss);
* ``extra``: whatever else the chapter plots (FLOPs per token, parameter counts, ...).

The chapters read the newest file of their experiment (:func:`latest`) and plot it beside the live run;
the book build never runs a full-scale experiment.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: The schema tag every results file carries; a change of the layout is a new tag.
SCHEMA = "moe-book-full-scale/1"
#: The folder (relative to the repository root) the runs are committed in.
DEFAULT_FOLDER = "full_scale"
#: What every results file records about how it was made.
PROVENANCE_FIELDS = (
    "command", "scale", "parameters", "seeds", "git_commit", "git_dirty", "cpu_model", "cpu_vendor", "cpu_threads",
    "device", "gpu", "python", "torch", "numpy", "moe_lib", "date", "wall_s",
)
TOP_FIELDS = ("schema", "experiment", "chapter", "title", "x_label", "y_label", "provenance", "curves",
              "finals", "extra")


@dataclass(frozen=True)
class Experiment:
    """One chapter's experiment as a full-scale run.

    ``run(**parameters)`` returns ``{"curves": [...], "finals": [...], "extra": {...}}``; ``defaults`` are
    its full-scale parameters (``--set name=value`` overrides one); ``quick`` the chapter's live size, for
    the smoke test and for a reader comparing the two.
    """

    key: str
    chapter: int
    title: str
    x_label: str
    y_label: str
    run: Callable[..., dict]
    defaults: Mapping[str, Any]
    quick: Mapping[str, Any] = field(default_factory=dict)


EXPERIMENTS: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    EXPERIMENTS[experiment.key] = experiment
    return experiment


# ------------------------------------------------------------------------------------------ provenance
def provenance(command: str, parameters: Mapping[str, Any], seeds: Sequence[int], wall_s: float,
               device: str = "cpu", scale: str = "full", git: Mapping[str, Any] | None = None) -> dict:
    """The :data:`PROVENANCE_FIELDS` of a run that has just finished (``scale``: "full", or "quick" for a
    smoke run at the chapter's live size; ``git``: :func:`moe_lib.utils.git_state` taken when the
    run *started*, so a commit made while it ran is not recorded as its code)."""
    import numpy

    from ..utils import git_state
    from .reproducibility import cpu_vendor, generated_on

    try:
        from importlib.metadata import version

        moe_lib_version = version("moe-lib")
    except Exception:  # noqa: BLE001 (a source checkout that is not installed)
        moe_lib_version = None
    gpu = torch.cuda.get_device_name(0) if str(device).startswith("cuda") and torch.cuda.is_available() else None
    if git is None:  # a run of the library: edited notebooks do not make it dirty
        git = git_state(paths=("moe_lib",))
    return {
        "command": command, "scale": scale, "parameters": dict(parameters), "seeds": [int(s) for s in seeds],
        "git_commit": git["git_commit"], "git_dirty": git["git_dirty"],
        "cpu_model": generated_on()["cpu_model"] or platform.processor(), "cpu_vendor": cpu_vendor(),
        "cpu_threads": torch.get_num_threads(), "device": str(device), "gpu": gpu,
        "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
        "moe_lib": moe_lib_version,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "wall_s": round(wall_s, 1),
    }


# ------------------------------------------------------------------------------------------ files
def validate(result: Mapping) -> dict:
    """Check ``result`` against :data:`SCHEMA`; returns it. ValueError naming what is missing or wrong."""
    if not isinstance(result, Mapping):
        raise ValueError(f"a full-scale result must be a JSON object, got {type(result).__name__}")
    missing = [k for k in TOP_FIELDS if k not in result]
    if missing:
        raise ValueError(f"full-scale result lacks the fields {missing}")
    if result["schema"] != SCHEMA:
        raise ValueError(f"full-scale result has schema {result['schema']!r}; this moe_lib reads {SCHEMA!r}")
    lacking = [k for k in PROVENANCE_FIELDS if k not in result["provenance"]]
    if lacking:
        raise ValueError(f"full-scale result's provenance lacks {lacking}")
    for i, curve in enumerate(result["curves"]):
        if not {"model", "seed", "x", "y"} <= set(curve):
            raise ValueError(f"curves[{i}] needs model, seed, x and y; has {sorted(curve)}")
        if len(curve["x"]) != len(curve["y"]):
            raise ValueError(f"curves[{i}] ({curve['model']}, seed {curve['seed']}): x and y differ in length")
    for i, final in enumerate(result["finals"]):
        if not {"model", "seed", "metric", "value"} <= set(final):
            raise ValueError(f"finals[{i}] needs model, seed, metric and value; has {sorted(final)}")
    seeds = set(result["provenance"]["seeds"])
    stray = {f["seed"] for f in result["finals"]} - seeds
    if stray:
        raise ValueError(f"finals name seeds {sorted(stray)} that the provenance does not list")
    return dict(result)


def load(path: str | Path) -> dict:
    """Read and :func:`validate` one results file."""
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    try:
        return validate(result)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _folder(folder: str | Path | None) -> Path:
    """``folder``, or the book's committed ``full_scale/`` (found from any working directory)."""
    if folder is not None:
        return Path(folder)
    from ..utils import book_root

    try:
        return book_root() / DEFAULT_FOLDER
    except (FileNotFoundError, RuntimeError):  # outside a checkout of the book: the working directory
        return Path(DEFAULT_FOLDER)


def files(folder: str | Path | None = None, experiment: str | None = None) -> list[Path]:
    """The results files in ``folder`` (default: the book's ``full_scale/``) of one ``experiment`` key
    (e.g. ``"ch08"``; all when None), oldest first."""
    pattern = f"{experiment}_*.json" if experiment else "*.json"
    return sorted(_folder(folder).glob(pattern))


def latest(experiment: str, folder: str | Path | None = None) -> dict:
    """The newest results file of ``experiment`` (by its recorded date) in ``folder`` (default: the book's
    ``full_scale/``); FileNotFoundError saying how to make one if there is none."""
    folder = _folder(folder)
    found = [load(p) for p in files(folder, experiment)]
    if not found:
        raise FileNotFoundError(f"no full-scale results of {experiment!r} in {Path(folder).resolve()} "
                                f"(run: python -m moe_lib.book.full_scale {experiment})")
    return max(found, key=lambda r: r["provenance"]["date"])


def finals(result: Mapping, metric: str) -> dict[str, list[float]]:
    """``{model: [value per seed, in seed order]}`` of one ``metric`` of a result (for moe_lib.stats)."""
    rows = [f for f in result["finals"] if f["metric"] == metric]
    if not rows:
        known = sorted({f["metric"] for f in result["finals"]})
        raise ValueError(f"metric must be one of {known}, got {metric!r}")
    out: dict[str, list[float]] = {}
    for row in sorted(rows, key=lambda r: r["seed"]):
        out.setdefault(row["model"], []).append(float(row["value"]))
    return out


def curves(result: Mapping) -> dict[str, tuple[list[float], list[list[float]]]]:
    """``{model: (x, [y per seed])}``; the seeds of a model share one ``x``."""
    out: dict[str, tuple[list[float], list[list[float]]]] = {}
    for curve in sorted(result["curves"], key=lambda c: c["seed"]):
        x, ys = out.setdefault(curve["model"], (list(curve["x"]), []))
        if list(curve["x"]) != x:
            raise ValueError(f"the seeds of {curve['model']!r} were measured at different x")
        ys.append(list(curve["y"]))
    return out


def first_below(result: Mapping, reference: str) -> dict[str, list[float]]:
    """For every model but ``reference`` and every seed (in seed order): the first ``x`` (the model's own)
    from which the model's ``y`` is below the ``reference``'s ``y`` of the same seed at every later
    measurement too (a lasting crossing: for a loss, the model has overtaken the reference), or ``nan`` if
    it never has by the end. Points are paired by their index (e.g. the same training step; the models'
    FLOPs at that step may differ slightly), so both need the same number of points and seeds."""
    all_curves = curves(result)
    if reference not in all_curves:
        raise ValueError(f"reference must be one of {sorted(all_curves)}, got {reference!r}")
    ref_x, ref_ys = all_curves[reference]
    out: dict[str, list[float]] = {}
    for name, (x, ys) in all_curves.items():
        if name == reference:
            continue
        if len(x) != len(ref_x) or len(ys) != len(ref_ys):
            raise ValueError(f"{name!r} and {reference!r} were not measured at as many points and seeds")
        found = []
        for y, ref_y in zip(ys, ref_ys):
            below = [a < b for a, b in zip(y, ref_y)]
            start = len(below)
            while start > 0 and below[start - 1]:
                start -= 1
            found.append(float(x[start]) if start < len(below) else float("nan"))
        out[name] = found
    return out


def lm_speedups(result: Mapping, reference: str = "dense") -> dict[str, list[float]]:
    """Chapter 8's step-basis speed-up (:func:`moe_lib.models.comparison.speedups`, Fedus et al. 2022,
    Figure 4 right) from a results file of ``ch08``: per seed, the steps ``reference`` needs to reach its own
    final validation loss divided by the steps each model needs to reach it (interpolated between
    evaluations; ``nan`` where a model never does). The curves are handed to the chapter's own function."""
    from ..models.comparison import SeedRun, speedups
    from ..models.lm_training import LMHistory

    steps = list(result["extra"]["eval_steps"])
    seeds = result["provenance"]["seeds"]
    runs = {name: [SeedRun(name, seed, LMHistory(eval_step=steps, val_loss=list(y)), y[-1], 0.0)
                   for seed, y in zip(seeds, ys)]
            for name, (_, ys) in curves(result).items()}
    return speedups(runs, reference)


def label(result: Mapping) -> str:
    """One line saying where and when a result was made, for a figure title or a table caption."""
    p = result["provenance"]
    where = p["gpu"] or f"{p['cpu_model']}, {p['cpu_threads']} thread{'s' if p['cpu_threads'] != 1 else ''}"
    return (f"{p['scale']} scale, {len(p['seeds'])} seeds, {where}, {p['date'][:10]}, "
            f"{p['wall_s'] / 60:.0f} min, commit {str(p['git_commit'])[:7]}")


def plot_curves(result: Mapping, ax, *, x_scale: float = 1.0, models: Sequence[str] | None = None) -> None:
    """Mean and 95 % band per model, each seed thin (as the chapters plot their live runs)."""
    import numpy as np

    from .plot import mean_band

    for name, (x, ys) in curves(result).items():
        if models is not None and name not in models:
            continue
        xs = np.asarray(x, dtype=float) * x_scale
        line = mean_band(ax, xs, ys, label=name, marker="o", ms=2, alpha=0.12)
        for y in ys:
            ax.plot(xs, y, color=line.get_color(), lw=0.6, alpha=0.5)
    ax.set(xlabel=result["x_label"], ylabel=result["y_label"])


# ------------------------------------------------------------------------------------------ running
def _coerce(name: str, text: str, default: Any) -> Any:
    """``--set name=text`` as the type of the default (lists as JSON)."""
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if isinstance(default, (list, tuple, dict)) or default is None:
            return json.loads(text)
        return type(default)(text)
    except ValueError:
        raise ValueError(f"--set {name}={text!r}: expected a value like {default!r}") from None


def run(key: str, overrides: Mapping[str, Any] | None = None, *, out: str | Path | None = None,
        command: str | None = None, quick: bool = False) -> Path:
    """Run experiment ``key`` with its full-scale defaults (or its quick size) updated by ``overrides``,
    write the results file into ``out`` (default: the book's ``full_scale/``) and return its path."""
    if key not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {sorted(EXPERIMENTS)}, got {key!r}")
    exp = EXPERIMENTS[key]
    parameters = dict(exp.defaults)
    if quick:
        parameters.update(exp.quick)
    unknown = sorted(set(overrides or {}) - set(parameters))
    if unknown:
        raise ValueError(f"{key} has no parameter {unknown}; its parameters are {sorted(parameters)}")
    parameters.update(overrides or {})
    seeds = list(range(parameters["seed"], parameters["seed"] + parameters["seeds"]))
    from ..utils import git_state

    git = git_state(paths=("moe_lib",))  # the code that runs: taken before it runs
    start = time.perf_counter()
    measured = exp.run(**parameters)
    wall = time.perf_counter() - start
    result = {
        "schema": SCHEMA, "experiment": key, "chapter": exp.chapter, "title": exp.title,
        "x_label": exp.x_label, "y_label": exp.y_label,
        "provenance": provenance(command or f"python -m moe_lib.book.full_scale {key}", parameters, seeds, wall,
                                 parameters.get("device", "cpu"), "quick" if quick else "full", git),
        "curves": measured["curves"], "finals": measured["finals"], "extra": measured.get("extra", {}),
    }
    validate(result)
    folder = _folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = result["provenance"]["date"][:19].replace(":", "").replace("-", "")
    path = folder / f"{key}_{stamp}.json"
    n = 1
    while path.exists():  # never overwrite a run
        n += 1
        path = folder / f"{key}_{stamp}_{n}.json"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, allow_nan=True)
        f.write("\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_lib.book.full_scale", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", help="an experiment key (--list shows them)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override one parameter (repeatable)")
    parser.add_argument("--out", default=None, help=f"folder of the results files (the book's {DEFAULT_FOLDER}/)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the book's profile)")
    parser.add_argument("--quick", action="store_true", help="the chapter's live size (a smoke run)")
    parser.add_argument("--list", action="store_true", help="list the experiments and their parameters")
    args = parser.parse_args(argv)
    if args.list or not args.experiment:
        for key, exp in sorted(EXPERIMENTS.items()):
            print(f"{key}: chapter {exp.chapter}, {exp.title}\n    full scale: {dict(exp.defaults)}")
        return 0
    if args.experiment not in EXPERIMENTS:
        parser.error(f"experiment must be one of {sorted(EXPERIMENTS)}, got {args.experiment!r}")
    exp = EXPERIMENTS[args.experiment]
    base = {**exp.defaults, **(exp.quick if args.quick else {})}
    overrides = {}
    for item in args.set:
        name, sep, text = item.partition("=")
        if not sep or name not in base:
            parser.error(f"--set needs NAME=VALUE with NAME one of {sorted(base)}, got {item!r}")
        overrides[name] = _coerce(name, text, base[name])
    torch.set_num_threads(args.threads)
    command = "python -m moe_lib.book.full_scale " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    path = run(args.experiment, overrides, out=args.out, command=command, quick=args.quick)
    result = load(path)
    print(f"{path}: {label(result)}")
    return 0


# ------------------------------------------------------------------------------------------ experiments
def _lm_scaling(*, seed: int, seeds: int, steps: int, batch_size: int, seq_len: int, d_model: int,
                n_layers: int, d_ff: int, num_experts: int, eval_windows: int | None, eval_every: int,
                backend: str, device: str) -> dict:
    """Chapter 8: dense, Switch, top-2 and fine-grained + shared experts at equal active parameters
    (``moe_lib.models.lm_variants``), trained on the same batches per seed; validation loss against
    training FLOPs (3 × the counted forward FLOPs per token × the tokens seen)."""
    from .corpus import stdlib_corpus
    from ..models import TransformerLM, flops_per_token, lm_variants, parameter_counts
    from ..models.comparison import train_over_seeds

    corpus = stdlib_corpus()
    configs = lm_variants(d_model=d_model, n_layers=n_layers, seq_len=seq_len, d_ff=d_ff,
                          num_experts=num_experts, backend=backend)
    flops, params = {}, {}
    for name, cfg in configs.items():
        model = TransformerLM(cfg)
        flops[name] = flops_per_token(model)
        params[name] = parameter_counts(model)
    runs = train_over_seeds(configs, corpus.train, corpus.val, seeds=range(seed, seed + seeds), steps=steps,
                            batch_size=batch_size, eval_every=eval_every, eval_windows=eval_windows,
                            device=device)
    tokens_per_step = batch_size * seq_len
    curves_, finals_ = [], []
    for name, seed_runs in runs.items():
        for r in seed_runs:
            curves_.append({"model": name, "seed": r.seed,
                            "x": [3 * flops[name] * tokens_per_step * s for s in r.history.eval_step],
                            "y": [float(v) for v in r.history.val_loss]})
            finals_ += [{"model": name, "seed": r.seed, "metric": "final_val_loss", "value": float(r.final_loss)},
                        {"model": name, "seed": r.seed, "metric": "train_seconds", "value": r.train_seconds}]
    return {"curves": curves_, "finals": finals_,
            "extra": {"flops_per_token": flops, "parameters": params, "tokens_per_step": tokens_per_step,
                      "eval_steps": list(runs["dense"][0].history.eval_step)}}


register(Experiment(
    key="ch08", chapter=8, title="MoE language models vs dense at equal active parameters",
    x_label="training FLOPs (3 × forward FLOPs/token × tokens)", y_label="validation loss (nats/byte)",
    run=_lm_scaling,
    defaults=dict(seed=0, seeds=3, steps=2000, batch_size=16, seq_len=64, d_model=64, n_layers=2, d_ff=128,
                  num_experts=8, eval_windows=256, eval_every=100, backend="loop", device="cpu"),
    quick=dict(seeds=1, steps=30, eval_every=10, eval_windows=16),
))



def _router_stability(*, seed: int, seeds: int, n_train: int, steps: int, lrs: list, d_model: int, d_ff: int,
                      num_experts: int, device: str) -> dict:
    """Chapter 6: a top-1 (Switch) router trained at learning rates up to 100× the chapter's default, with a
    float32 router, a bfloat16 router, and float32 plus ST-MoE's z-loss (Zoph et al. 2022, eq. 5;
    c_z = 0.001): does any run degrade, and does the z-loss rescue it? One curve per variant and seed: test
    accuracy against the learning rate; finals per (variant @ lr, seed): accuracy, test loss, the largest
    router logit of training and the mean training loss of the last 50 steps."""
    import numpy as np

    from .tasks import multi_domain_task, train_over_seeds

    train = multi_domain_task(n_train, seed=seed)
    test = multi_domain_task(4096, seed=seed + 1000)
    variants = {"float32 router": {}, "bfloat16 router": {"router_dtype": "bfloat16"},
                "float32 + z-loss 0.001": {"z_loss_coef": 0.001}}
    seed_list = list(range(seed, seed + seeds))
    acc: dict[str, dict[int, list[float]]] = {v: {s: [] for s in seed_list} for v in variants}
    finals_ = []
    for lr in lrs:
        for variant, extra in variants.items():
            run = train_over_seeds(train, test, seeds=seed_list, router="switch", aux_loss_coef=0.01, lr=lr,
                                   steps=steps, num_experts=num_experts, d_model=d_model, d_ff=d_ff, expert="mlp",
                                   device=device, keep_models=False, **extra)
            for i, s in enumerate(run.seeds):
                h = run.histories[i]
                values = {"accuracy": run["accuracy"].values[i], "test_loss": run["loss"].values[i],
                          "max_logit": float(np.nanmax(h.max_logit)) if len(h.max_logit) else float("nan"),
                          "final_train_loss": float(np.mean(h.train_loss[-50:]))}
                finals_ += [{"model": f"{variant} @ lr {lr:g}", "seed": s, "metric": m, "value": float(v)}
                            for m, v in values.items()]
                acc[variant][s].append(float(run["accuracy"].values[i]))
    curves_ = [{"model": v, "seed": s, "x": [float(lr) for lr in lrs], "y": ys}
               for v, by_seed in acc.items() for s, ys in by_seed.items()]
    return {"curves": curves_, "finals": finals_, "extra": {"variants": list(variants), "lrs": list(lrs),
                                                           "chapter_default_lr": 3e-3, "chapter_high_lr": 3e-2}}


register(Experiment(
    key="ch06", chapter=6, title="Router stability at high learning rates: float32, bfloat16, z-loss",
    x_label="learning rate (Adam)", y_label="test accuracy", run=_router_stability,
    defaults=dict(seed=0, seeds=5, n_train=32768, steps=1500, lrs=[0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
                  d_model=32, d_ff=32, num_experts=8, device="cpu"),
    quick=dict(seeds=2, n_train=1024, steps=20, lrs=[0.003, 1.0]),
))


def _finetune_overfit(*, seed: int, seeds: int, pretrain_steps: int, finetune_steps: int, eval_every: int,
                      batch_size: int, seq_len: int, d_model: int, d_ff: int, num_experts: int, lr: float,
                      device: str) -> dict:
    """Chapter 15: pre-train a dense and a top-2 MoE language model of equal active size
    (``lm_variants``) on the general corpus, then fine-tune each (all parameters) on the small task corpus
    for many passes, measuring the training and held-out loss as it goes (ST-MoE, Zoph et al. 2022, §4.1:
    sparse models overfit small tasks more). Curves: held-out loss against fine-tuning step (the training
    loss on the same steps in ``train``); finals: final and best held-out loss, final gap."""
    from .corpus import stdlib_corpus
    from ..models import TransformerLM, evaluate_lm, lm_variants, train_lm
    from ..practice import finetune_lm
    from ..utils import seed_everything

    general = stdlib_corpus()
    task = stdlib_corpus(["json/decoder.py", "json/encoder.py", "json/scanner.py"])
    configs = lm_variants(d_model=d_model, n_layers=2, seq_len=seq_len, d_ff=d_ff, num_experts=num_experts)
    curves_, finals_ = [], []
    for s in range(seed, seed + seeds):
        for name in ("dense", "top-2"):
            seed_everything(s)
            model = TransformerLM(configs[name]).to(device)
            train_lm(model, general.train.to(device), steps=pretrain_steps, batch_size=batch_size, seed=s,
                     progress=False)
            steps_, tr, va = [], [], []

            def record(step, m, steps_=steps_, tr=tr, va=va):
                if step == 0:
                    return
                steps_.append(step)
                tr.append(float(evaluate_lm(m, task.train.to(device))["loss"]))
                va.append(float(evaluate_lm(m, task.val.to(device))["loss"]))
                m.train()

            seed_everything(s)
            finetune_lm(model, task.train.to(device), task.val.to(device), steps=finetune_steps,
                        batch_size=batch_size // 2, seed=s, lr=lr, eval_every=eval_every, callback=record)
            curves_.append({"model": name, "seed": s, "x": steps_, "y": va, "train": tr})
            best = min(range(len(va)), key=va.__getitem__)
            finals_ += [{"model": name, "seed": s, "metric": m, "value": v} for m, v in {
                "final_val_loss": va[-1], "final_train_loss": tr[-1], "final_gap": va[-1] - tr[-1],
                "best_val_loss": va[best], "best_step": float(steps_[best]),
                "overfit": va[-1] - va[best]}.items()]
    task_bytes = int(task.train.numel())
    return {"curves": curves_, "finals": finals_,
            "extra": {"task_train_bytes": task_bytes, "task_val_bytes": int(task.val.numel()),
                      "passes_over_task": finetune_steps * (batch_size // 2) * seq_len / task_bytes}}


register(Experiment(
    key="ch15", chapter=15, title="Fine-tuning on a small task: does the MoE overfit more than dense?",
    x_label="fine-tuning step", y_label="held-out task loss (nats/byte)", run=_finetune_overfit,
    defaults=dict(seed=0, seeds=5, pretrain_steps=300, finetune_steps=1500, eval_every=100, batch_size=16,
                  seq_len=32, d_model=64, d_ff=128, num_experts=8, lr=1e-3, device="cpu"),
    quick=dict(seeds=1, pretrain_steps=10, finetune_steps=20, eval_every=10),
))


def _mmoe_correlation(*, seed: int, seeds: int, n_train: int, steps: int, correlations: list, num_experts: int,
                      expert_hidden: int, tower_hidden: int, lr: float, device: str) -> dict:
    """Chapter 17: shared-bottom, OMoE and MMoE (Ma et al. 2018, eq. 1, 5-7) on the paper's synthetic task
    pairs (§3.2) at several task correlations, with the paper's expert count and width; the shared bottom's
    width is chosen to match MMoE's parameter count (as the paper's 113 units did). Curves: relative test
    error against correlation per task draw; finals per (model, draw): the error at each correlation and the
    gap between the lowest and highest correlation."""
    from ..applications import MMoE, OMoE, SharedBottom, num_parameters, relative_error_run

    mmoe = lambda: MMoE(100, num_experts, expert_hidden, expert_hidden, tower_hidden)  # noqa: E731
    target = num_parameters(mmoe())
    width = next(w for w in range(1, 4096) if num_parameters(SharedBottom(100, w, tower_hidden)) >= target)
    makers = {"shared-bottom": lambda: SharedBottom(100, width, tower_hidden),
              "OMoE (one gate)": lambda: OMoE(100, num_experts, expert_hidden, expert_hidden, tower_hidden),
              "MMoE (one gate per task)": mmoe}
    curves_, finals_ = [], []
    low, high = min(correlations), max(correlations)
    for name, make in makers.items():
        for s in range(seed, seed + seeds):
            errors = [float(relative_error_run(make, p, s, n_train=n_train, steps=steps, lr=lr, device=device))
                      for p in correlations]
            curves_.append({"model": name, "seed": s, "x": [float(p) for p in correlations], "y": errors})
            finals_ += [{"model": name, "seed": s, "metric": f"error_p{p:g}", "value": e}
                        for p, e in zip(correlations, errors)]
            by_p = dict(zip(correlations, errors))
            finals_.append({"model": name, "seed": s, "metric": "gap", "value": by_p[low] - by_p[high]})
    return {"curves": curves_, "finals": finals_,
            "extra": {"parameters": {name: num_parameters(make()) for name, make in makers.items()},
                      "shared_bottom_width": width}}


register(Experiment(
    key="ch17", chapter=17, title="MMoE, OMoE and shared-bottom as the tasks decorrelate",
    x_label="task correlation p", y_label="relative test error (MSE / label variance)", run=_mmoe_correlation,
    defaults=dict(seed=0, seeds=20, n_train=8000, steps=1000, correlations=[1.0, 0.9, 0.7, 0.5],
                  num_experts=8, expert_hidden=16, tower_hidden=8, lr=1e-2, device="cpu"),
    quick=dict(seeds=2, n_train=256, steps=10, correlations=[1.0, 0.5]),
))

if __name__ == "__main__":
    sys.exit(main())
