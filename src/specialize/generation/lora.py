"""Many LoRA adapters in one batch, applied in one batched operation per layer (the gather-matmul that Punica
and S-LoRA call BGMV), instead of PEFT's per-adapter loop.

PEFT stays the on-disk and in-memory format (adapters are loaded, mixed and deleted with PEFT); this module only
replaces how a mixed batch computes the adapters' deltas. PEFT's `adapter_names` path gathers each adapter's rows,
casts them, runs two rank-r matmuls and scatters the result back, for every adapter and every layer (about half
of a mixed decode step on the embedded model). Here every LoRA layer keeps its adapters stacked side by side,
A as [in, S*R] and B as [S*R, out] (S adapters, ranks zero-padded to the largest R, each B pre-multiplied by
its scaling), and a forward computes, for the adapters present in the batch only,

    y = base(x) + ((x @ A_present) * M) @ B_present

where the row mask M keeps each row's own adapter's R columns. A row without an adapter has an all-zero mask, so
its delta is exactly zero: base rows can never receive another adapter's weights (the failure of an indexing
scheme that maps "no adapter" to -1 and so to the last slot).

Only plain LoRA on `nn.Linear` layers is stacked. DoRA and the other LoRA variants, LoRA biases, merged
adapters, several active adapters, `modules_to_save`, trainable tokens and quantized base layers run on PEFT's
own path (exact, slower); `StackedLoRA.build` says why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

NO_ADAPTER = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch


def tuner_layers(model: Any) -> list[Any]:
    """Every module PEFT switches on and off (adapter layers and `modules_to_save` wrappers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer | AuxiliaryTrainingWrapper)]


@contextlib.contextmanager
def adapters_off(layers: Sequence[Any]) -> Iterator[None]:
    """PEFT's adapters switched off for one forward by each layer's own flag, the one `disable_adapters` reads.
    PEFT's `disable_adapter()` does the same by walking the whole model and re-setting `requires_grad` on every
    adapter weight: ~65 ms per call on the embedded model with 4 adapters, as long as a decode step."""
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, was in zip(layers, before, strict=True):
            m._disable_adapters = was


def _lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if type(m) is Linear]


def unsupported(model: Any) -> str | None:
    """Why this PeftModel's adapters cannot be stacked, or None when they can."""
    from peft.tuners.lora.layer import LoraLayer

    configs = getattr(model, "peft_config", {})
    for name, cfg in configs.items():
        if str(getattr(cfg, "peft_type", "")).upper().removeprefix("PEFTTYPE.") != "LORA":
            return f"adapter {name!r} is not LoRA"
        if getattr(cfg, "modules_to_save", None) or getattr(cfg, "trainable_token_indices", None):
            return f"adapter {name!r} trains whole modules or tokens besides its LoRA weights"
    if len(getattr(model, "active_adapters", []) or []) > 1:
        return "several adapters are active at once"
    plain = set(map(id, _lora_layers(model)))
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not module.lora_A:
            continue
        if id(module) not in plain:
            return f"{type(module).__name__} layers (only LoRA on nn.Linear is stacked)"
        if module.merged or module.fan_in_fan_out:
            return "merged or fan-in-fan-out LoRA layers"
        if module.lora_variant or any(module.lora_bias.values()):
            return "LoRA variants (DoRA, aLoRA, ...) or LoRA biases"
    return None


