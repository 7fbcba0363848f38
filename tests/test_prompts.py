"""The prompt renderer and the loss mask: exact strings, exact label positions, boundaries, truncation."""

from __future__ import annotations

from pathlib import Path

import pytest

from specialize.data import Example, Turn, read_records
from specialize.prompts import (
    IGNORE_INDEX,
    AlpacaTemplate,
    encode_prompt,
    get_template,
    render_prompt,
    tokenize_for_training,
)

ALPACA = AlpacaTemplate()


def ex(output: str = "positive", input: str = "Great food!", **kw) -> Example:
    return Example(id="x", instruction="Classify the review.", input=input, output=output, **kw)


def test_alpaca_with_input_exact():
    assert render_prompt(ex(), ALPACA) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nClassify the review.\n\n### Input:\nGreat food!\n\n### Response:\n"
    )


def test_alpaca_no_input_exact():
    assert render_prompt(ex(input=""), ALPACA) == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nClassify the review.\n\n### Response:\n"
    )


def test_alpaca_history_renders_earlier_turns_first():
    e = Example(id="m", instruction="And in French?", output="Bonjour",
                history=(Turn(user="Say hello.", assistant="Hello"),))  # fmt: skip
    assert render_prompt(e, ALPACA) == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hello.\n\n### Response:\nHello\n\n"
        "### Instruction:\nAnd in French?\n\n### Response:\n"
    )


def test_chat_template_uses_model_template(embedded):
    _, tok = embedded
    t = get_template("chat", tok)
    assert t.render("Classify the review.", "Great food!") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nClassify the review.\n\nGreat food!<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = get_template("chat", tok, system="Be brief.")
    assert with_system.render("Hi").startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_unknown_template_and_chat_without_tokenizer():
    with pytest.raises(ValueError, match="unknown template"):
        get_template("vicuna")
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        get_template("chat")


# ----------------------------------------------------------------------------- exact label positions


@pytest.mark.parametrize(
    ("output", "tokens"),
    [
        ("positive", ["positive", "<|im_end|>"]),
        (" positive", ["Ġpositive", "<|im_end|>"]),  # a leading space stays in the response
        ("\nYes", ["Ċ", "Yes", "<|im_end|>"]),  # a leading newline is its own token
        (", and so on", [",", "Ġand", "Ġso", "Ġon", "<|im_end|>"]),  # leading punctuation
    ],
)
def test_embedded_labels_exact(embedded, output: str, tokens: list[str]):
    _, tok = embedded
    f = tokenize_for_training(ex(output), ALPACA, tok, 512)
    prompt_ids = tok(render_prompt(ex(output), ALPACA))["input_ids"]
    n = len(prompt_ids)
    assert f.prompt_len == n
    assert f.input_ids[:n] == prompt_ids  # exactly what generation will feed the model
    assert f.labels[:n] == [IGNORE_INDEX] * n
    assert tok.convert_ids_to_tokens(f.labels[n:]) == tokens
    assert f.labels[n:] == f.input_ids[n:]
    assert tok.convert_ids_to_tokens(f.input_ids[n - 4 : n]) == ["###", "ĠResponse", ":", "Ċ"]


def test_embedded_pad_equals_eos_and_eos_is_trained(embedded):
    _, tok = embedded
    assert tok.pad_token_id == tok.eos_token_id  # SmolLM2 pads with <|im_end|>
    f = tokenize_for_training(ex(), ALPACA, tok, 512)
    assert f.labels[-1] == tok.eos_token_id != IGNORE_INDEX


def test_non_ascii_response_round_trips(embedded, gpt2_style_tokenizer):
    for tok in (embedded[1], gpt2_style_tokenizer):
        out = "élan naïve 東京 🙂"
        f = tokenize_for_training(ex(out), ALPACA, tok, 512)
        resp = f.labels[f.prompt_len : -1]
        assert tok.decode(resp) == out
        assert tok.decode(f.input_ids[: f.prompt_len]) == render_prompt(ex(out), ALPACA)


