"""Shared fixtures: real data from ../shared/data, the embedded model, and tiny offline tokenizers/models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # the thread pool stalls under contention on 2 cores

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPECIALIZE_SHARED_DATA", REPO.parent / "shared" / "data"))

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nClassify the sentiment.\n\n### Input:\nGreat food!\n\n### Response:\npositive",
    "The quick brown fox jumps over the lazy dog. Élan, naïve café, über, 東京, emoji 🙂.",
    "negative neutral positive yes no maybe, punctuation: ; ! ? ... -- 'quotes' \"double\"",
] * 20


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.fail(f"real data not found at {SHARED_DATA}; clone beside ../shared or set SPECIALIZE_SHARED_DATA")
    return SHARED_DATA


def _byte_level_bpe(bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<s>"] if bos else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos:  # Llama-style: the tokenizer prepends BOS to every encoded text
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
        )
    # GPT-2 style: bos == eos == <|endoftext|>, no pad token until a loader sets pad = eos
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def gpt2_style_tokenizer():
    return _byte_level_bpe(bos=False)


@pytest.fixture(scope="session")
def bos_tokenizer():
    return _byte_level_bpe(bos=True)


def _tiny_llama(tokenizer, hidden: int, heads: int, kv_heads: int):
    """A random-init (seed 0) 2-layer Llama sharing the tokenizer's vocabulary, EOS doubling as BOS and pad."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model(gpt2_style_tokenizer):
    """A random-init 2-layer Llama sharing the GPT-2-style tokenizer's vocabulary."""
    return _tiny_llama(gpt2_style_tokenizer, hidden=32, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the real embedded SmolLM2-135M-Instruct."""
    from specialize.models import load_model

    return load_model("embedded", dtype="float32")  # exact: tests compare paths token for token


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, gpt2_style_tokenizer) -> Path:
    """The tiny model saved as a local model directory, usable as a model spec."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model.save_pretrained(path)
    gpt2_style_tokenizer.save_pretrained(path)
    return path


def _random_adapters(tmp_path_factory, model_dir: Path) -> dict[str, Path]:
    """Two random (non-zero) LoRA adapters of different ranks on a model directory, saved as adapter dirs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for i, name in enumerate(["alpha", "beta"]):
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir))
        # init_lora_weights=False: B is random too, so each adapter really changes the model
        cfg = LoraConfig(r=4 + 4 * i, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(base, cfg)
        out[name] = tmp_path_factory.mktemp(name) / "adapter"
        model.save_pretrained(out[name])
    return out


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    return _random_adapters(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="session")
def vllm_tiny_model_dir(tmp_path_factory, gpt2_style_tokenizer) -> Path:
    """A random-init 2-layer Llama with 32-wide heads (the smallest vLLM's CPU attention takes), saved."""
    path = tmp_path_factory.mktemp("tiny-vllm") / "model"
    _tiny_llama(gpt2_style_tokenizer, hidden=64, heads=2, kv_heads=1).save_pretrained(path)
    gpt2_style_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def vllm_tiny_adapters(tmp_path_factory, vllm_tiny_model_dir) -> dict[str, Path]:
    return _random_adapters(tmp_path_factory, vllm_tiny_model_dir)
