"""The one token loop: continuous batching, chunked prefill, incremental text and stop strings, seeds, and
that every consumer goes through it."""

from __future__ import annotations

import ast
import itertools
import random
from pathlib import Path

import pytest
import torch

from specialize.generation import Output, Request, SamplingParams, TokenLoop, generate, ragged
from specialize.generation.loop import TextStream, held_back, length_buckets
from specialize.models import Precision
from specialize.prompts import AlpacaTemplate

FP32 = Precision(torch.float32, None)
SRC = Path(__file__).resolve().parents[2] / "src" / "specialize"


def _ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


def test_a_short_request_submitted_mid_way_finishes_before_the_long_one(tiny_model, gpt2_style_tokenizer):
    loop = TokenLoop(tiny_model, gpt2_style_tokenizer, FP32, max_rows=4)
    long = Request([_ids(gpt2_style_tokenizer, "Once upon a time")], SamplingParams(max_new_tokens=120))
    loop.submit(long)
    for _ in range(10):
        loop.step()
    assert long.result is None and len(long.tokens) >= 5
    short = Request([_ids(gpt2_style_tokenizer, "Hi")], SamplingParams(max_new_tokens=2))
    loop.submit(short)
    steps = 0
    while short.result is None:
        loop.step()
        steps += 1
    assert steps <= 3 and long.result is None  # it joined the running batch; nobody waited for a wave
    loop.run()
    assert long.result is not None and long.result.finish_reason == "length"


def test_static_waves_make_the_short_request_wait(tiny_model, gpt2_style_tokenizer):
    """The comparison point: with static waves the short request starts only when the long one is done."""
    loop = TokenLoop(tiny_model, gpt2_style_tokenizer, FP32, max_rows=4, policy="static")
    long = Request([_ids(gpt2_style_tokenizer, "Once upon a time")], SamplingParams(max_new_tokens=30))
    loop.submit(long)
    loop.step()
    short = Request([_ids(gpt2_style_tokenizer, "Hi")], SamplingParams(max_new_tokens=2))
    loop.submit(short)
    while short.result is None:
        loop.step()
    assert long.result is not None


def test_chunked_prefill_and_joining_rows_decode_exactly_as_one_batch(tiny_model, gpt2_style_tokenizer):
    tok = gpt2_style_tokenizer
    prompts = ["Classify the sentiment of this long review please, it is long.", "Why?", "A B C D E F G H"]
    params = SamplingParams(max_new_tokens=10)
    whole = generate(tiny_model, tok, [AlpacaTemplate().render(p) for p in prompts], AlpacaTemplate(), params,
                     precision=FP32)  # fmt: skip
    loop = TokenLoop(tiny_model, tok, FP32, max_rows=8, prefill_tokens=7)  # every prompt prefilled in chunks
    reqs = [Request([_ids(tok, AlpacaTemplate().render(p))], params) for p in prompts]
    loop.submit(reqs[0])
    loop.step()
    loop.step()
    loop.submit(*reqs[1:])
    loop.run()
    assert [r.result.token_ids for r in reqs] == [o.token_ids for o in whole]


def test_prompts_joining_in_the_decode_forward_decode_exactly_as_in_a_forward_of_their_own(
    tiny_model, gpt2_style_tokenizer
):
    """Joining prompts ride in the running rows' decode forward (`ragged.py`): a greedy request, an eq. 2 request
    over three contexts and a seeded sampled one join two running rows of different lengths; every token equals
    the loop that prefills joining prompts in forwards of their own."""
    tok = gpt2_style_tokenizer

    def requests() -> list[Request]:
        params = SamplingParams(max_new_tokens=9)
        return [
            Request([_ids(tok, "Once upon a time there was")], SamplingParams(max_new_tokens=30)),
            Request([_ids(tok, "Hi")], SamplingParams(max_new_tokens=30)),
            Request([_ids(tok, "The cat sat on the")], params),
            Request([_ids(tok, t) for t in ("A B C", "One two three four five", "x")], params, [0.5, 0.3, 0.2]),
            Request([_ids(tok, "Numbers: 1 2 3")], params.model_copy(update={"temperature": 0.8, "seed": 3})),
        ]

    outputs, loops = {}, {}
    for fused in (True, False):
        loop = loops[fused] = TokenLoop(tiny_model, tok, FP32, max_rows=16, fused_prefill=fused)
        reqs = requests()
        loop.submit(*reqs[:2])
        for _ in range(3):
            loop.step()
        loop.submit(*reqs[2:])
        loop.step()
        if fused:  # they joined at once, in one step (a job of their own prefills its length buckets one by one)
            assert len(loop.running) == 5
        loop.run()
        outputs[fused] = [r.result.token_ids for r in reqs]
    assert loops[True].stats["joined_in_decode"] == 3 and loops[False].stats["joined_in_decode"] == 0
    assert outputs[True] == outputs[False]
    assert all(len(o) > 0 for o in outputs[True])