def test_gpt2_style_tokenizer_labels(gpt2_style_tokenizer):
    tok = gpt2_style_tokenizer
    assert tok.bos_token_id == tok.eos_token_id
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]  # GPT-2 adds no BOS
    f = tokenize_for_training(ex(" positive"), ALPACA, tok, 512)
    n = len(tok(render_prompt(ex(" positive"), ALPACA))["input_ids"])
    assert f.labels == [IGNORE_INDEX] * n + tok(" positive")["input_ids"] + [tok.eos_token_id]
    assert f.input_ids[:n] == encode_prompt(render_prompt(ex(" positive"), ALPACA), ALPACA, tok)


def test_bos_tokenizer_gets_one_bos_and_no_bos_in_response(bos_tokenizer):
    tok = bos_tokenizer
    f = tokenize_for_training(ex("positive"), ALPACA, tok, 512)
    assert f.input_ids[0] == tok.bos_token_id
    assert f.input_ids.count(tok.bos_token_id) == 1  # the response is encoded without special tokens
    assert f.labels[f.prompt_len :] == tok("positive", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_chat_template_prompt_is_not_given_a_second_bos(bos_tokenizer):
    tok = bos_tokenizer
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}\n{% endfor %}"
    t = get_template("chat", tok)
    ids = encode_prompt(t.render("Classify."), t, tok)
    assert ids.count(tok.bos_token_id) == 1  # the template wrote it; the tokenizer must not add another


def test_mask_holds_on_every_real_example(embedded, shared_data: Path):
    _, tok = embedded
    recs = read_records(shared_data / "superni/tasks/task1312_amazonreview_polarity_classification.json.gz")
    for r in recs:
        f = tokenize_for_training(r, ALPACA, tok, 2048)
        n = f.prompt_len
        assert not f.truncated
        assert all(label == IGNORE_INDEX for label in f.labels[:n])
        assert f.labels[n:] == f.input_ids[n:] and f.labels[-1] == tok.eos_token_id
        assert tok.decode(f.labels[n:-1]) == r.output


# ----------------------------------------------------------------------------- truncation


def test_long_response_cut_at_the_end_and_loses_eos(embedded):
    _, tok = embedded
    e = ex(" ".join(["word"] * 300))
    full = tokenize_for_training(e, ALPACA, tok, 4096)
    f = tokenize_for_training(e, ALPACA, tok, full.prompt_len + 50)
    assert len(f.input_ids) == full.prompt_len + 50
    assert f.prompt_truncated == 0
    assert f.response_truncated == len(full.input_ids) - len(f.input_ids)
    assert f.input_ids == full.input_ids[: len(f.input_ids)]  # the response's start is intact
    assert tok.eos_token_id not in f.labels  # never teach stopping mid-answer


def test_long_prompt_cut_from_the_left_keeps_response_start(bos_tokenizer):
    tok = bos_tokenizer
    e = ex("positive", input="Great food! " * 100)
    full = tokenize_for_training(e, ALPACA, tok, 100_000)
    f = tokenize_for_training(e, ALPACA, tok, 64, min_response_tokens=16)
    response = full.input_ids[full.prompt_len :]
    assert len(f.input_ids) <= 64
    assert f.input_ids[0] == tok.bos_token_id  # BOS survives the cut
    assert f.input_ids[-len(response) :] == response  # whole response, EOS included
    assert f.prompt_truncated == full.prompt_len - f.prompt_len > 0
    assert f.response_truncated == 0
    # the kept prompt tail still ends with the response header, adjacent to the response
    assert tok.decode(f.input_ids[: f.prompt_len]).endswith("### Response:\n")


def test_max_prompt_length(gpt2_style_tokenizer):
    tok = gpt2_style_tokenizer
    f = tokenize_for_training(ex(), ALPACA, tok, 512, max_prompt_length=10)
    assert f.prompt_len == 10 and f.prompt_truncated > 0
    assert f.labels[:10] == [IGNORE_INDEX] * 10


def test_no_room_for_prompt_is_an_error(gpt2_style_tokenizer):
    with pytest.raises(ValueError, match="leaves no room"):
        tokenize_for_training(ex("positive"), ALPACA, gpt2_style_tokenizer, 2)
