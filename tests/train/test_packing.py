"""Packed rows (several examples per row, each attending only to itself) and frozen weights held in the autocast
dtype: both are speed only, so every result must equal the plain computation (fp32, tight tolerance)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_sft import adapter, assert_close, make_cfg  # this folder is on sys.path (pytest's prepend mode)

from specialize.data import Example
from specialize.models import Precision
from specialize.prompts import AlpacaTemplate, tokenize_for_training
from specialize.train import run_training, sft
from specialize.train.batching import collate, micro_batches, pack_rows
from specialize.train.loss import ResponseLoss, honours_packing

QA = [("Classify the sentiment.", "positive"), ("Why is the sky blue?", "Because of Rayleigh scattering."),
      ("Say hi.", "hi"), ("List three colours.", "red, green and blue"), ("Yes or no?", "no")]  # fmt: skip


@pytest.fixture
def features(gpt2_style_tokenizer):
    t = AlpacaTemplate()
    return [tokenize_for_training(Example(id=str(i), instruction=q, output=a), t, gpt2_style_tokenizer, 256)
            for i, (q, a) in enumerate(QA)]  # fmt: skip


def test_pack_rows_fills_rows_without_exceeding_them():
    lengths = [90, 30, 60, 50, 10, 100, 45]
    rows = pack_rows(range(7), lengths, capacity=100)
    assert sorted(i for r in rows for i in r) == list(range(7))
    assert all(sum(lengths[i] for i in r) <= 100 for r in rows)
    assert len(rows) == 4  # 385 tokens: four rows of 100 is the fewest possible
    assert micro_batches(range(7), lengths, 3, capacity=100) == [rows[:3], rows[3:]]
    with pytest.raises(ValueError, match="more than a row of 80"):
        pack_rows(range(7), lengths, capacity=80)


def test_each_packed_example_gets_exactly_its_own_logits_and_loss(tiny_model, gpt2_style_tokenizer, features):
    pad = gpt2_style_tokenizer.eos_token_id
    rows = pack_rows(range(len(features)), [len(f.input_ids) for f in features], capacity=300)
    assert any(len(r) > 1 for r in rows)  # something really is packed
    packed = collate([[features[i] for i in r] for r in rows], pad, packed=True)
    with torch.no_grad():
        # no KV cache, as in training: transformers reads packed rows only without one (`ResponseLoss`)
        logits = tiny_model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = len(features[i].input_ids)
                alone = tiny_model(input_ids=torch.tensor([features[i].input_ids])).logits[0]
                torch.testing.assert_close(logits[r, at : at + n], alone, rtol=1e-5, atol=1e-5)
                at += n
    # the summed response loss and its gradients equal the padded, one-example-per-row batch's
    unpacked = collate([[f] for f in features], pad)
    grads = []
    for batch in (packed, unpacked):
        tiny_model.zero_grad()
        loss = ResponseLoss(tiny_model)(**batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in tiny_model.parameters()]))
    tiny_model.zero_grad()
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_model_that_ignores_position_ids_is_not_packed(tiny_model):
    from transformers import LlamaForCausalLM

    class Unpackable(LlamaForCausalLM):
        def forward(self, *args, position_ids=None, **kwargs):
            return super().forward(*args, **kwargs)

    blind = Unpackable(tiny_model.config)
    blind.load_state_dict(tiny_model.state_dict())
    assert honours_packing(tiny_model) and not honours_packing(blind.eval())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_packed_training_equals_one_example_per_row(tmp_path, tiny_model_dir, shared_data, method):
    """The same steps, losses and weights (fp32): packing changes the rows, not the objective."""
    runs = {}
    for pack in (True, False):
        cfg = make_cfg(tmp_path / str(pack), tiny_model_dir, shared_data, method=method, pack=pack)
        [runs[pack]] = run_training(cfg)
    lines = {k: (Path(r.dir) / "metrics.jsonl").read_text().splitlines() for k, r in runs.items()}
    for a, b in zip(lines[True], lines[False], strict=True):
        a, b = json.loads(a), json.loads(b)
        assert a["tokens"] == b["tokens"] and a["response_tokens"] == b["response_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    if method == "lora":
        assert_close(adapter(runs[True]), adapter(runs[False]), atol=1e-5)
    else:
        a, b = (load_file(str(Path(runs[k].output) / "model.safetensors")) for k in (True, False))
        assert_close(a, b, atol=1e-5)


def test_lowered_frozen_weights_change_no_number_and_merge_from_the_real_base(
    tmp_path, tiny_model_dir, shared_data, monkeypatch
):
    """LoRA under bf16 autocast: the frozen base held in bf16 gives bit-identical losses and adapter gradients
    (autocast cast those weights to bf16 anyway), and the merged model is built on the fp32 base."""
    bf16_autocast = Precision(torch.float32, torch.bfloat16)
    cfg = make_cfg(tmp_path, tiny_model_dir, shared_data, merge=True)
    batch = None
    out = []
    real = sft.lora_for_autocast
    for lower in (False, True):
        monkeypatch.setattr(sft, "lora_for_autocast", real if lower else lambda *_: None)
        torch.manual_seed(0)
        model, tok = sft.build_model(cfg, None, bf16_autocast)
        base_dtypes = {p.dtype for n, p in model.named_parameters() if "base_layer" in n}
        assert base_dtypes == ({torch.bfloat16} if lower else {torch.float32})
        if batch is None:
            feats = [tokenize_for_training(Example(id=str(i), instruction=q, output=a), AlpacaTemplate(), tok, 96)
                     for i, (q, a) in enumerate(QA)]  # fmt: skip
            batch = collate([[f] for f in feats], tok.pad_token_id)
        with bf16_autocast.autocast():
            loss = ResponseLoss(model)(**batch)
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert torch.equal(out[0][0], out[1][0])
    assert out[0][1].keys() == out[1][1].keys()
    assert all(torch.equal(out[0][1][n], out[1][1][n]) for n in out[0][1])

    # through the recipe, with its precision decided as on a bf16 machine: the merged model is fp32 base + delta
    monkeypatch.setattr(sft, "lora_for_autocast", real)
    monkeypatch.setattr(sft.models, "train_precision", lambda *a, **k: bf16_autocast)
    [res] = run_training(cfg)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = load_file(str(Path(res.dir) / "merged/model.safetensors"))
    assert {t.dtype for t in merged.values()} == {torch.float32}
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), res.output)
    expected = reference.merge_and_unload().state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
