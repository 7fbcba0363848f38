"""The harness end to end: exact prediction counts, valid scores, aggregates, adapters, manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specialize.config import ConfigError
from specialize.eval.harness import EvalConfig, evaluate
from specialize.eval.results import Summary

QA = [("Is fire hot?", "yes"), ("Is ice hot?", "no"), ("Is snow cold?", "yes"), ("Is lava cold?", "no"),
      ("Is the sun hot?", "yes"), ("Is water dry?", "no")]  # fmt: skip


@pytest.fixture
def tiny_tasks(tmp_path: Path) -> list[dict]:
    path = tmp_path / "yn.jsonl"
    path.write_text("".join(json.dumps({"instruction": "Answer yes or no.", "input": q, "output": a,
                                        "options": ["yes", "no"]}) + "\n" for q, a in QA))  # fmt: skip
    return [
        {"name": "yn_options", "data": {"path": str(path)}, "protocol": "options", "shots": [0, 1],
         "paraphrases": ["Reply with yes or no.", "Say yes or no."]},
        {"name": "yn_generate", "data": {"path": str(path)}, "protocol": "generation", "max_new_tokens": 4,
         "metrics": ["exact_match", "rouge_l"], "limit": 4, "generate_paraphrases": 1},
    ]  # fmt: skip


@pytest.fixture
def tiny_adapter(tmp_path: Path, tiny_model_dir: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a fresh adapter is a no-op; make this one change the model
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _scripted_paraphrases(monkeypatch, texts: list[tuple[str, str]]) -> None:
    """The model's rewrites of an instruction come from `texts` (text, finish_reason); answers stay real."""
    from specialize.generation import Output
    from specialize.generation.engines import HFEngine

    real, script = HFEngine.run, iter(texts)

    def run(self, requests):
        if "Rewrite the following task instruction" in self.tokenizer.decode(requests[0].contexts[0]):
            text, finish = next(script)
            return [Output(text, (), finish)]
        return real(self, requests)

    monkeypatch.setattr(HFEngine, "run", run)


def test_counts_scores_aggregates_and_manifest(tmp_path, tiny_model_dir, tiny_tasks, tiny_adapter, monkeypatch):
    # a random-init model cannot paraphrase: script what a small real model writes, usable or not
    _scripted_paraphrases(monkeypatch, [("### Instructions:", "stop"), ("Answer yes or no.", "stop"),
                                        ("Say whether the answer is yes or", "length"), ("No", "stop"),
                                        ("Reply with either yes or no.", "stop")])  # fmt: skip
    split = tmp_path / "split.yaml"
    split.write_text("train: [yn_options]\nheldout: [yn_generate]\n")
    cfg = EvalConfig(
        model={"spec": str(tiny_model_dir), "dtype": "float32"}, adapters={"tuned": str(tiny_adapter)},
        tasks=tiny_tasks, output_dir=str(tmp_path / "out"), split_file=str(split), bootstrap_resamples=200,
    )  # fmt: skip
    returned = evaluate(cfg, progress=False)
    summary = json.loads((tmp_path / "out/summary.json").read_text())  # the file's schema, as users read it
    assert Summary.model_validate(summary) == returned
    rows = [json.loads(x) for x in (tmp_path / "out/predictions.jsonl").read_text().splitlines()]
    # 2 models x (options: 6 examples x 2 k x 3 instructions + generation: 4 examples x 2 instructions)
    assert len(rows) == 2 * (6 * 2 * 3 + 4 * 2)
    assert summary["generated_paraphrases"]["yn_generate"] == ["Reply with either yes or no."]
    assert summary["paraphrases_rejected"]["yn_generate"] == {"header": 1, "duplicate": 1, "cut off": 1, "length": 1}
    assert {r["model"] for r in rows} == {"base", "tuned"}
    for r in rows:
        assert all(0.0 <= v <= 100.0 for v in r["scores"].values())
        if r["task"] == "yn_options":
            assert r["prediction"] in ("yes", "no") and set(r["option_logprobs"]) == {"yes", "no"}
            assert (r["k"] == 1) == (len(r["demo_ids"]) == 1) and r["id"] not in r["demo_ids"]
    for s in summary["scores"]:
        for metric in ("accuracy", "exact_match", "rouge_l"):
            if metric in s:
                lo, hi = s[metric]["ci95"]
                assert lo <= s[metric]["mean"] <= hi
        if s["task"] == "yn_options":
            assert s["majority_baseline"] == 50.0
    assert {(r["model"], r["task"]) for r in summary["kshot"]} == {("base", "yn_options"), ("tuned", "yn_options")}
    assert {(p["task"], p["n_instructions"]) for p in summary["paraphrase"]} == {("yn_options", 3), ("yn_generate", 2)}
    assert all(p["spread"] >= 0 for p in summary["paraphrase"])
    assert {s["split"] for s in summary["splits"]} == {"train", "heldout"}
    assert {c["task"] for c in summary["comparisons"]} == {"yn_options", "yn_generate"}
    # the adapter really changes predictions (it is applied), and the base really is the base
    by = {(r["model"], r["task"], r["k"], r["variant"], r["id"]): r for r in rows if r["task"] == "yn_options"}
    tuned = [k for k in by if k[0] == "tuned"]
    diffs = [k for k in tuned if by[k]["option_logprobs"] != by[("base", *k[1:])]["option_logprobs"]]
    assert diffs
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["adapters"]["tuned"]["sha256"] and manifest["versions"]["torch"] == torch.__version__
    assert manifest["data"]["yn_options"]["n"] == 6


