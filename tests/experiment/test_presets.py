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
            "generalist_amount", "paraphrase", "human_vs_machine", "self_specialization_biomed"} <= names  # fmt: skip


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
