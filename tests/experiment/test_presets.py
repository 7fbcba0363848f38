"""Every shipped experiment preset validates, expands, and (where cheap) plans against the real data."""

from __future__ import annotations

from pathlib import Path

import pytest

from specialize.experiment.config import expand, load_experiment
from specialize.experiment.runner import plan

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "experiments").glob("*.yaml"))


def test_every_study_of_the_issue_has_a_preset():
    names = {p.stem for p in PRESETS}
    assert {"coverage_superni", "coverage_classification", "coverage_sentiment", "coverage_yelp", "skills",
            "generalist_amount", "paraphrase", "human_vs_machine", "self_specialization_biomed",
            "self_specialization_finance"} <= names  # fmt: skip


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_validates_and_states_its_scale(path: Path, shared_data: Path):
    cfg = load_experiment(path, [f"data_root={shared_data}"])
    assert cfg.scale_note and cfg.description
    runs = expand(cfg)
    assert runs or cfg.synth
    assert "{data_root}" not in str(cfg.model_dump())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["skills", "human_vs_machine", "generalist_amount", "coverage_yelp"])
def test_preset_plans_against_the_real_data(name: str, shared_data: Path):
    out = ROOT / "runs" / "never-written"
    cfg = load_experiment(ROOT / "experiments" / f"{name}.yaml",
                          [f"data_root={shared_data}", f"output_dir={out}", f"cache_dir={out}"])  # fmt: skip
    rows = plan(cfg)
    assert len(rows) == len(expand(cfg))
    for r in rows:
        assert all(s["examples"] > 0 for s in r["stages"])
    assert not (ROOT / "runs" / "never-written").exists()


@pytest.mark.slow
def test_presets_share_their_common_stages_through_one_cache(shared_data: Path, tmp_path: Path):
    # the LIMA stage and the specialist stage after it are the same content in two studies: one directory each
    dirs = {}
    for name in ("skills", "human_vs_machine"):
        cfg = load_experiment(ROOT / "experiments" / f"{name}.yaml", [f"data_root={shared_data}"])
        assert cfg.cache_dir == "runs/cache"
        cfg = cfg.model_copy(update={"cache_dir": str(tmp_path), "output_dir": str(tmp_path / name)})
        dirs[name] = {s["dir"] for r in plan(cfg) if r["run"].startswith("lima-") for s in r["stages"]}
    shared = dirs["skills"] & dirs["human_vs_machine"]
    assert len(shared) == 1 and Path(next(iter(shared))).name.startswith("generalist-")


def test_finance_preset_seeds_come_from_training_parts_and_are_the_demonstrations(shared_data: Path):
    """Kang et al.'s finance protocol: 90 seeds from the benchmarks' training parts, evaluation on the disjoint
    held-out parts, the seeds doubling as the k-shot demonstrations, F1 as the compared metric."""
    from specialize.eval.tasks import load_task_spec, load_tasks
    from specialize.synth.pipeline import SynthConfig, load_seeds

    cfg = load_experiment(ROOT / "experiments" / "self_specialization_finance.yaml", [f"data_root={shared_data}"])
    sc = SynthConfig.model_validate(cfg.synth)
    assert sc.retrieval == "none" and sc.corpus is None
    seeds = load_seeds(sc)
    assert len(seeds) == 90 and load_seeds(sc) == seeds  # deterministic
    seed_text = {e.input for e in seeds}
    by_source = {}
    for t in cfg.eval.tasks:
        spec = load_task_spec(t, cfg.data_root, {"limit": cfg.eval.limit})
        [task] = load_tasks(spec)
        assert len(task.examples) == 100
        assert not {e.input for e in task.examples} & seed_text  # nothing evaluated was a seed
        if spec.protocol == "generation":
            assert spec.primary_metric == "token_f1" and "rouge_l" in spec.metric_names
            by_source[task.examples[0].source] = task.demos
    assert sorted(by_source) == ["fiqa-sa", "fpb", "semeval17-headlines"]
    assert [d for s in ("fpb", "fiqa-sa", "semeval17-headlines") for d in by_source[s]] == seeds
