"""The engine: per-row adapters in one wave give what each adapter gives alone (checked against HF generate)."""

from __future__ import annotations

import asyncio

import pytest

from specialize.generation.hf import SamplingParams, generate
from specialize.models import select_precision
from specialize.prompts import AlpacaTemplate
from specialize.serve.engine import Engine, EngineError, Event, Request, _held_back

PROMPTS = ["The cat sat on", "Hello world, this is", "A B C", "Numbers: 1 2 3", "Once upon a time there"]


def run(engine: Engine, jobs: list[tuple[str, str]], params: SamplingParams) -> list[Event]:
    """Submit all jobs at once (so they share waves) and collect each one's full text."""

    async def go():
        loop = asyncio.get_running_loop()
        reqs = [engine.submit(Request(engine.tokenizer(p)["input_ids"], a, params, loop)) for a, p in jobs]
        out = []
        for r in reqs:
            parts = []
            while True:
                ev = await r.events.get()
                parts.append(ev.text)
                if ev.finish_reason:
                    out.append(Event("".join(parts), ev.finish_reason, ev.completion_tokens))
                    break
        return out

    return asyncio.run(go())


def reference(engine: Engine, adapter: str, prompts: list[str], params: SamplingParams) -> list[str]:
    """Each adapter on its own, through transformers' generate (one adapter active at a time)."""
    model = engine.model
    if adapter == "base":
        with model.disable_adapter():
            outs = generate(model, engine.tokenizer, prompts, AlpacaTemplate(), params, precision=engine.precision)
    else:
        model.set_adapter(adapter)
        outs = generate(model, engine.tokenizer, prompts, AlpacaTemplate(), params, precision=engine.precision)
    return [o.text for o in outs]


def test_mixed_wave_equals_each_adapter_alone(tiny_engine: Engine):
    tiny_engine.precision = select_precision("float32")  # bf16 rounding depends on batch shape; compare exactly
    params = SamplingParams(max_new_tokens=12)
    jobs = [(a, p) for p in PROMPTS for a in ("base", "alpha", "beta")]  # interleaved: every wave is mixed
    got = run(tiny_engine.start(), jobs, params)
    assert tiny_engine.stats["mixed_waves"] >= 1
    want = {a: dict(zip(PROMPTS, reference(tiny_engine, a, PROMPTS, params), strict=True))
            for a in ("base", "alpha", "beta")}  # fmt: skip
    for (a, p), ev in zip(jobs, got, strict=True):
        assert ev.text == want[a][p], (a, p)
    # the adapters really differ from each other and from the base
    assert len({tuple(want[a].values()) for a in want}) == 3


def test_per_adapter_policy_never_mixes(tiny_engine: Engine):
    tiny_engine.policy = "per_adapter"
    jobs = [(a, p) for p in PROMPTS for a in ("base", "alpha", "beta")]
    got = run(tiny_engine.start(), jobs, SamplingParams(max_new_tokens=4))
    assert len(got) == len(jobs)
    assert tiny_engine.stats["mixed_waves"] == 0 and tiny_engine.stats["waves"] >= 3


def test_seeded_sampling_is_reproducible_and_stop_strings_cut(tiny_engine: Engine):
    tiny_engine.start()
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, seed=7)
    a = run(tiny_engine, [("alpha", "The cat sat on")], sampled)[0]
    b = run(tiny_engine, [("alpha", "The cat sat on"), ("beta", "A B C")], sampled)[0]
    assert a.text == b.text and a.completion_tokens == 16 and a.finish_reason == "length"
    stop = a.text[5:8]
    cut = run(tiny_engine, [("alpha", "The cat sat on")], sampled.model_copy(update={"stop": (stop,)}))[0]
    assert cut.finish_reason == "stop" and cut.text == a.text[: a.text.find(stop)]


def test_unknown_adapter_and_bad_names_are_refused(tiny_engine: Engine, tiny_adapters):
    with pytest.raises(EngineError, match="does not exist") as err:
        tiny_engine.submit(Request([1, 2], "gamma", SamplingParams(), asyncio.new_event_loop()))
    assert err.value.status == 404
    with pytest.raises(EngineError, match="already loaded"):
        tiny_engine.add_adapter("alpha", tiny_adapters["alpha"])
    with pytest.raises(EngineError, match="invalid adapter name"):
        tiny_engine.add_adapter("base", tiny_adapters["alpha"])
    with pytest.raises(EngineError, match="safetensors"):
        tiny_engine.add_adapter("gamma", tiny_adapters["alpha"].parent)


def test_adapters_register_mix_and_unregister_without_reloading_the_base(tiny_engine: Engine, tiny_adapters):
    base_weight = tiny_engine.model.get_base_model().lm_head.weight
    tiny_engine.precision = select_precision("float32")
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
    tiny_engine.mix_adapters("even", ["alpha", "beta"], [0.5, 0.5])
    assert tiny_engine.adapters["even"]["mix"]["weights"] == [0.5, 0.5]
    with pytest.raises(EngineError, match="cannot mix"):  # linear needs equal ranks (4 vs 8)
        tiny_engine.mix_adapters("lin", ["alpha", "beta"], [0.5, 0.5], "linear")
    tiny_engine.remove_adapter("alpha2")
    assert "alpha2" not in tiny_engine.model_names()
    assert [e.text for e in run(tiny_engine, [("alpha", p) for p in PROMPTS], params)] == [e.text for e in before]
    assert tiny_engine.model.get_base_model().lm_head.weight is base_weight


def test_held_back_covers_partial_stops_and_broken_characters():
    assert _held_back("hello ###", ("###",)) == 0 or _held_back("hello ##", ("###",)) == 2
    assert _held_back("hello ##", ("###",)) == 2
    assert _held_back("hello #", ("###", "END")) == 1
    assert _held_back("hello E", ("###", "END")) == 1
    assert _held_back("hello", ("###",)) == 0
    assert _held_back("caf\ufffd", ()) == 1
