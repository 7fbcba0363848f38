"""The runtime handle and the concepts the stages share: precision decided once, the template stored beside every
checkpoint and read back, adapters loaded one way (safetensors only), one primary-metric rule, one SuperNI file
selector, one hashing module. Each test here failed on the code before these had one home."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specialize import hashing, models
from specialize.config import ConfigError, ModelConfig
from specialize.models import CheckpointMeta, Precision, load_runtime, select_precision, train_precision
from specialize.prompts import AlpacaTemplate, ChatTemplate

CHAT = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Pretend the CPU has native bf16, so `auto` would mean bf16 (weights for inference, autocast for training)."""
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: True)


@pytest.fixture
def autocasts(monkeypatch) -> list[torch.dtype]:
    """The dtype of every autocast region entered."""
    seen: list[torch.dtype] = []
    real = torch.autocast

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args, dtype=None, **kwargs):
            seen.append(dtype)
            super().__init__(*args, dtype=dtype, **kwargs)

    monkeypatch.setattr(torch, "autocast", Spy)
    return seen


def test_float32_means_float32_everywhere(bf16_cpu, autocasts, tiny_model_dir):
    """`dtype: float32` on a bf16 CPU: fp32 weights and no autocast, in every consumer (before, eval, serve and
    synth re-derived `auto` and ran bf16 autocast over fp32 weights)."""
    from specialize.generation import SamplingParams, generate, generate_mixture

    assert select_precision("auto").param_dtype == torch.bfloat16  # the fixture is in effect
    assert train_precision("auto").autocast_dtype == torch.bfloat16
    rt = load_runtime(ModelConfig(spec=str(tiny_model_dir), dtype="float32"))
    assert rt.precision == Precision(torch.float32, None)
    prompt = AlpacaTemplate().render("Go.")
    generate(rt.model, rt.tokenizer, [prompt], AlpacaTemplate(), SamplingParams(max_new_tokens=2))
    generate_mixture(rt.model, rt.tokenizer, [[[1, 2, 3]]], [[1.0]], SamplingParams(max_new_tokens=2))
    assert autocasts == []  # a plain fp32 model is run as it is, never under a re-derived autocast
    auto = load_runtime(ModelConfig(spec=str(tiny_model_dir)))
    assert auto.precision == Precision(torch.bfloat16, None)
    assert {p.dtype for p in auto.model.parameters()} == {torch.bfloat16}  # held in bf16 once, at load
    out = generate(auto.model, auto.tokenizer, [prompt], AlpacaTemplate(), SamplingParams(max_new_tokens=2),
                   precision=auto.precision)  # fmt: skip
    assert out[0].finish_reason in ("stop", "length")
    assert autocasts == []  # inference never re-casts weights per step under autocast


def test_train_precision_auto_uses_bf16_autocast_on_gpus_too(monkeypatch):
    monkeypatch.setattr(models, "_bf16_native", lambda device: True)
    assert train_precision("auto", "cuda") == Precision(torch.float32, torch.bfloat16)  # fp32 master weights
    assert train_precision("float32", "cuda") == Precision(torch.float32, None)
    assert train_precision("auto", "cuda", quantized=True).param_dtype == torch.bfloat16
    monkeypatch.setattr(models, "_bf16_native", lambda device: False)
    assert train_precision("auto", "cpu") == Precision(torch.float32, None)


