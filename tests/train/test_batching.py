"""Step plans, micro-batching, collation and the response-only loss."""

from __future__ import annotations

import torch

from specialize.data import Example
from specialize.prompts import IGNORE_INDEX, AlpacaTemplate, tokenize_for_training
from specialize.train.batching import StepPlan, collate, micro_batches, response_tokens, shard
from specialize.train.loss import ResponseLoss


def test_step_plan_covers_each_epoch_once():
    plan = StepPlan(n_examples=10, batch_size=4, epochs=2, seed=0)
    assert plan.steps_per_epoch == 3 and plan.total_steps == 6
    for epoch in range(2):
        seen = [i for s in range(3) for i in plan.indices(epoch * 3 + s)]
        assert sorted(seen) == list(range(10))
    assert plan.indices(0) != plan.indices(3)  # reshuffled per epoch
    assert StepPlan(10, 4, 2, 0).indices(4) == plan.indices(4)  # pure: resume and ranks agree


def test_micro_batches_sorted_by_length_and_shards_partition():
    mbs = micro_batches([0, 1, 2, 3, 4], lengths=[5, 1, 4, 2, 3], size=2)
    assert mbs == [[[1], [3]], [[4], [2]], [[0]]]
    idx = list(range(7))
    assert sorted(shard(idx, 0, 2) + shard(idx, 1, 2)) == idx


def test_collate_masks_padding_by_position_even_when_pad_is_eos(gpt2_style_tokenizer):
    tok = gpt2_style_tokenizer
    t = AlpacaTemplate()
    feats = [tokenize_for_training(Example(id=str(i), instruction="Say it.", output=o), t, tok, 128)
             for i, o in enumerate(["yes", "a much longer answer here"])]  # fmt: skip
    batch = collate([[f] for f in feats], pad_id=tok.eos_token_id)
    short = len(feats[0].input_ids)
    assert batch["input_ids"][0, short:].eq(tok.eos_token_id).all()  # padded with EOS...
    assert batch["labels"][0, short:].eq(IGNORE_INDEX).all()  # ...but padding carries no loss
    assert batch["labels"][0, short - 1] == tok.eos_token_id  # while the real EOS does
    assert batch["attention_mask"][0].sum() == short
    assert response_tokens(feats, [0, 1]) == int(batch["labels"].ne(IGNORE_INDEX).sum())


def test_response_loss_matches_full_logits_on_response_positions_only(tiny_model, gpt2_style_tokenizer):
    tok = gpt2_style_tokenizer
    t = AlpacaTemplate()
    feats = [tokenize_for_training(Example(id=str(i), instruction=q, output=a), t, tok, 128)
             for i, (q, a) in enumerate([("Classify.", "positive"), ("Why?", "Because the sky is blue.")])]  # fmt: skip
    batch = collate([[f] for f in feats], pad_id=tok.eos_token_id)
    loss = ResponseLoss(tiny_model)(**batch)
    assert ResponseLoss(tiny_model).sparse
    logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.float(), -1)
    manual = 0.0
    for row, f in enumerate(feats):
        for pos in range(f.prompt_len, len(f.input_ids)):  # response tokens and EOS, nothing else
            manual -= logp[row, pos - 1, f.input_ids[pos]].item()
    assert abs(loss.item() - manual) < 1e-4
    dense = ResponseLoss(tiny_model)
    dense.sparse = False
    assert abs(dense(**batch).item() - loss.item()) < 1e-4