def test_a_prompt_joining_as_the_last_running_row_leaves_decodes_as_alone(tiny_model, gpt2_style_tokenizer):
    tok = gpt2_style_tokenizer
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    alone = Request([_ids(tok, "The cat sat on")], params)
    solo = TokenLoop(tiny_model, tok, FP32)
    solo.submit(alone)
    solo.run()
    loop = TokenLoop(tiny_model, tok, FP32, max_rows=4)
    first = Request([_ids(tok, "Hi")], SamplingParams(max_new_tokens=2, ignore_eos=True))
    loop.submit(first)
    loop.step()
    late = Request([_ids(tok, "The cat sat on")], params)
    loop.submit(late)
    loop.step()  # `first` takes its last token and leaves; the ragged forward holds the prompt alone
    assert first.result is not None and loop.stats["joined_in_decode"] == 1
    loop.run()
    assert late.result.token_ids == alone.result.token_ids


def test_a_joining_prompt_over_the_step_budget_is_prefilled_in_chunks_instead(tiny_model, gpt2_style_tokenizer):
    tok = gpt2_style_tokenizer
    loop = TokenLoop(tiny_model, tok, FP32, max_rows=4, prefill_tokens=8)
    loop.submit(Request([_ids(tok, "Hi")], SamplingParams(max_new_tokens=20)))
    loop.step()
    short, long = (Request([_ids(tok, t)], SamplingParams(max_new_tokens=3)) for t in ("A B", "one " * 12))
    loop.submit(short)
    loop.step()
    assert loop.stats["joined_in_decode"] == 1
    loop.submit(long)
    loop.step()
    assert loop.prefilling is not None and loop.stats["joined_in_decode"] == 1  # chunked, not in the decode forward
    loop.run()
    assert short.result is not None and long.result is not None and len(long.result.token_ids) == 3


def test_cancelled_rows_leave_at_once_and_the_others_go_on(tiny_model, gpt2_style_tokenizer):
    loop = TokenLoop(tiny_model, gpt2_style_tokenizer, FP32, max_rows=4)
    a, b = (Request([_ids(gpt2_style_tokenizer, t)], SamplingParams(max_new_tokens=50)) for t in ("One", "Two"))
    loop.submit(a, b)
    loop.step()
    loop.step()
    a.cancel()
    loop.step()
    assert a.result is not None and a.result.finish_reason == "cancelled" and len(loop.running) == 1
    loop.run()
    assert b.result is not None and b.result.finish_reason == "length"


def test_text_stream_is_incremental_and_exact(embedded):
    """Deltas joined equal a full decode, with multi-byte characters split over tokens; a stop string cuts."""
    _, tok = embedded
    text = "Café 東京 — naïve 🙂 résumé, then ### the end"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, ())
    parts = []
    for t in ids:
        stream.push(t)
        parts.append(stream.delta(final=False))
        assert "\ufffd" not in parts[-1]  # half a character is never streamed
    stream.flush()
    parts.append(stream.delta(final=True))
    assert "".join(parts) == tok.decode(ids, skip_special_tokens=True)

    stream = TextStream(tok, ("###",))
    parts = []
    for t in ids:
        stream.push(t)
        parts.append(stream.delta(final=False))
        if stream.stopped:
            break
    parts.append(stream.delta(final=True))
    assert "".join(parts) == text[: text.index("###")] and stream.stopped
    assert not any(p.endswith("#") for p in parts)  # a possible stop prefix is held back


def test_held_back_covers_partial_stops():
    assert held_back("hello ##", ("###",)) == 2
    assert held_back("hello #", ("###", "END")) == 1
    assert held_back("hello E", ("###", "END")) == 1
    assert held_back("hello", ("###",)) == 0