def _tiny_chat_dir(src: Path, dst: Path) -> Path:
    """The tiny model with a chat template in its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    tok.chat_template = CHAT
    AutoModelForCausalLM.from_pretrained(str(src)).save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def _adapter(model_dir: Path, out: Path, template: str | None) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)),
                          LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))  # fmt: skip
    peft.save_pretrained(out)
    if template:
        CheckpointMeta(template, {"spec": str(model_dir)}, "lora").write(out)
    return out


def test_eval_reads_each_adapters_template_and_a_flag_overrides_with_a_warning(tmp_path, tiny_model_dir):
    from specialize.eval.harness import EvalConfig, evaluate

    model_dir = _tiny_chat_dir(tiny_model_dir, tmp_path / "model")
    chat = _adapter(model_dir, tmp_path / "chat", "chat")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"}) + "\n")
    task = {"name": "t", "data": {"path": str(data)}, "max_new_tokens": 2}
    cfg = EvalConfig(model={"spec": str(model_dir), "dtype": "float32"}, adapters={"tuned": str(chat)},
                     tasks=[task], output_dir=str(tmp_path / "out"))  # fmt: skip
    summary = evaluate(cfg, progress=False)
    assert summary.templates == {"base": "alpaca", "tuned": "chat"}
    rows = {r["model"]: r for r in map(json.loads, (tmp_path / "out/predictions.jsonl").read_text().splitlines())}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert rows["tuned"]["prompt_hash"] == hashing.text_sha256(ChatTemplate(tok).render("Say hi."), 16)
    assert rows["base"]["prompt_hash"] == hashing.text_sha256(AlpacaTemplate().render("Say hi."), 16)
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["adapters"]["tuned"]["template"] == "chat"

    with pytest.warns(UserWarning, match="trained with the 'chat' template but 'alpaca' was asked for"):
        summary = evaluate(cfg.model_copy(update={"template": "alpaca", "output_dir": str(tmp_path / "o2")}),
                           progress=False)  # fmt: skip
    assert summary.templates == {"base": "alpaca", "tuned": "alpaca"}


def test_training_stores_template_and_base_model_in_the_checkpoint(tmp_path, tiny_model_dir, shared_data):
    from specialize.train import TrainConfig, run_training

    stage = {"name": "s", "sources": [{"path": str(shared_data / "generalist/dolly_alpaca_fixtures/alpaca.json"),
             "amount": 4}], "epochs": 1, "batch_size": 4, "micro_batch_size": 4, "max_length": 64}  # fmt: skip
    cfg = TrainConfig.model_validate({"model": {"spec": str(tiny_model_dir), "dtype": "float32"}, "stages": [stage],
                                      "output_dir": str(tmp_path), "save_every": 0, "progress": False})  # fmt: skip
    [result] = run_training(cfg)
    meta = CheckpointMeta.read(result.output)
    assert meta is not None and meta.template == "alpaca" and meta.method == "lora"
    assert meta.base_model["spec"] == str(tiny_model_dir)


def test_serve_applies_each_adapters_own_template(tmp_path, tiny_model_dir):
    from specialize.serve.engine import Engine

    model_dir = _tiny_chat_dir(tiny_model_dir, tmp_path / "model")
    rt = load_runtime(ModelConfig(spec=str(model_dir), dtype="float32"))
    engine = Engine(rt.model, rt.tokenizer, precision=rt.precision)
    engine.add_adapter("chatty", _adapter(model_dir, tmp_path / "a", "chat"))
    engine.add_adapter("plain", _adapter(model_dir, tmp_path / "b", None))
    assert [engine.template_of(n) for n in ("base", "chatty", "plain")] == ["alpaca", "chat", "alpaca"]
    with pytest.raises(Exception, match="different prompt templates"):
        engine.mix_adapters("both", ["chatty", "plain"], [0.5, 0.5])


def test_pickled_adapters_and_the_name_base_are_refused_everywhere(tmp_path, tiny_model_dir, monkeypatch):
    from safetensors.torch import load_file

    from specialize.eval.harness import EvalConfig, evaluate
    from specialize.synth.pipeline import SynthConfig, run_synth

    pickled = _adapter(tiny_model_dir, tmp_path / "pickled", None)  # the same adapter, saved as a pickle
    torch.save(load_file(str(pickled / models.ADAPTER_WEIGHTS)), pickled / "adapter_model.bin")
    (pickled / models.ADAPTER_WEIGHTS).unlink()
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    task = {"name": "t", "data": {"path": str(data)}}
    with pytest.raises(ConfigError, match="only safetensors adapters are loaded"):
        evaluate(EvalConfig(tasks=[task], adapters={"x": str(pickled)}), progress=False)
    with pytest.raises(models.ModelLoadError, match="only safetensors adapters are loaded"):
        run_synth(SynthConfig(seeds=str(data), retrieval="none", adapter=str(pickled), demos_per_prompt=1,
                              output_dir=str(tmp_path / "s")), progress=False)  # fmt: skip
    good = _adapter(tiny_model_dir, tmp_path / "good", None)
    with pytest.raises(ConfigError, match="reserved for the base model"):
        evaluate(EvalConfig(tasks=[task], adapters={"base": str(good)}), progress=False)


def test_cli_flags_override_a_config_file_only_when_given(tmp_path, monkeypatch):
    import specialize.eval.harness as harness
    from specialize.cli import main
    from specialize.eval.results import Summary

    seen = []
    monkeypatch.setattr(harness, "evaluate", lambda cfg: seen.append(cfg) or Summary(scores=[]))
    cfg = tmp_path / "e.yaml"
    cfg.write_text("model: {spec: my/model, dtype: bfloat16, device: cuda}\ntasks: [fpb]\ntemplate: chat\n")
    assert main(["eval", str(cfg), "--model", "other/model", "--template", "alpaca"]) == 0
    assert (seen[-1].model.spec, seen[-1].template) == ("other/model", "alpaca")
    assert (seen[-1].model.dtype, seen[-1].model.device) == ("bfloat16", "cuda")  # not given: the file's
    assert main(["eval", str(cfg)]) == 0
    assert (seen[-1].model.spec, seen[-1].model.dtype, seen[-1].template) == ("my/model", "bfloat16", "chat")


def test_one_primary_metric_rule_for_eval_and_report():
    from specialize.eval.harness import summarize
    from specialize.eval.metrics import primary_metric
    from specialize.eval.results import Prediction
    from specialize.eval.tasks import LoadedTask, TaskSpec
    from specialize.experiment.findings import primary_metrics

    spec = TaskSpec(name="nq", data={"path": "x"}, metrics=["exact_match", "token_f1"])
    rows = [Prediction(model=m, task="nq", k=0, variant="original", id=str(i),
                       scores={"exact_match": float(i % 2) * 100, "token_f1": 50.0 + (m == "run") * 10})
            for m in ("base", "run") for i in range(4)]  # fmt: skip

    class Cfg:
        bootstrap_resamples, seed, include_base = 100, 0, True

    summary = summarize(rows, [LoadedTask("nq", spec, [], [])], {}, Cfg())
    assert summary.comparisons[0].metric == "token_f1" == primary_metric(spec.metric_names)
    assert {s.primary for s in summary.scores} == {"token_f1"}  # recorded beside the scores for the report
    report_scores = [{"task": "nq", "metric": m} for m in ("exact_match", "token_f1")]
    assert primary_metrics(report_scores) == {"nq": "token_f1"}


def test_superni_json_and_gz_select_the_same_file_for_training_and_eval(tmp_path):
    import gzip

    from specialize.eval.tasks import load_task_spec, load_tasks
    from specialize.train.mixing import SourceSpec, load_source

    def task(output: str) -> bytes:
        return json.dumps({"Definition": ["Say it."], "Positive Examples": [], "Categories": ["C"],
                           "Instances": [{"id": "i1", "input": "x", "output": [output]}]}).encode()  # fmt: skip

    (tmp_path / "task001_x.json").write_bytes(task("plain"))
    (tmp_path / "task001_x.json.gz").write_bytes(gzip.compress(task("gzipped")))
    trained = load_source(SourceSpec(path=str(tmp_path))).records
    evaluated = load_tasks(load_task_spec({"name": "t", "superni": {"path": str(tmp_path)}}, "."))[0].examples
    assert [e.output for e in trained] == [e.output for e in evaluated] == ["plain"]


def test_file_digests_are_memoized_until_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "w.gguf"
    path.write_bytes(b"GGUF" + b"x" * 100)
    opened = []
    real = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: (opened.append(str(f)), real(f, *a, **k))[1])
    first = [models.describe(str(path))["sha256"] for _ in range(3)]
    assert len(set(first)) == 1 and opened.count(str(path)) == 1
    path.write_bytes(b"GGUF" + b"y" * 100)
    assert models.describe(str(path))["sha256"] != first[0]


def test_a_task_may_declare_its_primary_metric():
    from specialize.config import ConfigError
    from specialize.eval.tasks import TaskSpec, load_task_spec

    spec = TaskSpec(name="fpb", data={"path": "x"}, metrics=["token_f1", "rouge_l"], primary="token_f1")
    assert spec.primary_metric == "token_f1"  # Kang et al. compare on F1 where ROUGE-L is reported too
    assert TaskSpec(name="fpb", data={"path": "x"}, metrics=["token_f1", "rouge_l"]).primary_metric == "rouge_l"
    with pytest.raises(ConfigError, match="primary metric 'accuracy' is not one of"):
        load_task_spec({"name": "fpb", "data": {"path": "x"}, "metrics": ["token_f1"], "primary": "accuracy"}, ".")
