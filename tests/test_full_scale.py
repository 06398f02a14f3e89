"""Full-scale results (``moe_lib.book.full_scale``, issue 14): every committed results file loads, carries its
provenance and the schema the chapters read; each experiment still runs (at its quick size, a few seconds);
bad input is refused with a message naming the argument."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from moe_lib.book import full_scale as fs

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = fs.files(ROOT / fs.DEFAULT_FOLDER)
#: What the chapters read from each experiment's newest file (metric names of ``finals``).
CHAPTER_READS = {
    "ch06": {"accuracy", "test_loss", "max_logit", "final_train_loss"},
    "ch08": {"final_val_loss", "train_seconds"},
    "ch15": {"final_val_loss", "final_train_loss", "final_gap", "best_val_loss", "best_step", "overfit"},
    "ch17": {"gap"},
}


def test_every_chapter_that_shows_a_full_scale_run_has_one_committed():
    committed = {p.name.split("_", 1)[0] for p in COMMITTED}
    assert set(CHAPTER_READS) <= committed, f"missing full-scale results for {sorted(set(CHAPTER_READS) - committed)}"


@pytest.mark.parametrize("path", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_file_loads_with_provenance_and_the_schema_chapters_read(path):
    result = fs.load(path)
    assert path.name.startswith(result["experiment"] + "_")
    assert result["experiment"] in fs.EXPERIMENTS
    exp = fs.EXPERIMENTS[result["experiment"]]
    assert result["chapter"] == exp.chapter
    prov = result["provenance"]
    assert prov["scale"] == "full", "a committed file is a full-scale run, not a smoke run"
    assert set(prov["parameters"]) == set(exp.defaults), "the run's parameters are the experiment's"
    assert prov["seeds"] == list(range(prov["parameters"]["seed"], prov["parameters"]["seed"] + prov["parameters"]["seeds"]))
    assert prov["git_commit"] and len(prov["git_commit"]) == 40
    assert prov["git_dirty"] is False, "a committed run was made from committed library code"
    assert prov["wall_s"] > 0 and prov["date"].startswith("20")
    metrics = {f["metric"] for f in result["finals"]}
    assert CHAPTER_READS[result["experiment"]] <= metrics
    for metric in metrics:
        values = fs.finals(result, metric)
        assert all(len(v) == len(prov["seeds"]) for v in values.values()), f"{metric}: one value per seed"
    for name, (x, ys) in fs.curves(result).items():
        assert len(ys) == len(prov["seeds"]) and all(len(y) == len(x) for y in ys), name
    assert fs.label(result).startswith("full scale")


@pytest.mark.parametrize("key", sorted(fs.EXPERIMENTS))
def test_each_experiment_runs_at_its_quick_size(key, tmp_path):
    path = fs.run(key, out=tmp_path, quick=True)
    result = fs.load(path)
    assert result["provenance"]["scale"] == "quick"
    assert CHAPTER_READS[key] <= {f["metric"] for f in result["finals"]}
    assert all(math.isfinite(v) for c in result["curves"] for v in c["y"])
    assert fs.run(key, out=tmp_path, quick=True) != path, "a second run is a new file, never an overwrite"


@pytest.fixture(scope="module")
def quick_ch17(tmp_path_factory):
    return fs.load(fs.run("ch17", {"steps": 3}, out=tmp_path_factory.mktemp("quick"), quick=True))


def test_latest_picks_the_newest_and_says_how_to_make_one(tmp_path, quick_ch17):
    with pytest.raises(FileNotFoundError, match="python -m moe_lib.book.full_scale ch08"):
        fs.latest("ch08", tmp_path)
    old = quick_ch17
    (tmp_path / "ch17_20000101T000000.json").write_text(json.dumps(old))
    newer = dict(old, provenance={**old["provenance"], "date": "2999-01-01T00:00:00+00:00"})
    (tmp_path / "ch17_29990101T000000.json").write_text(json.dumps(newer))
    assert fs.latest("ch17", tmp_path)["provenance"]["date"].startswith("2999")


def test_bad_files_and_arguments_are_refused_by_name(tmp_path, quick_ch17):
    good = quick_ch17
    with pytest.raises(ValueError, match="lacks the fields"):
        fs.validate({k: v for k, v in good.items() if k != "provenance"})
    with pytest.raises(ValueError, match="provenance lacks .*git_commit"):
        fs.validate({**good, "provenance": {k: v for k, v in good["provenance"].items() if k != "git_commit"}})
    with pytest.raises(ValueError, match="schema"):
        fs.validate({**good, "schema": "other/0"})
    broken = dict(good, curves=[{**good["curves"][0], "y": good["curves"][0]["y"][:-1]}])
    with pytest.raises(ValueError, match="x and y differ"):
        fs.validate(broken)
    with pytest.raises(ValueError, match="seeds .* that the provenance does not list"):
        fs.validate({**good, "finals": [{**good["finals"][0], "seed": 999}]})
    with pytest.raises(ValueError, match="metric must be one of"):
        fs.finals(good, "accuracy")
    with pytest.raises(ValueError, match="experiment must be one of"):
        fs.run("ch99", out=tmp_path)
    with pytest.raises(ValueError, match="has no parameter \\['stepz'\\]"):
        fs.run("ch17", {"stepz": 1}, out=tmp_path)
    with pytest.raises(SystemExit):
        fs.main(["ch17", "--set", "steps"])
    with pytest.raises(ValueError, match="--set steps='ten'"):
        fs._coerce("steps", "ten", 10)
    assert fs._coerce("correlations", "[1, 0.5]", [1.0]) == [1, 0.5]
    assert fs._coerce("quick", "false", True) is False


def test_cli_lists_and_writes(tmp_path, capsys):
    assert fs.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(key in listed for key in fs.EXPERIMENTS)
    assert fs.main(["ch17", "--quick", "--set", "steps=3", "--out", str(tmp_path)]) == 0
    (path,) = fs.files(tmp_path, "ch17")
    result = fs.load(path)
    assert result["provenance"]["parameters"]["steps"] == 3
    assert "--set steps=3" in result["provenance"]["command"]


def _synthetic(curves_by_model):
    """A minimal valid result with the given ``{model: [y per seed]}`` at x = 1, 2, 3, ..."""
    seeds = len(next(iter(curves_by_model.values())))
    prov = {k: None for k in fs.PROVENANCE_FIELDS}
    prov.update(seeds=list(range(seeds)), scale="quick")
    curves = [{"model": m, "seed": s, "x": list(range(1, len(y) + 1)), "y": y}
              for m, ys in curves_by_model.items() for s, y in enumerate(ys)]
    return fs.validate({"schema": fs.SCHEMA, "experiment": "ch08", "chapter": 8, "title": "t", "x_label": "x",
                        "y_label": "y", "provenance": prov, "curves": curves, "finals": [], "extra": {}})


def test_first_below_is_a_lasting_crossing_per_seed():
    result = _synthetic({
        "dense": [[3.0, 2.0, 1.5, 1.4], [3.0, 2.0, 1.5, 1.4]],
        "moe": [[3.5, 1.9, 1.6, 1.3],   # below at x=2, above at 3, below from x=4 on: crosses at 4
                [2.9, 1.9, 1.4, 1.3]],  # below everywhere: crosses at 1
        "slow": [[3.1, 2.1, 1.6, 1.5], [3.1, 2.1, 1.6, 1.4]],  # never below (equal is not below)
    })
    got = fs.first_below(result, "dense")
    assert got["moe"] == [4.0, 1.0]
    assert all(math.isnan(v) for v in got["slow"])
    assert set(got) == {"moe", "slow"}
    with pytest.raises(ValueError, match="reference must be one of \\['dense', 'moe', 'slow'\\]"):
        fs.first_below(result, "switch")
    # points pair by index (the same step), and the model's own x is reported (its FLOPs may differ)
    for curve in result["curves"]:
        if curve["model"] == "moe":
            curve["x"] = [10 * v for v in curve["x"]]
    assert fs.first_below(result, "dense")["moe"] == [40.0, 10.0]
    result["curves"] = [c if c["model"] != "slow" else {**c, "x": c["x"][:3], "y": c["y"][:3]}
                        for c in result["curves"]]
    with pytest.raises(ValueError, match="'slow' and 'dense' were not measured at as many points"):
        fs.first_below(result, "dense")


def test_curves_refuse_seeds_measured_at_different_x():
    result = _synthetic({"dense": [[1.0, 2.0], [1.0, 2.0]]})
    result["curves"][1]["x"] = [1, 5]
    with pytest.raises(ValueError, match="seeds of 'dense' were measured at different x"):
        fs.curves(result)


def test_default_folder_is_the_books_full_scale_folder():
    assert fs._folder(None) == ROOT / fs.DEFAULT_FOLDER
    assert fs.files() == COMMITTED


def test_lm_speedups_match_the_chapters_step_basis_speedup():
    from moe_lib.models.comparison import SeedRun, speedups
    from moe_lib.models.lm_training import LMHistory

    result = _synthetic({"dense": [[3.0, 2.0, 1.5, 1.4], [3.0, 2.5, 2.0, 1.8]],
                         "moe": [[2.9, 1.8, 1.4, 1.2], [3.1, 2.9, 2.6, 2.4]]})
    result["extra"]["eval_steps"] = [100, 200, 300, 400]
    got = fs.lm_speedups(result, "dense")
    # seed 0: dense reaches 1.4 at step 400; the MoE passes it between 200 (1.8) and 300 (1.4): step 300
    assert got["moe"][0] == pytest.approx(400 / 300) and got["dense"] == [1.0, 1.0]
    assert math.isnan(got["moe"][1])  # never reaches 1.8
    runs = {name: [SeedRun(name, s, LMHistory(eval_step=[100, 200, 300, 400], val_loss=y), y[-1], 0.0)
                   for s, y in enumerate(ys)] for name, (_, ys) in fs.curves(result).items()}
    expected = speedups(runs, "dense")
    assert got["moe"][0] == expected["moe"][0] and math.isnan(expected["moe"][1])
