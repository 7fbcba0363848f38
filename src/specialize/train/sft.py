"""The supervised fine-tuning recipe: stages of (mix -> tokenize -> train -> save), readable top to bottom.

    specialize train CONFIG.yaml [--set stages.1.epochs=1 ...]
    accelerate launch -m specialize.cli train CONFIG.yaml      # or: torchrun --nproc-per-node N -m ...

Each stage's output directory is named by a content hash of everything that determines it (model, method,
template, stage settings, data, seed, parent stage), so a sweep that varies only stage 2 finds stage 1
already trained and reuses it. A stage is finished when its `result.json` exists; until then, rerunning
the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from specialize import models
from specialize.data import Example
from specialize.hashing import Digest, fingerprint
from specialize.io import atomic_path, atomic_write_text
from specialize.prompts import get_template, tokenize_for_training
from specialize.train.batching import StepPlan, collate, micro_batches, response_tokens, shard
from specialize.train.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from specialize.train.config import StageConfig, TrainConfig
from specialize.train.loss import ResponseLoss, honours_packing
from specialize.train.metrics import MetricsLog, TrainProgress
from specialize.train.mixing import build_mix

RESULT = "result.json"


class TrainConfigError(ValueError):
    """A training config that cannot run; raised before any model is loaded."""


@dataclass(frozen=True)
class StageResult:
    name: str
    key: str
    dir: str
    output: str  # adapter directory (LoRA) or model directory (full)
    method: str
    steps: int
    examples: int
    final_loss: float | None
    processes: int = 1
    replica_digest: str = ""  # sha256 of the trainable weights, identical on every process
    reused: bool = False

    @classmethod
    def load(cls, stage_dir: Path) -> StageResult:
        """The stage as recorded, its paths rebased on where it is now: a cache may be moved, or reached by
        another relative path than the run that wrote it."""
        data = json.loads((stage_dir / RESULT).read_text())
        output = stage_dir / Path(data["output"]).relative_to(data["dir"])
        return cls(**{**data, "dir": str(stage_dir), "output": str(output), "reused": True})


@dataclass
class PreparedStage:
    config: StageConfig
    examples: list[Example]
    manifest: dict[str, Any]


# ---------------------------------------------------------------------------------------------- setup


def check_config(cfg: TrainConfig) -> None:
    """Everything that can be checked without a model: fail before any training starts."""
    if cfg.method == "qlora":
        if not torch.cuda.is_available():
            raise TrainConfigError("method 'qlora' needs a CUDA GPU (bitsandbytes 4-bit); on CPU use method: lora")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TrainConfigError("method 'qlora' needs bitsandbytes: pip install bitsandbytes") from None
    for backend in cfg.report_to:
        module = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}.get(backend)
        if module:
            try:
                __import__(module)
            except ImportError:
                raise TrainConfigError(f"report_to {backend!r} needs the {backend} package installed") from None
    models.resolve(cfg.model.spec)


def prepare_stages(cfg: TrainConfig) -> list[PreparedStage]:
    """Build every stage's mix up front so a bad source in stage 2 fails before stage 1 trains."""
    from specialize.data import DataError
    from specialize.train.mixing import MixError

    prepared = []
    for stage in cfg.stages:
        try:
            examples, manifest = build_mix(stage.sources, cfg.seed)
        except (MixError, DataError) as e:
            raise TrainConfigError(f"stage {stage.name!r}: {e}") from None
        prepared.append(PreparedStage(stage, examples, manifest))
    return prepared


def stage_key(cfg: TrainConfig, stage: StageConfig, data_fingerprint: str, parent: str | None) -> str:
    """Content hash of everything that determines a stage's weights."""
    blob = {
        "model": models.model_identity(cfg.model.spec),
        "method": cfg.method,
        "lora": cfg.lora.model_dump() if cfg.method != "full" else None,
        "template": cfg.template,
        "stage": stage.model_dump(exclude={"sources"}),
        "data": data_fingerprint,
        "seed": cfg.seed,
        "parent": parent,
    }
    return fingerprint(blob, length=None)


