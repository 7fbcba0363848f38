"""The training objective: summed next-token NLL over response tokens only (Shi et al., eq. 1).

Logits are computed only at the positions that predict a response token. For instruction data whose
responses are short (classification labels), this skips most of the vocabulary projection.
"""

from __future__ import annotations

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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if self.sparse:
            base = _base(self.model)
            hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logits = base.get_output_embeddings()(hidden[:, :-1][keep])
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][keep]
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")
