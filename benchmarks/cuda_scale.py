"""The CUDA paths at 1B scale, each beside its peer in one run, against ceilings measured in the same run.

No weights can reach the GPU machines this project is lent (no network there), so the model is a random-init
Llama of Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads / 8 KV heads, FFN 8192) with SmolLM2's
vocabulary (49,152): speed does not depend on what the weights say. Prompts are random token ids.

- decode: our token loop (`run_requests`) vs transformers' `generate`, bf16 weights, greedy, every row runs
  `--new` tokens (ignore_eos): batch 1, and `--rows` prompts at once;
- training: `specialize train` (full fine-tuning and LoRA r 8, fp32 masters + bf16 autocast, batch 8 x
  `--seq`) vs a bare PyTorch loop over the same batches (same model, same autocast, fused AdamW), MFU =
  6 x parameters x tokens/s / the best bf16 matmul rate measured here (LoRA: the frozen base's backward
  still costs ~2/3 of full fine-tuning's FLOPs, so its MFU is quoted with the same 6N).

    python benchmarks/cuda_scale.py [--new 128] [--rows 64] [--seq 512] [--steps 8]
    python benchmarks/cuda_scale.py --smoke   # a 2-layer model on the CPU: checks the script before a lease
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from specialize.generation import SamplingParams
from specialize.generation.batch import run_requests
from specialize.generation.loop import Request
from specialize.models import Precision

SHAPE = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=49152,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def sync_time(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def ceilings() -> tuple[float, float]:
    """(best bf16 matmul FLOP/s over the model's GEMM shapes and 8192^3, device copy bytes/s read + written)."""
    best = 0.0
    shapes = [(4096, 2048, 8192), (4096, 8192, 2048), (4096, 2048, 2048), (8192, 8192, 8192)]
    for m, k, n in shapes if DEVICE == "cuda" else [(256, 256, 256)]:
        a = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        b = torch.randn(k, n, device=DEVICE, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        reps = 20
        best = max(best, 2 * m * k * n * reps / sync_time(lambda: [a @ b for _ in range(reps)]))  # noqa: B023
    x = torch.empty(2 * 1024**3 if DEVICE == "cuda" else 2**26, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    y.copy_(x)
    copy = 2 * x.numel() * 10 / sync_time(lambda: [y.copy_(x) for _ in range(10)])
    return best, copy  # x and y are freed on return


class _NoEosTok:
    eos_token_id = -1
    pad_token_id = 0

    def decode(self, ids, **_):
        return ""


def decode(model, rows: int, new: int, prompt_len: int = 128) -> dict[str, float]:
    from transformers import GenerationConfig

    g = torch.Generator().manual_seed(rows)
    prompts = [torch.randint(1, 49152, (prompt_len,), generator=g).tolist() for _ in range(rows)]
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    bf16 = Precision(torch.bfloat16, None)

    def ours():
        out = run_requests(model, _NoEosTok(), [Request([p], params) for p in prompts], batch_size=rows,
                           precision=bf16)  # fmt: skip
        assert all(len(o.token_ids) == new for o in out)

    ids = torch.tensor(prompts, device=DEVICE)
    cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=0)  # fmt: skip

    def peer():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        assert out.shape[1] == prompt_len + new

    ours(), peer()  # warm-up: kernels, allocator
    t_ours, t_peer = sync_time(ours), sync_time(peer)
    return {"rows": rows, "ours_tok_s": rows * new / t_ours, "generate_tok_s": rows * new / t_peer,
            "ratio": t_peer / t_ours}  # fmt: skip


def write_model(out: Path) -> tuple[Path, int]:
    """The random-init model (bf16 safetensors) with a byte-level BPE tokenizer trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    model.to(torch.bfloat16).save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(
        [" ".join(WORDS)] * 50,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(out)  # fmt: skip
    return out, n


WORDS = [
    "the",
    "river",
    "stone",
    "cloud",
    "bird",
    "fish",
    "cat",
    "dog",
    "rain",
    "sun",
    "tree",
    "over",
    "under",
    "quickly",
    "slowly",
    "answer",
]


def write_data(path: Path, n: int, seq: int) -> Path:
    """Alpaca records long enough that every example fills `seq` tokens (responses are half of each)."""
    g = torch.Generator().manual_seed(0)

    def text(k: int) -> str:
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))

    path.write_text(json.dumps([{"instruction": text(seq // 8), "input": "", "output": text(seq // 2)}
                                for _ in range(n)]))  # fmt: skip
    return path


def train_ours(model_dir: Path, data: Path, method: str, seq: int, steps: int) -> float:
    from specialize.train import TrainConfig, run_training

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.model_validate({
            "model": {"spec": str(model_dir), "device": DEVICE}, "method": method, "output_dir": out,
            "save_every": 0, "progress": False, "lora": {"dropout": 0.0},
            "stages": [{"name": "bench", "sources": [{"path": str(data)}], "epochs": 1, "batch_size": 8,
                        "micro_batch_size": 8, "lr": 1e-5, "max_length": seq}],
        })  # fmt: skip
        [res] = run_training(cfg)
        rows = [json.loads(x) for x in (Path(res.dir) / "metrics.jsonl").read_text().splitlines()][2 : steps + 2]
    return sum(r["tokens"] for r in rows) / sum(r["step_s"] for r in rows)


def train_bare(model_dir: Path, seq: int, steps: int) -> float:
    """Full fine-tuning as a bare loop: the floor our recipe's bookkeeping is measured against."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(1, 300, (8, seq), device=DEVICE)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    t = sync_time(lambda: [step() for _ in range(steps)])
    return 8 * seq * steps / t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--smoke", action="store_true", help="a 2-layer model on the CPU, few steps and tokens")
    args = ap.parse_args()
    if args.smoke:
        global DEVICE
        DEVICE = "cpu"
        SHAPE.update(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
        args.new, args.rows, args.seq, args.steps = 4, 4, 64, 2
    torch.backends.cuda.matmul.allow_tf32 = True  # what a GPU user runs; the fp32 masters' optimizer math only
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)"
    print(f"{name} | torch {torch.__version__}")
    peak, copy = ceilings()
    print(f"measured ceilings: bf16 matmul {peak / 1e12:.0f} TFLOP/s, device copy {copy / 1e12:.2f} TB/s")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, n = write_model(Path(tmp) / "model")
        print(f"model: random-init Llama, {n / 1e9:.2f} B parameters (bf16 weights {2 * n / 1e9:.2f} GB)")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(DEVICE).eval()
        for rows in (1, args.rows):
            r = decode(model, rows, args.new)
            bound = copy / 2 / (2 * n)  # every step reads every weight once (copy counts read + write)
            extra = f" | batch 1 at {100 * r['ours_tok_s'] / bound:.0f}% of the weight-read bound" if rows == 1 else ""
            print(f"decode {rows:>3} rows x {args.new}: ours {r['ours_tok_s']:8.0f} tok/s | generate "
                  f"{r['generate_tok_s']:8.0f} tok/s | ours/generate {r['ratio']:.2f}x{extra}")  # fmt: skip
        del model
        torch.cuda.empty_cache()

        data = write_data(Path(tmp) / "data.json", 8 * (args.steps + 2), args.seq)
        bare = train_bare(model_dir, args.seq, args.steps)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()  # the bare loop's model and optimizer states are gone with its frame
        for method in ("full", "lora"):
            ours = train_ours(model_dir, data, method, args.seq, args.steps)
            print(f"train {method:>4}: ours {ours:8.0f} tok/s (MFU {100 * 6 * n * ours / peak:.0f}%)"
                  + (f" | bare loop {bare:8.0f} tok/s (MFU {100 * 6 * n * bare / peak:.0f}%) | ours/bare "
                     f"{ours / bare:.2f}x" if method == "full" else ""))  # fmt: skip


if __name__ == "__main__":
    main()
