"""The training objective: summed next-token NLL over response tokens only (Shi et al., eq. 1).

Logits are computed only at the positions that predict a response token. For instruction data whose
responses are short (classification labels), this skips most of the vocabulary projection.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specialize.prompts import IGNORE_INDEX


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_sparse_logits(model: Any) -> bool:
    """Models that post-process logits (soft-capping, scaling) need the full forward."""
    cfg = _base(model).config
    return not (getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None))


class ResponseLoss(nn.Module):
    """Wraps a causal LM so that forward(...) returns the summed response NLL; DDP wraps this module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.sparse = supports_sparse_logits(model)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Rows as `batching.collate` makes them: padded with an attention mask, or packed with position ids.
        No KV cache: training never reads one back, and transformers reads packed rows only without one."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": False}  # fmt: skip
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if self.sparse:
            base = _base(self.model)
            hidden = base.get_decoder()(**inputs).last_hidden_state
            logits = base.get_output_embeddings()(hidden[:, :-1][keep])
        else:
            logits = self.model(**inputs).logits[:, :-1][keep]
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def honours_packing(model: nn.Module, autocast: contextlib.AbstractContextManager[Any] | None = None) -> bool:
    """Whether the model reads packed rows (position ids restarting per example, no attention mask) as
    separate examples: a short sequence gives the same logits alone and packed after another one. Models
    whose attention ignores position ids for masking would let examples attend to each other. Run under the
    training's `autocast`, which low-precision weights need."""
    base = _base(model)
    device = next(base.parameters()).device
    vocab = base.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 9), generator=g).to(device)
    restart = torch.cat([torch.arange(5), torch.arange(4)])[None].to(device)
    training = base.training
    base.eval()  # no dropout in the comparison
    try:
        with torch.no_grad(), autocast or contextlib.nullcontext():
            alone = base(input_ids=ids[:, 5:], use_cache=False).logits[0].float()
            packed = base(input_ids=ids, position_ids=restart, use_cache=False).logits[0, 5:].float()
            joined = base(input_ids=ids, use_cache=False).logits[0, 5:].float()  # what attending across gives
    finally:
        base.train(training)
    # relative to what crossing the boundary changes, so that low-precision weights are judged fairly
    return bool((packed - alone).abs().max() <= 0.05 * (joined - alone).abs().max())
