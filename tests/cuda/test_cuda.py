"""The CUDA paths: decoding, batched LoRA, option ranking and training on a GPU give what they give on the CPU.

Skipped where no CUDA device is visible (CI has none); run on a GPU machine with `pytest tests/cuda`. Models are
the tiny random-init ones in fp32, so CPU and GPU compute the same numbers up to rounding and every comparison
below can be exact on tokens and tight on floats."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specialize.eval.options import score_options
from specialize.generation import SamplingParams
from specialize.generation.batch import generate_mixture, run_requests
from specialize.generation.loop import Request
from specialize.generation.lora import NO_ADAPTER, StackedLoRA
from specialize.models import Precision, attach_adapters, load_model, select_precision, train_precision
from specialize.train import TrainConfig, run_training

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FP32 = Precision(torch.float32, None)
IDS = [[5, 17, 30, 2, 9, 44, 12], [8, 3, 60, 21], [11, 70, 2, 19, 33, 6, 1, 7, 7, 90, 4], [4, 28]]


class _NoEos:
    """The tokenizer with no EOS, so every continuation runs to max_new_tokens and lengths are comparable."""

    eos_token_id = -1

    def __init__(self, tok):
        self.pad_token_id = tok.eos_token_id
        self.decode = tok.decode


def on(model, device: str):
    return copy.deepcopy(model).to(device).eval()


def test_auto_precision_is_bf16_weights_for_inference_and_fp32_masters_for_training():
    assert select_precision("auto", "cuda") == Precision(torch.bfloat16, None)
    assert train_precision("auto", "cuda") == Precision(torch.float32, torch.bfloat16)


def test_loop_decodes_the_same_tokens_on_cuda_as_on_cpu(tiny_model, gpt2_style_tokenizer):
    """Greedy, seeded sampling and top-p requests of different lengths in one running batch."""
    tok = _NoEos(gpt2_style_tokenizer)
    params = [
        SamplingParams(max_new_tokens=12),
        SamplingParams(max_new_tokens=9, temperature=0.8, seed=3),
        SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=11),
        SamplingParams(max_new_tokens=5),
    ]

    def run(device: str) -> list[tuple[int, ...]]:
        reqs = [Request([ids], p) for ids, p in zip(IDS, params, strict=True)]
        return [o.token_ids for o in run_requests(on(tiny_model, device), tok, reqs, batch_size=4, precision=FP32)]

    cpu, gpu = run("cpu"), run("cuda")
    assert gpu == cpu
    assert [len(t) for t in gpu] == [12, 9, 12, 5]


def test_mixture_and_contrastive_decoding_on_cuda_equal_cpu(tiny_model_dir, tiny_adapters, gpt2_style_tokenizer):
    """Eq. 2 over k contexts with retrieval weights, and eq. 3 against the base (adapter rows beside base rows)."""
    model, _ = load_model(str(tiny_model_dir), dtype="float32")
    model = attach_adapters(model, {"alpha": tiny_adapters["alpha"]})
    tok = _NoEos(gpt2_style_tokenizer)
    contexts, weights = [IDS[:2], IDS[2:]], [[0.7, 0.3], [0.2, 0.8]]
    outs = {}
    for device in ("cpu", "cuda"):
        m = on(model, device)
        mixed = generate_mixture(m, tok, contexts, weights, SamplingParams(max_new_tokens=8), precision=FP32)
        contrast = generate_mixture(m, tok, contexts, weights, SamplingParams(max_new_tokens=8), contrastive=0.1,
                                    precision=FP32)  # fmt: skip
        outs[device] = [o.token_ids for o in mixed + contrast]
    assert outs["cuda"] == outs["cpu"]
    assert outs["cpu"][:2] != outs["cpu"][2:]  # eq. 3 really changed the choices, so the equality means something


def test_stacked_lora_rows_on_cuda_equal_each_adapter_alone(tiny_model_dir, tiny_adapters):
    model, _ = load_model(str(tiny_model_dir), dtype="float32", device="cuda")
    model = attach_adapters(model, dict(tiny_adapters))
    model.set_adapter("alpha")  # what a row with adapter None reads
    stack, why = StackedLoRA.build(model)
    assert stack is not None, why
    adapters = ["alpha", NO_ADAPTER, "beta", None]
    x = torch.tensor([IDS[0], IDS[0], IDS[0], IDS[0]], device="cuda")
    with torch.inference_mode():
        with stack.rows(adapters):
            batched = model(input_ids=x).logits
        model.set_adapter("alpha")
        alpha = model(input_ids=x[:1]).logits[0]
        with model.disable_adapter():
            base = model(input_ids=x[:1]).logits[0]
        model.set_adapter("beta")
        beta = model(input_ids=x[:1]).logits[0]
    torch.testing.assert_close(batched[0], alpha, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched[1], base, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched[2], beta, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched[3], alpha, rtol=1e-4, atol=1e-4)  # None: the active adapter
    assert not torch.allclose(alpha, beta, atol=1e-3) and not torch.allclose(alpha, base, atol=1e-3)


def test_option_scores_on_cuda_equal_cpu(tiny_model, gpt2_style_tokenizer):
    """The shared-prefix KV path: prompts sharing a long head, options of several tokens."""
    head = list(range(3, 40))
    prompts = [[*head, 41, 42], [*head, 50], [*head, 60, 61, 62]]
    options = [["positive", "negative"], ["yes", "no", "maybe"], ["neutral", "negative"]]
    got = {d: score_options(on(tiny_model, d), gpt2_style_tokenizer, prompts, options, precision=FP32)
           for d in ("cpu", "cuda")}  # fmt: skip
    for cpu_row, gpu_row in zip(got["cpu"], got["cuda"], strict=True):
        for c, g in zip(cpu_row, gpu_row, strict=True):
            assert g.option == c.option and g.logprob == pytest.approx(c.logprob, abs=1e-4)


def _alpaca(path: Path, n: int = 24) -> Path:
    words = ["cat", "dog", "rain", "sun", "tree", "river", "stone", "cloud", "bird", "fish"]
    records = [{"instruction": f"Name the {words[i % 10]}.", "input": " ".join(words[: 1 + i % 7]),
                "output": " ".join(words[i % 5 :: 2])} for i in range(n)]  # fmt: skip
    path.write_text(json.dumps(records))
    return path


def _cfg(out: Path, model_dir: Path, data: Path, **over) -> TrainConfig:
    stage = {"name": "s1", "sources": [{"path": str(data)}], "epochs": 4, "batch_size": 4, "micro_batch_size": 2,
             "lr": 1e-3, "max_length": 256}  # fmt: skip
    return TrainConfig.model_validate({
        "model": {"spec": str(model_dir), "dtype": "auto", "device": "cuda"}, "method": "lora",
        "lora": {"dropout": 0.1}, "output_dir": str(out), "save_every": 6, "progress": False, "stages": [stage],
        **over,
    })  # fmt: skip


def test_training_on_cuda_learns_and_resumes_to_the_same_adapter(tmp_path, tiny_model_dir):
    """bf16 autocast over fp32 masters on the GPU; a rerun after losing the end of a run resumes from its last
    checkpoint (CUDA RNG for dropout included) and ends with the same adapter as the uninterrupted run."""
    data = _alpaca(tmp_path / "alpaca.json")
    [ref] = run_training(_cfg(tmp_path / "ref", tiny_model_dir, data))
    losses = [json.loads(x)["loss"] for x in (Path(ref.dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 24 and sum(losses[-4:]) < sum(losses[:4])

    [run] = run_training(_cfg(tmp_path / "run", tiny_model_dir, data))
    stage = Path(run.dir)
    # a crash after step 18's checkpoint: nothing from later steps survives
    (stage / "result.json").unlink()
    shutil.rmtree(run.output)
    (tmp_path / "run" / "result.json").unlink(missing_ok=True)
    assert sorted(p.name for p in (stage / "checkpoints").glob("step-*"))[-1] == "step-0000018"
    [again] = run_training(_cfg(tmp_path / "run", tiny_model_dir, data))
    a = load_file(str(Path(ref.output) / "adapter_model.safetensors"))
    b = load_file(str(Path(again.output) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))


def test_packed_rows_on_cuda_give_the_unpacked_loss_and_gradients(tiny_model, gpt2_style_tokenizer):
    """Packing on the GPU: transformers' block-diagonal mask from restarting position ids (sdpa on CUDA)."""
    from specialize.data import Example
    from specialize.prompts import AlpacaTemplate, tokenize_for_training
    from specialize.train.batching import collate, pack_rows
    from specialize.train.loss import ResponseLoss, honours_packing

    model = on(tiny_model, "cuda")
    feats = [tokenize_for_training(Example(id=str(i), instruction=f"Question {i}?", output="yes " * (i + 1)),
                                   AlpacaTemplate(), gpt2_style_tokenizer, 256) for i in range(6)]  # fmt: skip
    rows = pack_rows(range(6), [len(f.input_ids) for f in feats], capacity=256)
    assert honours_packing(model) and any(len(r) > 1 for r in rows)
    pad = gpt2_style_tokenizer.eos_token_id
    results = []
    for batch in (collate([[feats[i] for i in r] for r in rows], pad, packed=True), collate([[f] for f in feats], pad)):
        model.zero_grad()
        loss = ResponseLoss(model)(**{k: v.cuda() for k, v in batch.items()})
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
