"""The experiment runner on the tiny model and the shipped example data: grid expansion, caching, resume,
results store, report (rendered by headless Chromium)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from specialize.experiment.config import ExperimentConfig, expand, load_experiment
from specialize.experiment.quickstart import examples_dir
from specialize.experiment.report import render
from specialize.experiment.runner import cache_lock, evaluation_ids, plan, run_experiment, train_config
from specialize.train.sft import TrainConfigError, prepare_stages


def experiment(tiny_model_dir: Path, out: Path, **changes) -> dict:
    ex = examples_dir()
    cfg = {
        "name": "tiny", "models": [{"spec": str(tiny_model_dir), "threads": 1}], "method": "lora",
        "data_root": str(ex), "output_dir": str(out),
        "generalists": [None, {"name": "gen", "sources": [{"path": "{data_root}/generalist.jsonl", "amount": 8}]}],
        "specialist": [{"path": "{data_root}/product_reviews.jsonl"}, {"path": "{data_root}/movie_reviews.jsonl"}],
        "amounts": [0, 8, 16], "seeds": [0],
        "generalist_stage": {"epochs": 1, "batch_size": 4, "micro_batch_size": 4, "lr": 1e-3, "max_length": 64},
        "specialist_stage": {"epochs": 1, "batch_size": 4, "micro_batch_size": 4, "lr": 1e-3, "max_length": 64},
        "eval": {"tasks": [{"name": "hotel", "data": {"path": "{data_root}/hotel_reviews.jsonl"}, "protocol": "options",
                            "options_from": "task", "limit": 12}], "bootstrap_resamples": 100},
    }  # fmt: skip
    cfg.update(changes)
    return cfg


def write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def scores(out: Path) -> list[tuple]:
    db = sqlite3.connect(out / "results.sqlite")
    return sorted(db.execute("SELECT run_id, task, metric, mean, ci_low, ci_high, n FROM scores").fetchall())


def test_grid_expands_generalist_x_amount_x_model_x_seed(tiny_model_dir, tmp_path):
    cfg = ExperimentConfig.model_validate(experiment(tiny_model_dir, tmp_path, seeds=[0, 1],
                                                     models=[{"spec": "a"}, {"spec": "b"}]))  # fmt: skip
    runs = expand(cfg)
    # 2 generalist options x 3 amounts x 2 models x 2 seeds, minus (no generalist, amount 0) = the base model
    assert len(runs) == (2 * 3 - 1) * 2 * 2
    ids = {r.run_id(cfg) for r in runs}
    assert "m1-gen-n16-s1" in ids and "m0-none-n8-s0" in ids and not any("none-n0" in i for i in ids)
    scaled = ExperimentConfig.model_validate(experiment(tiny_model_dir, tmp_path, scale=2.5))
    assert sorted({r.amount for r in expand(scaled)}) == [0, 20, 40]


def test_second_run_computes_nothing_and_the_plan_says_so(tiny_model_dir, tmp_path, monkeypatch):
    cfg = load_experiment(write(experiment(tiny_model_dir, tmp_path / "out"), tmp_path / "exp.yaml"))
    assert not any(s["cached"] for r in plan(cfg) for s in r["stages"])
    run_experiment(cfg)
    first = scores(tmp_path / "out")
    assert {r[0] for r in first} == {"base", "none-n8-s0", "none-n16-s0", "gen-n0-s0", "gen-n8-s0", "gen-n16-s0"}
    # the generalist stage was trained once and shared by every amount
    assert len(list((tmp_path / "out/train/stages").glob("generalist-*"))) == 1
    assert all(s["cached"] for r in plan(cfg) for s in r["stages"])

    import specialize.eval.harness as harness
    import specialize.train.sft as sft

    def fail(*a, **k):
        raise AssertionError("a cached run computed something")

    monkeypatch.setattr(harness, "evaluate", fail)
    monkeypatch.setattr(sft, "build_model", fail)
    run_experiment(cfg)
    assert scores(tmp_path / "out") == first

    # extending the grid computes only the new points
    calls = []
    monkeypatch.undo()
    real = harness.evaluate
    monkeypatch.setattr(harness, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    bigger = load_experiment(write(experiment(tiny_model_dir, tmp_path / "out", amounts=[0, 8, 16, 24]),
                                   tmp_path / "exp2.yaml"))  # fmt: skip
    run_experiment(bigger)
    assert len(calls) == 2  # none-n24 and gen-n24


def test_experiments_sharing_a_cache_reuse_each_others_stages(tiny_model_dir, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    first = load_experiment(write(experiment(tiny_model_dir, tmp_path / "a", cache_dir=cache, amounts=[0, 8]),
                                  tmp_path / "a.yaml"))  # fmt: skip
    run_experiment(first)
    assert not (tmp_path / "a/train").exists() and len(list((tmp_path / "cache/train/stages").iterdir())) == 3

    import specialize.eval.harness as harness
    import specialize.train.sft as sft

    def fail(*a, **k):
        raise AssertionError("a stage cached by another experiment was computed again")

    monkeypatch.setattr(harness, "evaluate", fail)
    monkeypatch.setattr(sft, "build_model", fail)
    gen = first.generalists[1].model_dump(mode="json")
    second = load_experiment(write(experiment(tiny_model_dir, tmp_path / "b", cache_dir=cache, generalists=[gen],
                                              amounts=[8]), tmp_path / "b.yaml"))  # fmt: skip
    run_experiment(second)
    # the second experiment's own store holds the shared runs' scores
    shared = {"base", "gen-n8-s0"}
    assert scores(tmp_path / "b") == [r for r in scores(tmp_path / "a") if r[0] in shared]
    # and their cost as first measured (training steps of every stage, evaluation), not the 0 s spent now
    timings = {out: dict((r, (t, e)) for r, t, e in sqlite3.connect(tmp_path / out / "results.sqlite").execute(
        "SELECT run_id, train_s, eval_s FROM runs")) for out in "ab"}  # fmt: skip
    assert timings["b"] == {r: timings["a"][r] for r in shared}
    train_gen, eval_gen = timings["b"]["gen-n8-s0"]
    assert train_gen > timings["a"]["gen-n0-s0"][0] > 0 and eval_gen > 0
    with cache_lock(first.cache), pytest.raises(RuntimeError, match=f"pid {os.getpid()}"):
        run_experiment(second)  # one runner per cache: a second one is refused, naming the holder


def test_report_of_a_relative_output_dir_renders_from_anywhere(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = experiment(tiny_model_dir, Path("rel/out"), cache_dir="rel/cache", amounts=[0, 8])
    run_experiment(load_experiment(write(cfg, tmp_path / "exp.yaml")))
    monkeypatch.chdir(tmp_path / "rel")
    render(tmp_path / "rel/out")  # reads every run's predictions for the findings
    report = json.loads((tmp_path / "rel/out/report.json").read_text())
    assert report["findings"] and report["findings"][0]["finding"] == "generalist-gain"
    md = (tmp_path / "rel/out/report.md").read_text()  # the same numbers as Markdown
    assert "| task | base | gen only | specialist (n=8) | specialist + gen (n=8) |" in md
    [hotel] = [r for r in report["table"]["rows"] if r["task"] == "hotel"]
    cells = " | ".join(f"{c['mean']:.1f}{'†' * c['one_answer']} [{c['low']:.1f}, {c['high']:.1f}]"
                       for c in hotel["cells"])  # fmt: skip
    assert f"| hotel ({hotel['metric']}) | {cells} |" in md
    assert f"- {report['findings'][0]['text']}" in md and "| gen | " in md


def test_specialist_mix_never_trains_on_evaluation_instances(tiny_model_dir, tmp_path):
    # the hotel task is both the specialist data (192 examples) and the test set (12 instances)
    cfg = load_experiment(write(experiment(tiny_model_dir, tmp_path / "out", generalists=[None], amounts=[180],
                                           specialist=[{"path": "{data_root}/hotel_reviews.jsonl"}]),
                                tmp_path / "exp.yaml"))  # fmt: skip
    held = evaluation_ids(cfg)
    assert len(held) == 12
    (run,) = expand(cfg)
    (stage,) = prepare_stages(train_config(cfg, run, held))
    assert len(stage.examples) == 180 and not {e.id for e in stage.examples} & set(held)
    assert stage.manifest["sources"][0]["excluded"] == 12
    with pytest.raises(TrainConfigError, match="asked for 181 examples but only 180"):
        prepare_stages(train_config(cfg, dataclasses.replace(run, amount=181), held))


def test_killed_run_resumes_to_the_same_results(tiny_model_dir, tmp_path):
    cfg = experiment(tiny_model_dir, tmp_path / "killed", amounts=[0, 24], save_every=2)
    for stage in ("generalist_stage", "specialist_stage"):
        cfg[stage] = {**cfg[stage], "batch_size": 2, "micro_batch_size": 2}
    path = write(cfg, tmp_path / "exp.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "specialize.cli", "run", str(path), "--no-report"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((tmp_path / "killed/train/stages").glob("*/checkpoints/step-*")) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed/results.sqlite").exists() or len(scores(tmp_path / "killed")) < 4
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    clean = write(
        experiment(
            tiny_model_dir,
            tmp_path / "clean",
            amounts=[0, 24],
            save_every=2,
            **{s: cfg[s] for s in ("generalist_stage", "specialist_stage")},
        ),
        tmp_path / "clean.yaml",
    )
    run_experiment(load_experiment(clean))
    assert [r[1:] for r in scores(tmp_path / "killed")] == [r[1:] for r in scores(tmp_path / "clean")]


def test_report_renders_in_chromium_with_tables_and_images(tiny_model_dir, tmp_path):
    cfg = load_experiment(write(experiment(tiny_model_dir, tmp_path / "out"), tmp_path / "exp.yaml"))
    run_experiment(cfg)
    page = render(tmp_path / "out")
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["table"]["columns"] == ["base", "gen only", "specialist (n=16)", "specialist + gen (n=16)"]
    assert len(report["findings"]) == 1 and report["findings"][0]["holds"] in (True, False)

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the report test needs Chromium (Debian package `chromium`; `make setup` installs it)"
    flags = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'chrome'}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert '<table id="results">' in dom and dom.count("<tr>") >= 8 and "hotel" in dom
    assert dom.count('src="data:image/png;base64,') == 1
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1200,1400", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20)
    assert img.size == (1200, 1400) and len(colours) > 50  # text, table borders and an anti-aliased plot
    # matplotlib's first two line colours (blue, orange) are on screen: the curve image was decoded and drawn
    near = lambda c, t: all(abs(a - b) < 40 for a, b in zip(c, t, strict=True))  # noqa: E731
    assert any(near(c, (31, 119, 180)) for _, c in colours) and any(near(c, (255, 127, 14)) for _, c in colours)


def test_report_across_experiments_has_one_row_per_experiment(tiny_model_dir, tmp_path, capsys):
    """Shi et al.'s Table 1 shape: rows are experiments (coverage levels), columns are roles."""
    from specialize.cli import main

    cache = str(tmp_path / "cache")
    ex = examples_dir()
    narrow = [{"path": f"{ex}/product_reviews.jsonl"}]
    for name, changes in (("broad", {}), ("narrow", {"specialist": narrow, "amounts": [0, 4]})):
        cfg = experiment(tiny_model_dir, tmp_path / name, cache_dir=cache, name=name, **changes)
        run_experiment(load_experiment(write(cfg, tmp_path / f"{name}.yaml")))
        render(tmp_path / name)
    assert main(["report", str(tmp_path / "broad"), str(tmp_path / "narrow")]) == 1
    assert "need --out DIR" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "broad"), str(tmp_path / "narrow"), "--out", str(tmp_path / "both")]) == 0
    both = json.loads((tmp_path / "both/report.json").read_text())
    assert both["columns"] == ["base", "gen only", "specialist", "specialist + gen"]
    assert [r["experiment"] for r in both["rows"]] == ["broad: hotel, n=16", "narrow: hotel, n=4"]
    for name, row in zip(("broad", "narrow"), both["rows"], strict=True):
        own = json.loads((tmp_path / name / "report.json").read_text())
        assert row["cells"] == own["table"]["rows"][0]["cells"]  # the experiment's own numbers, by role
        assert [f"{name}: {f['text']}" for f in own["findings"]] == [f for f in both["findings"] if f.startswith(name)]
    md = (tmp_path / "both/report.md").read_text()
    assert "| experiment | base | gen only | specialist | specialist + gen |" in md and "| narrow: hotel, n=4 (" in md