def test_unusable_paraphrases_are_rejected_and_bounded(tmp_path, tiny_model_dir, monkeypatch):
    _scripted_paraphrases(monkeypatch, [("### Instructions:", "stop")] * 5)
    task = {"name": "yn", "data": {"path": str(tmp_path / "yn.jsonl")}, "protocol": "options",
            "generate_paraphrases": 1}  # fmt: skip
    (tmp_path / "yn.jsonl").write_text(json.dumps({"instruction": "Answer yes or no.", "input": "Is fire hot?",
                                                   "output": "yes", "options": ["yes", "no"]}) + "\n")  # fmt: skip
    cfg = EvalConfig(model={"spec": str(tiny_model_dir), "dtype": "float32"}, tasks=[task],
                     output_dir=str(tmp_path / "out"))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"only 0 usable paraphrases in 5 samples \(rejected: \{'header': 5\}"):
        evaluate(cfg, progress=False)


def test_bad_config_fails_before_loading_a_model(tmp_path, tiny_tasks, monkeypatch):
    import specialize.models

    def boom(*a, **k):
        raise AssertionError("model loaded before the config was checked")

    monkeypatch.setattr(specialize.models, "load_model", boom)
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        evaluate(EvalConfig(tasks=tiny_tasks, adapters={"x": str(tmp_path)}), progress=False)
    with pytest.raises(ConfigError, match="cannot give k=9"):
        evaluate(EvalConfig(tasks=tiny_tasks, shots=[9]), progress=False)
    with pytest.raises(ConfigError, match="unknown metrics"):
        evaluate(EvalConfig(tasks=[{"name": "t", "data": {"path": "x"}, "metrics": ["bleu"]}]), progress=False)


@pytest.mark.slow
def test_embedded_on_superni_sentiment_and_fpb(tmp_path, shared_data, capsys):
    """The acceptance run: exact prediction counts and valid scores; whether accuracy beats the majority
    class is reported, not assumed."""
    from specialize.cli import main

    out = tmp_path / "out"
    sst2 = {"path": "{data_root}/superni/tasks", "tasks": ["task363_sst2_polarity_classification"]}
    cfg = {
        "model": {"spec": "embedded", "threads": 2}, "data_root": str(shared_data), "limit": 40,
        "output_dir": str(out), "tasks": ["fpb", {"name": "sst2", "protocol": "options", "superni": sst2}],
    }  # fmt: skip
    (tmp_path / "eval.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    rc = main(["eval", str(tmp_path / "eval.yaml")])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 80
    summary = json.loads((out / "summary.json").read_text())
    for s in summary["scores"]:
        assert 0 <= s["accuracy"]["mean"] <= 100 and s["n"] == 40
        assert isinstance(s["above_majority"], bool)
    printed = capsys.readouterr().out
    for s in summary["scores"]:
        verdict = "is above" if s["above_majority"] else "is NOT above"
        assert f"{s['task']} k=0 original: accuracy {s['accuracy']['mean']:.2f} {verdict} the majority" in printed
    print(printed)