class _Layer:
    """One LoRA layer's adapters side by side: A [in, S, R] and B [S, R, out] with the scaling folded into B, and
    the same as 2-D matrices for a batch that holds every adapter. Kept in float32 whatever the base's dtype, as
    PEFT keeps adapter weights: they are small, and on CPU a rank-r float32 matmul costs less than a bf16 one."""

    def __init__(self, module: Any, names: Sequence[str], rank: int):
        weight = module.base_layer.weight
        out_f, in_f = weight.shape
        a = torch.zeros((in_f, len(names), rank), device=weight.device)
        b = torch.zeros((len(names), rank, out_f), device=weight.device)
        for s, name in enumerate(names):
            if name in module.lora_A:
                la, lb = module.lora_A[name].weight, module.lora_B[name].weight  # [r, in], [out, r]
                r = la.shape[0]
                a[:, s, :r] = la.detach().t().float()
                b[s, :r, :] = lb.detach().t().float() * module.scaling[name]
        self.a, self.b = a, b
        self.a_all, self.b_all = a.reshape(in_f, -1), b.reshape(-1, out_f)

    def delta(self, x: torch.Tensor, present: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """Each row's own adapter's update for input x [rows, T, in] (present: the slots in the batch, None
        when all are)."""
        if present is None:
            a, b = self.a_all, self.b_all
        else:
            a = self.a.index_select(1, present).reshape(self.a.shape[0], -1)
            b = self.b.index_select(0, present).reshape(-1, self.b.shape[-1])
        return (x.float() @ a).mul_(mask) @ b


class StackedLoRA:
    """The adapters of a PeftModel stacked for batched application. `rows(adapters)` is the context of one
    forward: each row's adapter name (None: the active adapter; `NO_ADAPTER`: none)."""

    def __init__(self, model: Any, tuners: list[Any] | None = None):
        self.model = model
        self.names = list(model.peft_config)
        self.slot = {name: i for i, name in enumerate(self.names)}
        modules = _lora_layers(model)
        self.rank = max((m.lora_A[n].weight.shape[0] for m in modules for n in m.lora_A), default=1)
        self.layers = {id(m): _Layer(m, self.names, self.rank) for m in modules}
        self._present: torch.Tensor | None = None  # slots in this forward's rows
        self._mask: torch.Tensor | None = None  # [rows, 1, |present| * R]
        self._tuners = tuners if tuners is not None else tuner_layers(model)  # the loop passes the list it has
        self._hooks = [m.register_forward_hook(self._hook) for m in modules]

    @classmethod
    def build(cls, model: Any, tuners: list[Any] | None = None) -> tuple[StackedLoRA | None, str | None]:
        """(stack, None), or (None, why not) for a model whose adapters must run on PEFT's path. `tuners`: the
        model's `tuner_layers`, when the caller has them (walking ~4,000 modules once is enough)."""
        if not hasattr(model, "peft_config"):
            return None, "not a PeftModel"
        why = unsupported(model)
        return (None, why) if why else (cls(model, tuners), None)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _slots(self, adapters: Sequence[str | None]) -> list[int]:
        active = self.model.active_adapters[0] if self.model.active_adapters else None
        out = []
        for a in adapters:
            name = active if a is None else a
            if name == NO_ADAPTER or name is None:
                out.append(-1)
            elif name not in self.slot:
                raise KeyError(f"no adapter named {name!r} is loaded")
            else:
                out.append(self.slot[name])
        return out

    @contextlib.contextmanager
    def rows(self, adapters: Sequence[str | None], tokens: Sequence[int] | None = None) -> Iterator[None]:
        """One forward with PEFT's own LoRA switched off and each row's delta added by the stacked layers.
        `tokens`: for a ragged forward (one sequence holding every row's tokens end to end, `ragged.py`), how
        many consecutive tokens each row has."""
        slots = self._slots(adapters)
        present = sorted({s for s in slots if s >= 0})
        if not present:  # every row reads the base: nothing to add
            with adapters_off(self._tuners):
                yield
            return
        mask = torch.zeros((len(slots), len(present), self.rank))
        for row, s in enumerate(slots):
            if s >= 0:
                mask[row, present.index(s)] = 1
        device = next(iter(self.layers.values())).a.device
        self._present = None if len(present) == len(self.names) else torch.tensor(present, device=device)
        mask = mask.reshape(len(slots), 1, -1)
        if tokens is not None:  # one mask row per token of a single sequence: [1, sum(tokens), |present| * R]
            mask = mask.repeat_interleave(torch.tensor(tokens), dim=0).reshape(1, -1, mask.shape[-1])
        self._mask = mask.to(device)
        try:
            with adapters_off(self._tuners):
                yield
        finally:
            self._present = self._mask = None

    def _hook(self, module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if self._mask is None:
            return None  # outside `rows`: PEFT's own forward ran as usual
        delta = self.layers[id(module)].delta(args[0], self._present, self._mask)
        return output.add_(delta.to(output.dtype))
