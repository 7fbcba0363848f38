"""Eq. 2 (marginalization) and eq. 3 (contrastive) as formulas, and the batched KV-cached loop against a
naive full-recompute loop on a tiny model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from specialize.generation import SamplingParams, contrastive, generate_mixture, marginalize, retrieval_weights
from specialize.models import Precision

FP32 = Precision(torch.float32, None)


def test_marginalize_is_the_weighted_sum_of_distributions():
    torch.manual_seed(0)
    logp = F.log_softmax(torch.randn(2, 3, 11), dim=-1)
    w = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    expected = (w.unsqueeze(-1) * logp.exp()).sum(1)
    assert torch.allclose(marginalize(logp, w).exp(), expected, atol=1e-6)
    assert torch.allclose(marginalize(logp, w).exp().sum(-1), torch.ones(2), atol=1e-6)


def test_contrastive_matches_its_formula():
    expert = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    amateur = torch.log(torch.tensor([[0.6, 0.1, 0.2, 0.1]]))
    scores = contrastive(expert, amateur, alpha=0.2)  # plausible: p >= 0.2 * 0.5 = 0.1 -> tokens 0, 1, 2
    assert math.isinf(scores[0, 3].item()) and scores[0, 3] < 0
    for i in range(3):
        assert scores[0, i].item() == (expert[0, i] - amateur[0, i]).item()
    assert scores.argmax().item() == 1  # the token the expert likes much more than the amateur


def test_retrieval_weights():
    assert retrieval_weights([3.0, 1.0]) == [0.75, 0.25]
    assert retrieval_weights([0.0, 0.0]) == [0.5, 0.5]


class _NoEos:
    """The tokenizer with no EOS, so continuations have a fixed length to compare."""

    eos_token_id = -1

    def __init__(self, tok):
        self.pad_token_id = tok.eos_token_id
        self.decode = tok.decode


def _mix(model, ctxs, w, gen):
    lps = [F.log_softmax(model(torch.tensor([c + gen])).logits[0, -1].float(), -1) for c in ctxs]
    return marginalize(torch.stack(lps)[None], torch.tensor([w]))


def _naive(model, contexts, weights, steps, amateur=None, alpha=0.1):
    """Recompute every context from scratch at every step: the definition, without caches or batching."""
    out = []
    for ctxs, w in zip(contexts, weights, strict=True):
        gen: list[int] = []
        for _ in range(steps):
            with torch.no_grad():
                scores = _mix(model, ctxs, w, gen)
                if amateur is not None:
                    with amateur():
                        scores = contrastive(scores, _mix(model, ctxs, w, gen), alpha)
            gen.append(int(scores.argmax()))
        out.append(gen)
    return out


def test_batched_mixture_equals_naive_definition(tiny_model, gpt2_style_tokenizer):
    tok = gpt2_style_tokenizer
    ids = [tok(t)["input_ids"] for t in ("Background: cats. Pets?", "Dogs bark.", "A longer text on rain.", "Q?")]
    contexts = [ids[:2], ids[2:]]
    weights = [[0.7, 0.3], [0.2, 0.8]]
    steps = 6
    tok_no_eos = _NoEos(tok)
    got = generate_mixture(
        tiny_model, tok_no_eos, contexts, weights, SamplingParams(max_new_tokens=steps), precision=FP32
    )
    assert [list(d.token_ids) for d in got] == _naive(tiny_model, contexts, weights, steps)


def test_contrastive_generation_equals_naive_definition(tiny_model_dir, gpt2_style_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).eval()  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    tok = gpt2_style_tokenizer
    contexts = [[tok("Classify the sentiment.")["input_ids"]], [tok("Why is the sky blue?")["input_ids"]]]
    tok_no_eos = _NoEos(tok)
    got = generate_mixture(model, tok_no_eos, contexts, [[1.0], [1.0]], SamplingParams(max_new_tokens=5),
                           contrastive=0.1, precision=FP32)  # fmt: skip
    assert [list(d.token_ids) for d in got] == _naive(model, contexts, [[1.0], [1.0]], 5, model.disable_adapter, 0.1)
