"""The serving engine on the token loop: per-row adapters in one batch give what each adapter gives alone
(checked against transformers' own `generate`), requests join a running batch, admin calls change nothing they
should not."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from specialize.generation import Output, SamplingParams
from specialize.models import Precision
from specialize.serve.engine import Engine, EngineError, collect

PROMPTS = ["The cat sat on", "Hello world, this is", "A B C", "Numbers: 1 2 3", "Once upon a time there"]
FP32 = Precision(torch.float32, None)  # bf16 rounding depends on batch shape; compare exactly


def run(engine: Engine, jobs: list[tuple[str, str]], params: SamplingParams) -> list[Output]:
    """Submit all jobs at once (so they share steps) and wait for each one's full output."""
    reqs = [engine.request(a, engine.tokenizer(p)["input_ids"], params) for a, p in jobs]
    engine.submit(*reqs)
    return collect(reqs, timeout=120)


def hf_reference(engine: Engine, adapter: str, prompts: list[str], steps: int) -> list[str]:
    """Each model alone, one prompt at a time, through transformers' own greedy `generate`."""
    model, tok = engine.model, engine.tokenizer
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]])
            kwargs = dict(max_new_tokens=steps, do_sample=False, pad_token_id=tok.eos_token_id,
                          eos_token_id=tok.eos_token_id)  # fmt: skip
            if adapter == "base":
                with model.disable_adapter():
                    new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            else:
                model.set_adapter(adapter)
                new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            tokens = new[0, ids.shape[1] :].tolist()
            tokens = tokens[: tokens.index(tok.eos_token_id)] if tok.eos_token_id in tokens else tokens
            out.append(tok.decode(tokens, skip_special_tokens=True))
    return out


def test_mixed_batch_equals_each_adapter_alone_in_transformers(tiny_engine: Engine):
    tiny_engine.loop.precision = FP32
    params = SamplingParams(max_new_tokens=12)
    jobs = [(a, p) for p in PROMPTS for a in ("base", "alpha", "beta")]  # interleaved: every step is mixed
    got = run(tiny_engine.start(), jobs, params)
    assert tiny_engine.stats["mixed_steps"] >= 1 and tiny_engine.loop.lora_path == "stacked"
    want = {a: dict(zip(PROMPTS, hf_reference(tiny_engine, a, PROMPTS, 12), strict=True))
            for a in ("base", "alpha", "beta")}  # fmt: skip
    for (a, p), out in zip(jobs, got, strict=True):
        assert out.text == want[a][p], (a, p)
    assert len({tuple(want[a].values()) for a in want}) == 3  # the adapters really differ, and from the base


def test_rows_joining_a_running_batch_decode_as_if_alone(tiny_engine: Engine):
    """A request submitted while others decode is prefilled, merged into the running batch and decoded with
    them; its text is what it gives alone."""
    tiny_engine.loop.precision = FP32
    tiny_engine.batch_wait_s = 0
    long = [tiny_engine.request(a, tiny_engine.tokenizer(p)["input_ids"], SamplingParams(max_new_tokens=40))
            for a, p in (("alpha", PROMPTS[4]), ("base", PROMPTS[1]))]  # fmt: skip
    started = threading.Event()
    late_jobs = [("beta", PROMPTS[0]), ("base", PROMPTS[2]), ("alpha", PROMPTS[3])]
    late = [tiny_engine.request(a, tiny_engine.tokenizer(p)["input_ids"], SamplingParams(max_new_tokens=12),
                                on_output=lambda o: started.set()) for a, p in late_jobs]  # fmt: skip
    long[0].on_output = lambda o: started.set()
    tiny_engine.start().submit(*long)
    assert started.wait(30)
    tiny_engine.submit(*late)
    got = collect(late + long, timeout=120)
    assert all(r.tokens for r in long) and len(long[0].tokens) > len(late[0].tokens)
    assert tiny_engine.stats["joined_in_decode"] >= 1  # prefilled in the running rows' decode forward
    for (a, p), out in zip(late_jobs, got[:3], strict=True):
        assert out.text == hf_reference(tiny_engine, a, [p], 12)[0], (a, p)


def test_per_adapter_and_static_policies_never_mix(tiny_engine: Engine):
    tiny_engine.loop.policy = "per_adapter"
    jobs = [(a, p) for p in PROMPTS for a in ("base", "alpha", "beta")]
    got = run(tiny_engine.start(), jobs, SamplingParams(max_new_tokens=4))
    assert len(got) == len(jobs) and all(o.finish_reason for o in got)
    assert tiny_engine.stats["mixed_steps"] == 0


def test_seeded_sampling_is_reproducible_and_stop_strings_cut(tiny_engine: Engine):
    tiny_engine.start()
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, seed=7)
    a = run(tiny_engine, [("alpha", "The cat sat on")], sampled)[0]
    b = run(tiny_engine, [("alpha", "The cat sat on"), ("beta", "A B C")], sampled)[0]
    assert a.text == b.text and len(a.token_ids) == 16 and a.finish_reason == "length"
    stop = a.text[5:8]
    cut = run(tiny_engine, [("alpha", "The cat sat on")], sampled.model_copy(update={"stop": (stop,)}))[0]
    assert cut.finish_reason == "stop" and cut.text == a.text[: a.text.find(stop)]


def test_unknown_adapter_and_bad_names_are_refused(tiny_engine: Engine, tiny_adapters):
    with pytest.raises(EngineError, match="does not exist") as err:
        tiny_engine.request("gamma", [1, 2], SamplingParams())
    assert err.value.status == 404
    with pytest.raises(EngineError, match="already loaded"):
        tiny_engine.add_adapter("alpha", tiny_adapters["alpha"])
    with pytest.raises(EngineError, match="invalid adapter name"):
        tiny_engine.add_adapter("base", tiny_adapters["alpha"])
    with pytest.raises(EngineError, match="safetensors"):
        tiny_engine.add_adapter("gamma", tiny_adapters["alpha"].parent)