def stage_dir(cfg: TrainConfig, stage: StageConfig, key: str) -> Path:
    return Path(cfg.output_dir) / "stages" / f"{stage.name}-{key[:12]}"


def planned_stage_dirs(cfg: TrainConfig, prepared: list[PreparedStage]) -> list[Path]:
    """Where each stage's artifacts live (finished ones hold `result.json`), without training anything."""
    dirs, parent = [], None
    for prep in prepared:
        parent = stage_key(cfg, prep.config, prep.manifest["fingerprint"], parent)
        dirs.append(stage_dir(cfg, prep.config, parent))
    return dirs


def base_spec(cfg: TrainConfig, init_from: StageResult | None) -> str:
    """The weights a stage starts from: the previous stage's full weights, else the configured model."""
    return init_from.output if init_from is not None and init_from.method == "full" else cfg.model.spec


def build_model(
    cfg: TrainConfig, init_from: StageResult | None, precision: models.Precision
) -> tuple[torch.nn.Module, Any]:
    """Base model (or the previous stage's full weights) in `precision.param_dtype`, with a trainable LoRA
    adapter when asked."""
    m = cfg.model
    spec = base_spec(cfg, init_from)
    quant = None
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
    model, tokenizer = models.load_model(
        spec, device=m.device, threads=m.threads, trust_remote_code=m.trust_remote_code, revision=m.revision,
        quantization_config=quant, precision=precision,
    )  # fmt: skip
    if cfg.method == "full":
        model.train()
        return model, tokenizer
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model)
    if init_from is not None:  # stage 2 continues the stage-1 adapter
        model = models.attach_adapters(model, {"default": init_from.output}, trainable=True)
    else:
        lora = LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM",
        )  # fmt: skip
        model = get_peft_model(model, lora)
    if cfg.method == "lora" and precision.autocast_dtype is not None:
        lora_for_autocast(model, precision.autocast_dtype)
    model.train()
    return model, tokenizer