def test_a_seeded_request_gives_the_same_text_offline_and_in_the_server(tiny_model_dir):
    from specialize.config import ModelConfig
    from specialize.models import load_runtime
    from specialize.serve.engine import Engine, collect

    rt = load_runtime(ModelConfig(spec=str(tiny_model_dir), dtype="float32"))
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=11)
    prompt = AlpacaTemplate().render("Tell a story.")
    [offline] = generate(rt.model, rt.tokenizer, [prompt], AlpacaTemplate(), params, precision=rt.precision)
    engine = Engine(rt.model, rt.tokenizer, precision=rt.precision).start()
    try:
        others = [engine.request("base", _ids(rt.tokenizer, "Other prompt"), params.model_copy(update={"seed": 3}))]
        req = engine.request("base", rt.tokenizer(prompt)["input_ids"], params)
        engine.submit(*others, req)
        [served] = collect([req], timeout=60)
    finally:
        engine.stop()
    assert served.text == offline.text and served.token_ids == offline.token_ids
    again = generate(rt.model, rt.tokenizer, [prompt], AlpacaTemplate(), params.model_copy(update={"seed": 12}),
                     precision=rt.precision)[0]  # fmt: skip
    assert again.token_ids != offline.token_ids  # the seed matters


def test_every_consumer_decodes_through_the_one_loop():
    """No decoding loop outside generation/loop.py: no transformers `generate`, no hand-written step loop. (The
    one other decoder is vLLM's, called in generation/vllm_engine.py only.)"""
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "generate" and isinstance(node.ctx, ast.Load):
                owner = ast.unparse(node.value)
                allowed = owner == "specialize.generation" or (path.name == "vllm_engine.py" and owner == "self.llm")
                assert allowed, f"{path}: {owner}.generate bypasses the token loop"
        if path.name != "loop.py":
            assert "TokenLoop(" not in path.read_text() or path.name in ("batch.py", "engine.py"), path
    for consumer in ("eval/harness.py", "synth/pipeline.py", "cli.py", "serve/engine.py"):
        assert "specialize.generation" in (SRC / consumer).read_text(), consumer


def test_outputs_are_one_typed_result(tiny_model, gpt2_style_tokenizer):
    [out] = generate(tiny_model, gpt2_style_tokenizer, ["Go."], AlpacaTemplate(), SamplingParams(max_new_tokens=3),
                     precision=FP32)  # fmt: skip
    assert isinstance(out, Output) and out.error is None and out.finish_reason in ("stop", "length")


def test_failing_one_request_mid_prefill_redoes_the_others(tiny_model, gpt2_style_tokenizer):
    """Requests prefilled together share a cache: failing one (its adapter removed, say) prefills the others
    again, in their order, and they decode as if nothing happened."""
    tok = gpt2_style_tokenizer
    params = SamplingParams(max_new_tokens=8)
    texts = ["The first prompt is here", "A second one", "And a third prompt"]
    alone = generate(tiny_model, tok, texts, AlpacaTemplate(), params, precision=FP32)
    # a static wave prefills all three together, 2 columns a step for 3 rows: the prefill takes several steps
    loop = TokenLoop(tiny_model, tok, FP32, max_rows=8, prefill_tokens=6, policy="static")
    reqs = [Request([_ids(tok, t)], params) for t in texts]
    loop.submit(*reqs)
    loop.step()
    assert loop.prefilling is not None and loop.prefilling.requests == reqs
    loop.fail_all("gone", only=lambda r: r is reqs[1])
    assert reqs[1].result == Output("", (), None, "gone") and list(loop.waiting) == [reqs[0], reqs[2]]
    loop.run()
    assert [reqs[0].result.token_ids, reqs[2].result.token_ids] == [alone[0].token_ids, alone[2].token_ids]


def test_length_buckets_bound_the_padding_and_keep_every_row():
    lengths = [518, 116, 300, 120, 121, 470, 250, 260, 130, 515]
    buckets = length_buckets(lengths, slack=0.2)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert len(buckets) > 1
    for b in buckets:
        real = sum(lengths[i] for i in b)
        assert len(b) * max(lengths[i] for i in b) <= 1.2 * real
    assert length_buckets([7, 7, 7]) == [[0, 1, 2]]  # equal lengths: one forward


