"""Batched LoRA over stacked adapter weights: every row of a mixed batch gets exactly its own adapter's output
(PEFT's computation, row by row), base rows get nothing, and what cannot be stacked runs on PEFT's path."""

from __future__ import annotations

import pytest
import torch

from specialize.generation import SamplingParams, TokenLoop
from specialize.generation.loop import Request
from specialize.generation.lora import NO_ADAPTER, StackedLoRA
from specialize.models import attach_adapters, load_model

IDS = [[5, 17, 30, 2, 9, 44, 12], [8, 3, 3, 60, 21, 7, 40], [11, 70, 2, 19, 33, 6, 1], [4, 4, 28, 50, 13, 9, 90]]


@pytest.fixture
def peft_model(tiny_model_dir, tiny_adapters):
    """The tiny model (fp32) with `alpha` (rank 4) and `beta` (rank 8) and a `cat` mix of both (rank 12)."""
    model, tok = load_model(str(tiny_model_dir), dtype="float32", threads=1)
    model = attach_adapters(model, dict(tiny_adapters))
    model.add_weighted_adapter(["alpha", "beta"], [0.7, 0.4], "mix", combination_type="cat")
    model.set_adapter("beta")  # what a row with adapter None ("the model as it is") reads
    return model, tok


def alone(model, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """Logits of one row through PEFT's own forward with only that adapter (or none)."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        if adapter == NO_ADAPTER:
            with model.disable_adapter():
                return model(input_ids=x).logits[0]
        active = model.active_adapter
        model.set_adapter(adapter or active)
        try:
            return model(input_ids=x).logits[0]
        finally:
            model.set_adapter(active)


def test_mixed_batch_rows_equal_each_adapter_alone(peft_model):
    model, _ = peft_model
    stack, why = StackedLoRA.build(model)
    assert stack is not None, why
    assert stack.rank == 12  # ranks 4, 8 and 12 zero-padded to the largest
    adapters = ["alpha", NO_ADAPTER, "mix", None]
    with torch.inference_mode(), stack.rows(adapters):
        batched = model(input_ids=torch.tensor(IDS)).logits
    for row, (adapter, ids) in enumerate(zip(adapters, IDS, strict=True)):
        torch.testing.assert_close(batched[row], alone(model, adapter, ids), rtol=1e-5, atol=1e-5)
    # the adapters really differ from each other and from the base, so the equalities above mean something
    firsts = [alone(model, a, IDS[0])[-1] for a in ("alpha", "beta", "mix", NO_ADAPTER)]
    assert all(not torch.allclose(firsts[i], firsts[j]) for i in range(4) for j in range(i + 1, 4))


def test_base_rows_get_no_adapter_weights_whatever_the_slot_order(peft_model):
    """A base row next to adapter rows is bit-identical to the base model: its mask is zero, not "slot -1"
    (which would index the last adapter, the bug of vLLM's CPU LoRA ops)."""
    model, _ = peft_model
    stack, _ = StackedLoRA.build(model)
    assert stack is not None
    with torch.inference_mode():
        with model.disable_adapter():
            base = model(input_ids=torch.tensor(IDS)).logits
        with stack.rows([NO_ADAPTER, "mix", NO_ADAPTER, "alpha"]):  # "mix" is the last slot
            mixed = model(input_ids=torch.tensor(IDS)).logits
    assert torch.equal(mixed[0], base[0]) and torch.equal(mixed[2], base[2])
    assert not torch.allclose(mixed[1], base[1])


def test_outside_a_stacked_forward_peft_runs_as_usual(peft_model):
    model, _ = peft_model
    before = alone(model, "alpha", IDS[0])
    stack, _ = StackedLoRA.build(model)
    assert stack is not None
    torch.testing.assert_close(alone(model, "alpha", IDS[0]), before, rtol=0, atol=0)  # hooks add nothing
    stack.close()


def decode(loop: TokenLoop, jobs: list[tuple[str | None, list[int]]]) -> list[tuple[int, ...]]:
    reqs = [Request([ids], SamplingParams(max_new_tokens=8, ignore_eos=True), adapter=a) for a, ids in jobs]
    loop.submit(*reqs)
    loop.run()
    return [r.result.token_ids for r in reqs]


def test_loop_stacked_and_peft_paths_decode_the_same_tokens(peft_model):
    model, tok = peft_model
    jobs = [(a, ids) for ids in IDS[:2] for a in ("alpha", "beta", NO_ADAPTER, "mix")]
    stacked = TokenLoop(model, tok, max_rows=8)
    got = decode(stacked, jobs)
    assert stacked.lora_path == "stacked" and stacked.stats["mixed_steps"] > 0
    stacked.adapters_changed()  # removes its hooks
    peft = TokenLoop(model, tok, max_rows=8, lora="peft")
    assert decode(peft, jobs) == got
    assert len(set(got)) > 2


def test_changed_adapters_are_restacked(peft_model, tiny_adapters):
    """An adapter deleted and loaded again under the same name with other weights: the loop must use the new
    weights (the stack is rebuilt when told the adapters changed)."""
    model, tok = peft_model
    loop = TokenLoop(model, tok, max_rows=4)
    before = decode(loop, [("alpha", IDS[0]), ("beta", IDS[0])])
    model.delete_adapter("alpha")
    model.load_adapter(str(tiny_adapters["beta"]), adapter_name="alpha")
    loop.adapters_changed()
    after = decode(loop, [("alpha", IDS[0]), ("beta", IDS[0])])
    assert after[0] == after[1] == before[1] != before[0]


def test_lora_bias_falls_back_to_peft_with_the_reason(tiny_model_dir, tiny_adapters):
    """An adapter the stack cannot express (here a LoRA bias) runs every mixed step on PEFT's path, exactly."""
    from peft import LoraConfig

    model, tok = load_model(str(tiny_model_dir), dtype="float32", threads=1)
    model = attach_adapters(model, {"alpha": tiny_adapters["alpha"]})
    torch.manual_seed(0)
    model.add_adapter("biased", LoraConfig(r=4, lora_bias=True, target_modules="all-linear", init_lora_weights=False))
    for m in model.modules():  # a non-zero bias, so the adapter really has one
        if hasattr(m, "lora_B") and "biased" in m.lora_B:
            torch.nn.init.normal_(m.lora_B["biased"].bias)
    model.eval()
    stack, why = StackedLoRA.build(model)
    assert stack is None and "bias" in (why or "")
    loop = TokenLoop(model, tok, max_rows=4)
    jobs = [("biased", IDS[0]), ("alpha", IDS[0]), (NO_ADAPTER, IDS[0])]
    got = decode(loop, jobs)
    assert loop.lora_path.startswith("peft (") and "bias" in loop.lora_path
    want = [decode(TokenLoop(model, tok), [job])[0] for job in jobs]
    assert got == want and len(set(got)) == 3