def lora_for_autocast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """LoRA layers under autocast without the casts autocast undoes: the frozen base weights are held in its dtype
    (it cast them to it at every forward anyway), and a layer's input is no longer cast to the fp32 adapter's
    dtype first (autocast casts it straight back for the matmul). The numbers are bit-identical
    (`tests/train/test_packing.py`). Norms, embeddings and the trainable adapters keep their precision; a
    merged model is built from a freshly loaded base (`_save_final`), not from these weights."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False
            if isinstance(base := module.get_base_layer(), torch.nn.Linear) and not base.weight.requires_grad:
                base.to(dtype)


def make_scheduler(optimizer: torch.optim.Optimizer, stage: StageConfig, total: int) -> Any:
    warmup = math.ceil(stage.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if stage.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if stage.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model: torch.nn.Module, stage: StageConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # the fused kernel is 1.1-1.3x faster per step on CPU and GPU alike
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, lr=stage.lr, betas=stage.betas, weight_decay=stage.weight_decay, fused=fused)


def tokenize_all(examples: list[Example], cfg: TrainConfig, stage: StageConfig, tokenizer: Any):
    template = get_template(cfg.template, tokenizer)
    features = [tokenize_for_training(e, template, tokenizer, stage.max_length) for e in examples]
    truncation = {
        "examples_truncated": sum(f.truncated for f in features),
        "prompt_tokens_cut": sum(f.prompt_truncated for f in features),
        "response_tokens_cut": sum(f.response_truncated for f in features),
    }
    return features, truncation


# ---------------------------------------------------------------------------------------------- the loop


def train_stage(cfg: TrainConfig, prep: PreparedStage, parent: StageResult | None, accelerator: Any) -> StageResult:
    stage = prep.config
    key = stage_key(cfg, stage, prep.manifest["fingerprint"], parent.key if parent else None)
    sdir = stage_dir(cfg, stage, key)
    main = accelerator.is_main_process
    if (sdir / RESULT).is_file():
        if main:
            print(f"stage {stage.name}: reusing {sdir}")
        return StageResult.load(sdir)

    torch.manual_seed(cfg.seed + accelerator.process_index)  # LoRA init and dropout
    # decided once: the weights are loaded in its param dtype and every forward runs under its autocast
    precision = models.train_precision(cfg.model.dtype, str(accelerator.device), quantized=cfg.method == "qlora")
    model, tokenizer = build_model(cfg, parent, precision)
    features, truncation = tokenize_all(prep.examples, cfg, stage, tokenizer)
    if main:
        sdir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(sdir / "data.json", json.dumps({**prep.manifest, "truncation": truncation}, indent=1))
        atomic_write_text(sdir / "config.json", json.dumps(cfg.model_dump(mode="json"), indent=1))
        if truncation["examples_truncated"]:
            print(f"stage {stage.name}: truncated {truncation} at max_length={stage.max_length}")
        for source in prep.manifest["sources"]:  # skip_invalid sources: every skipped record is reported
            if skipped := source["skipped"]:
                more = f"\n  ... and {len(skipped) - 5} more" if len(skipped) > 5 else ""
                lines = "\n".join(f"  {s}" for s in skipped[:5])
                print(f"stage {stage.name}: source {source['name']!r} skipped {len(skipped)} records:\n{lines}{more}")

    plan = StepPlan(len(features), stage.batch_size, stage.epochs, cfg.seed)
    optimizer = make_optimizer(model, stage)
    scheduler = make_scheduler(optimizer, stage, plan.total_steps)
    start = 0
    if (ckpt := latest_checkpoint(sdir / "checkpoints")) is not None:
        start = load_checkpoint(ckpt, model, optimizer, scheduler, accelerator.process_index)
        if main:
            print(f"stage {stage.name}: resuming from {ckpt} (step {start}/{plan.total_steps})")

    if cfg.compile:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.model.compile(dynamic=True)
    packed = cfg.pack and honours_packing(model, precision.autocast(accelerator.device))
    if cfg.pack and not packed and main:
        print(f"stage {stage.name}: this model does not read packed rows; one padded example per row")
    capacity = stage.max_length if packed else None  # every example fits: tokenize_for_training cuts to it
    loss_fn, optimizer = accelerator.prepare(ResponseLoss(model), optimizer)
    lengths = [len(f.input_ids) for f in features]
    pad_id = tokenizer.pad_token_id
    rank, world = accelerator.process_index, accelerator.num_processes
    log = MetricsLog(sdir, cfg.report_to, enabled=main, start_step=start)
    progress = TrainProgress(stage.name, plan.total_steps, start, enabled=main and cfg.progress)
    last_loss = None
    with progress:
        for step in range(start, plan.total_steps):
            t0 = time.perf_counter()
            indices = plan.indices(step)
            n_target = response_tokens(features, indices)  # global normalizer: the same on every rank
            mine = shard(indices, rank, world)
            weight = 1.0
            if not mine:  # fewer examples than processes: take part in the all-reduce with zero loss
                mine, weight = indices[:1], 0.0
            batches = micro_batches(mine, lengths, stage.micro_batch_size, capacity)
            loss_sum = torch.zeros((), device=accelerator.device)
            n_tokens = sum(lengths[i] for i in mine) if weight else 0
            for j, mb in enumerate(batches):
                rows = [[features[i] for i in row] for row in mb]
                batch = {k: v.to(accelerator.device) for k, v in collate(rows, pad_id, packed=packed).items()}
                # gradients are all-reduced once per step, on its last micro-batch
                sync = contextlib.nullcontext() if j == len(batches) - 1 else accelerator.no_sync(loss_fn)
                with sync, precision.autocast(accelerator.device):
                    nll = loss_fn(**batch)
                # DDP averages gradients over processes, hence * world: the step's gradient is the
                # gradient of (sum of response-token NLL over the whole step) / (its response tokens)
                accelerator.backward(nll * weight * world / n_target)
                loss_sum += nll.detach() * weight
            grad_norm = None
            if stage.max_grad_norm is not None:
                grad_norm = float(accelerator.clip_grad_norm_(loss_fn.parameters(), stage.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            total_loss = float(accelerator.reduce(loss_sum, reduction="sum")) / n_target
            tokens = int(accelerator.reduce(torch.tensor(n_tokens, device=accelerator.device), reduction="sum"))
            dt = time.perf_counter() - t0
            last_loss = total_loss
            record = {
                "step": step + 1, "epoch": step // plan.steps_per_epoch + 1, "loss": total_loss,
                "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": tokens,
                "response_tokens": n_target, "tokens_per_s": tokens / dt, "step_s": dt,
            }  # fmt: skip
            log.write(record)
            progress.advance(record)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < plan.total_steps:
                _checkpoint(accelerator, sdir, step + 1, loss_fn, optimizer, scheduler, cfg.keep_checkpoints)
    log.close()

    model = accelerator.unwrap_model(loss_fn).model
    replicas = _check_replicas(accelerator, model)
    out = sdir / ("adapter" if cfg.method != "full" else "model")
    if main:
        _save_final(cfg, model, tokenizer, out, sdir, base_spec(cfg, parent), precision)
        result = StageResult(
            name=stage.name, key=key, dir=str(sdir), output=str(out), method=cfg.method,
            steps=plan.total_steps, examples=len(features), final_loss=last_loss, processes=world,
            replica_digest=replicas,
        )  # fmt: skip
        atomic_write_text(sdir / RESULT, json.dumps(asdict(result), indent=1))
    accelerator.wait_for_everyone()
    return result if main else replace(StageResult.load(sdir), reused=False)


def _checkpoint(accelerator, sdir, step, loss_fn, optimizer, scheduler, keep) -> None:
    states = [rng_state()]
    if accelerator.num_processes > 1:
        gathered: list[Any] = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(gathered, states[0])
        states = gathered
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(loss_fn).model
        save_checkpoint(sdir / "checkpoints", step, model, optimizer, scheduler, states, keep)
    accelerator.wait_for_everyone()


def _check_replicas(accelerator: Any, model: torch.nn.Module) -> str:
    """Digest of the trainable weights; under DDP every process must hold the same one."""
    h = Digest()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name)
            h.update(p.detach().float().cpu().numpy().tobytes())
    digest = h.hexdigest()
    if accelerator.num_processes > 1:
        digests: list[Any] = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"replicas diverged: trainable-weight digests per process {digests}")
    return digest


def _save_final(
    cfg: TrainConfig, model: Any, tokenizer: Any, out: Path, sdir: Path, spec: str, precision: models.Precision
) -> None:
    # the template and base model travel inside the checkpoint: eval, serve and synth read them back
    meta = models.CheckpointMeta(cfg.template, models.model_identity(cfg.model.spec), cfg.method)
    with atomic_path(out, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta.write(tmp)
    if cfg.merge and cfg.method != "full":
        if cfg.method == "lora":  # merge into the base as loaded, not into its lowered copy (`lora_for_autocast`)
            m = cfg.model
            base, _ = models.load_model(spec, device=m.device, trust_remote_code=m.trust_remote_code,
                                        revision=m.revision, precision=precision)  # fmt: skip
            model = models.attach_adapters(base, {"default": out})
        merged = model.merge_and_unload()
        with atomic_path(sdir / "merged", is_dir=True) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            meta.write(tmp)


def run_training(cfg: TrainConfig) -> list[StageResult]:
    """Train every stage in order; each starts from the previous stage's adapter or weights."""
    from accelerate import Accelerator

    check_config(cfg)
    prepared = prepare_stages(cfg)
    models.set_threads(cfg.model.threads)
    accelerator = Accelerator(cpu=cfg.model.device == "cpu")
    results: list[StageResult] = []
    parent = None
    for prep in prepared:
        parent = train_stage(cfg, prep, parent, accelerator)
        results.append(parent)
    if accelerator.is_main_process:
        summary = {"stages": [asdict(r) for r in results], "final": results[-1].output}
        atomic_write_text(Path(cfg.output_dir) / RESULT, json.dumps(summary, indent=1))
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a live gloo group at interpreter exit can abort
    return results


__all__ = ["StageResult", "TrainConfigError", "run_training"]