def test_a_bad_adapter_changes_nothing_and_its_name_stays_free(tiny_engine: Engine, tiny_adapters, tmp_path):
    import json
    import shutil

    tiny_engine.loop.precision = FP32
    tiny_engine.start()
    params = SamplingParams(max_new_tokens=8)
    before = [o.text for o in run(tiny_engine, [("alpha", p) for p in PROMPTS[:2]], params)]
    modules = {n for n, _ in tiny_engine.model.named_modules()}
    rank = tmp_path / "rank"
    shutil.copytree(tiny_adapters["alpha"], rank)
    cfg = json.loads((rank / "adapter_config.json").read_text())
    (rank / "adapter_config.json").write_text(json.dumps({**cfg, "r": cfg["r"] * 2}))  # weights say r=4
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_adapters["alpha"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    for bad in (rank, corrupt):
        with pytest.raises(EngineError) as err:
            tiny_engine.add_adapter("gamma", bad)
        assert err.value.status == 400
        assert "gamma" not in tiny_engine.model_names() and {n for n, _ in tiny_engine.model.named_modules()} == modules
    tiny_engine.add_adapter("gamma", tiny_adapters["alpha"])  # the name is free
    assert [o.text for o in run(tiny_engine, [("gamma", p) for p in PROMPTS[:2]], params)] == before


def test_two_registrations_of_one_name_race_and_one_gets_409(tiny_engine: Engine, tiny_adapters, monkeypatch):
    import specialize.serve.engine as engine_module

    real = engine_module.validate_lora
    # a slow load: the second registration arrives while the first is still loading
    monkeypatch.setattr(engine_module, "validate_lora", lambda m, p: (time.sleep(0.5), real(m, p)))
    results: list[object] = []

    def register() -> None:
        try:
            tiny_engine.add_adapter("twin", tiny_adapters["beta"])
            results.append("ok")
        except EngineError as err:
            results.append(err.status)

    threads = [threading.Thread(target=register) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(30)
    assert sorted(results, key=str) == [409, "ok"]


def test_removing_an_adapter_fails_only_its_own_requests(tiny_engine: Engine):
    tiny_engine.loop.precision = FP32
    tiny_engine.batch_wait_s = 0
    first = threading.Event()
    reqs = [tiny_engine.request(a, tiny_engine.tokenizer(p)["input_ids"], SamplingParams(max_new_tokens=200),
                                on_output=lambda o: first.set()) for a, p in (("alpha", PROMPTS[0]),
                                                                                ("beta", PROMPTS[1]))]  # fmt: skip
    tiny_engine.start().submit(*reqs)
    assert first.wait(30)
    tiny_engine.remove_adapter("beta")
    alpha, beta = collect(reqs, timeout=120)
    assert beta.error == "the adapter 'beta' was removed" and beta.finish_reason is None
    assert alpha.error is None and alpha.finish_reason is not None
    assert len(beta.token_ids) < 200 and alpha.text == hf_reference(tiny_engine, "alpha", [PROMPTS[0]], 200)[0]


def test_a_refused_multi_request_queues_nothing(tiny_engine: Engine):
    tiny_engine.max_pending = 2
    reqs = [tiny_engine.request("base", [1, 2, 3], SamplingParams(max_new_tokens=2)) for _ in range(3)]
    with pytest.raises(EngineError, match="too many queued") as err:
        tiny_engine.submit(*reqs)
    assert err.value.status == 503 and len(tiny_engine.loop.waiting) == 0


def test_adapters_register_mix_and_unregister_without_reloading_the_base(tiny_engine: Engine, tiny_adapters):
    base_weight = tiny_engine.model.get_base_model().lm_head.weight
    tiny_engine.loop.precision = FP32
    tiny_engine.start()
    params = SamplingParams(max_new_tokens=10)
    before = run(tiny_engine, [("alpha", p) for p in PROMPTS], params)
    tiny_engine.add_adapter("alpha2", tiny_adapters["alpha"])
    assert [e.text for e in run(tiny_engine, [("alpha2", p) for p in PROMPTS], params)] == [e.text for e in before]
    # cat-combination with weights (1, 0) is exactly the first adapter
    tiny_engine.mix_adapters("only-alpha", ["alpha", "beta"], [1.0, 0.0])
    assert [e.text for e in run(tiny_engine, [("only-alpha", p) for p in PROMPTS], params)] == [e.text for e in before]
    with pytest.raises(EngineError, match="invalid adapter name"):  # would shadow nn.Module.half
        tiny_engine.mix_adapters("half", ["alpha", "beta"], [0.5, 0.5])
    with pytest.raises(EngineError, match="finite"):
        tiny_engine.mix_adapters("nan", ["alpha", "beta"], [float("nan"), 0.5])
    tiny_engine.mix_adapters("even", ["alpha", "beta"], [0.5, 0.5])
    assert tiny_engine.adapters["even"]["mix"]["weights"] == [0.5, 0.5]
    with pytest.raises(EngineError, match="cannot mix"):  # linear needs equal ranks (4 vs 8)
        tiny_engine.mix_adapters("lin", ["alpha", "beta"], [0.5, 0.5], "linear")
    assert "lin" not in tiny_engine.model_names()
    tiny_engine.remove_adapter("alpha2")
    assert "alpha2" not in tiny_engine.model_names()
    assert [e.text for e in run(tiny_engine, [("alpha", p) for p in PROMPTS], params)] == [e.text for e in before]
    assert tiny_engine.model.get_base_model().lm_head.weight is base_weight