@pytest.mark.parametrize("call_cost", [None, 0])
def test_rows_of_very_different_lengths_decode_as_each_alone(tiny_model, gpt2_style_tokenizer, monkeypatch,
                                                             call_cost):  # fmt: skip
    """Eq. 2 items whose contexts range from 3 to ~60 tokens are prefilled in several length buckets; the rows
    come back in request order and each item decodes exactly what it decodes alone, with attention over the
    padded width in one call or (call_cost 0) over each row's own columns in a call per row."""
    if call_cost is not None:
        monkeypatch.setattr(ragged, "CALL_COST", call_cost)
    tok = gpt2_style_tokenizer
    words = list("abcdefghijklmnopq")
    contexts = [[_ids(tok, " ".join(words[: 3 + (7 * i + 5 * j) % 16] * (1 + (i + j) % 4))) for j in range(3)]
                for i in range(4)]  # fmt: skip
    lengths = [len(c) for ctx in contexts for c in ctx]
    assert max(lengths) > 4 * min(lengths) and len(length_buckets(lengths)) > 1
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)

    def request(ctx):
        return Request(ctx, params, weights=[0.5, 0.3, 0.2])

    together = [request(ctx) for ctx in contexts]
    loop = TokenLoop(tiny_model, tok, FP32, max_rows=12, prefill_tokens=4096)
    loop.submit(*together)
    while loop.rows is None:  # one length bucket prefilled per step
        loop.step()
    assert len(loop.rows.groups()) == (12 if call_cost == 0 else 1)
    loop.run()
    for ctx, r in zip(contexts, together, strict=True):
        alone = request(ctx)
        one = TokenLoop(tiny_model, tok, FP32, max_rows=3, prefill_tokens=4096)
        one.submit(alone)
        one.run()
        assert r.result.token_ids == alone.result.token_ids


def test_offline_prefill_forwards_are_cut_to_forward_tokens_and_decode_the_same(
    tiny_model, gpt2_style_tokenizer, monkeypatch
):
    """Offline generation admits the whole batch with a budget of all its prompt tokens; each prefill forward
    still feeds at most `FORWARD_TOKENS` (past it element-wise activations leave the CPU's caches), prompts longer
    than a forward's share in column chunks, and every token equals the uncut prefill."""
    from specialize.generation import loop as loop_module

    tok = gpt2_style_tokenizer
    prompts = [AlpacaTemplate().render(p) for p in ("Why is the sky blue on clear days?", "Hi", "List three", "Ok")]
    params = SamplingParams(max_new_tokens=6)
    whole = generate(tiny_model, tok, prompts, AlpacaTemplate(), params, precision=FP32)
    fed: list[int] = []  # the tokens of each prefill forward (decode forwards feed one column)

    def record(_module, _args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            fed.append(kwargs["input_ids"].numel())

    hook = tiny_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        monkeypatch.setattr(loop_module, "FORWARD_TOKENS", 24)
        fed.clear()
        cut = generate(tiny_model, tok, prompts, AlpacaTemplate(), params, precision=FP32)
    finally:
        hook.remove()
    longest = max(len(_ids(tok, p)) for p in prompts)
    assert longest > 24 and fed and max(fed) <= 24  # the longest prompt alone needs more than one forward
    assert [o.token_ids for o in cut] == [o.token_ids for o in whole]


def test_column_groups_read_the_fewest_columns_and_cover_every_row():
    """The groups are the cheapest split into consecutive rows (checked against every split of small cases), each
    over the columns its longest row fills."""
    rng = random.Random(0)
    for _ in range(200):
        n, width, cost = rng.randint(1, 7), 600, rng.choice([0, 50, 512])
        lengths = [rng.randint(1, width) for _ in range(n)]
        groups = ragged.column_groups(lengths, width, cost)
        assert [a for a, _, _ in groups] == [0, *(b for _, b, _ in groups[:-1])] and groups[-1][1] == n
        assert all(c == width - max(lengths[a:b]) for a, b, c in groups)
        brute = min(
            sum((b - a) * max(lengths[a:b]) + cost for a, b in itertools.pairwise([0, *cuts, n]))
            for k in range(n)
            for cuts in itertools.combinations(range(1, n), k)
        )
        assert sum((b - a) * max(lengths[a:b]) + cost for a, b, _ in groups) == brute
    # one long row among short ones attends alone; the short ones do not read its padding
    assert ragged.column_groups([500, 490, 20, 25, 30], 500) == [(0, 2, 0), (2, 5, 470)]