def test_table_2_variants_share_one_instruction_stage_and_iteration_two_builds_on_the_chosen_one(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Kang et al. Table 2 as one run: three retrieval variants answer one instruction set; the second iteration
    generates with the `after` variant's specialist, contrasted with the base, on that same instruction set and
    on a new one. The synth and tuning steps are recorded here; each is tested on its own elsewhere."""
    from specialize import models
    from specialize.experiment import runner

    made, tuned = [], {}

    def fake_synth(sc, progress=True):
        made.append(sc)
        Path(sc.output_dir).mkdir(parents=True, exist_ok=True)
        return Path(sc.output_dir) / "data.jsonl"

    def fake_tune(cfg, store, data, run_id, shots=None):
        tuned[run_id] = (data, shots)
        adapter = tmp_path / "adapters" / run_id
        adapter.mkdir(parents=True)
        (adapter / models.ADAPTER_WEIGHTS).write_bytes(run_id.encode())
        return adapter

    monkeypatch.setattr("specialize.synth.pipeline.run_synth", fake_synth)
    monkeypatch.setattr(runner, "_self_specialize", fake_tune)
    out = tmp_path / "exp"
    stage = {"epochs": 1, "batch_size": 4, "micro_batch_size": 4, "lr": 1e-3, "max_length": 64}
    synth = {"seeds": "seeds.json", "corpus": "corpus.jsonl", "retrieval": ["marginalize", "top1", "none"]}
    raw = experiment(tiny_model_dir, out, generalists=[None], amounts=[0], include_base=False, synth_stage=stage,
                     synth=synth, iteration2={"after": "top1"}, variant_shots=[0])  # fmt: skip
    raw["eval"] = {**raw["eval"], "shots": [0, 1]}
    run_experiment(ExperimentConfig.model_validate(raw))

    assert [(sc.retrieval, sc.iteration) for sc in made] == [
        ("marginalize", 1), ("top1", 1), ("none", 1), ("top1", 2), ("top1", 2)]  # fmt: skip
    first = made[:3]
    assert len({sc.instruction_dir for sc in first}) == 1  # one instruction stage, answered three ways
    assert first[0].instruction_dir.parent == out / "synth" and len({sc.output_dir for sc in made}) == 5
    same, new = made[3:]
    assert same.adapter == new.adapter == str(tmp_path / "adapters" / "self-spec-it1-top1")
    assert same.contrastive and new.contrastive
    assert same.instructions_from == str(out / "synth" / "it1-top1") and new.instructions_from is None
    assert new.instruction_dir not in (first[0].instruction_dir, Path(same.output_dir))  # written anew
    assert list(tuned) == ["self-spec-it1-marginalize", "self-spec-it1-top1", "self-spec-it1-none",
                           "self-spec-it2-same", "self-spec-it2-new"]  # fmt: skip
    # the first variant is evaluated at every k (Tables 1 and 4), the others at variant_shots (Table 2)
    assert [shots for _, shots in tuned.values()] == [None, [0], [0], [0], [0]]
    for bad, match in [({"variant_shots": [1, 5]}, "must be a non-empty subset of eval.shots"),
                       ({"variant_shots": [0], "iteration2": None, "synth": {**synth, "retrieval": "none"}},
                        "variant_shots needs Table 2's variants")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ExperimentConfig.model_validate({**raw, **bad})
    with pytest.raises(ValueError, match="iteration2.after: 'marginalize' is not one of"):
        ExperimentConfig.model_validate({**raw, "synth": {**raw["synth"], "retrieval": ["top1", "none"]},
                                         "iteration2": {"after": "marginalize"}})  # fmt: skip
