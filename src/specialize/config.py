"""Configs: pydantic models loaded from YAML, with `key.sub=value` overrides from the command line."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

T = TypeVar("T", bound=BaseModel)


# Every closed set of names the configs share, declared once.
DType = Literal["auto", "float32", "bfloat16", "float16"]
TemplateName = Literal["alpaca", "chat"]
Method = Literal["full", "lora", "qlora"]
Scheduler = Literal["cosine", "linear", "constant"]
Protocol = Literal["generation", "options"]
Retrieval = Literal["marginalize", "top1", "none"]
Engine = Literal["hf", "vllm"]  # which engine generates text (generation/engines.py)

# The name of the base model among evaluated or served models (adapters may not take it).
BASE = "base"


class ConfigError(ValueError):
    """A config that does not validate, naming the file and the offending key."""


class VLLMSettings(BaseModel):
    """What the vLLM engine is started with (`engine: vllm`). The parallel sizes pass through to vLLM, which
    places the workers itself (multiprocessing on one node, Ray across nodes: docs/architecture.md)."""

    model_config = ConfigDict(extra="forbid")
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)
    distributed_executor_backend: Literal["mp", "ray"] | None = None
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=1)
    max_num_seqs: int | None = Field(None, ge=1)
    max_loras: int | None = Field(None, ge=1, description="LoRA slots per batch (default: every adapter + 1)")
    max_lora_rank: int | None = Field(None, ge=1, description="default: the largest adapter rank, rounded up")
    kv_cache_gib: int = Field(2, ge=1, description="CPU only: KV cache GiB (VLLM_CPU_KVCACHE_SPACE, whole GiB)")
    enforce_eager: bool = False


class ModelConfig(BaseModel):
    """Which model to load and how, and which engine generates text with it."""

    model_config = ConfigDict(extra="forbid")
    spec: str = "embedded"
    dtype: DType = "auto"
    device: str = "cpu"
    threads: int | None = Field(None, ge=1)
    trust_remote_code: bool = False
    revision: str | None = None
    engine: Engine = Field("hf", description="hf: the project's token loop on transformers; vllm: vLLM's engine")
    vllm: VLLMSettings = VLLMSettings()
    compile: bool = Field(
        False,
        description="hf engine: a lone request's decode steps through torch.compile "
        "(~1.7x a batch-1 step on CPU, after ~1 min of compiling; generation/compiled.py)",
    )

    def hashed(self) -> dict[str, Any]:
        """What goes into a run's fingerprint. The engine settings only when vLLM generates, `compile` only when
        on (compiled bf16 kernels round differently): runs made before a setting existed keep their
        fingerprints, so they resume."""
        exclude = set() if self.engine == "vllm" else {"engine", "vllm"}
        if not self.compile:
            exclude.add("compile")
        return self.model_dump(mode="json", exclude=exclude or None)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (["a", "b"], 3); the value is parsed as YAML so numbers, lists and null work."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    try:
        return key.split("."), yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set nested keys; a numeric part indexes into a list (`stages.1.epochs=1`)."""
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node: Any = data
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {part!r} is not an index of a {len(node)}-item list")
                key: Any = int(part)
            else:
                key = part
                if not last and not isinstance(node.get(key), dict | list):
                    node[key] = {}
            if last:
                node[key] = value
            else:
                node = node[key]
    return data


def _defaults(cls: type[BaseModel]) -> dict[str, Any]:
    """Every field's default, as plain data (submodels dumped, so their own defaults are visible)."""
    out: dict[str, Any] = {}
    for name, field in cls.model_fields.items():
        if field.is_required():
            continue
        value = field.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            out[name] = value.model_dump(mode="json")
        elif isinstance(value, dict | list):
            out[name] = copy.deepcopy(value)
    return out


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Validate YAML (optional) + overrides into `cls`; errors name the file and the key path."""
    data: dict[str, Any] = {}
    where = "<overrides>"
    if path is not None:
        where = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = loaded or {}
    if overrides:
        # patch the config over its defaults, so `a.b=1` keeps the other defaults of a submodel `a`
        data = apply_overrides(_deep_merge(_defaults(cls), data), overrides)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{where}: {msgs}") from None


def fill_placeholders(value: Any, **values: str) -> Any:
    """Replace `{name}` in every string of a YAML-like structure (e.g. `{data_root}` in data paths)."""
    if isinstance(value, str):
        for name, v in values.items():
            value = value.replace("{" + name + "}", v)
        return value
    if isinstance(value, dict):
        return {k: fill_placeholders(v, **values) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_placeholders(v, **values) for v in value]
    return value
