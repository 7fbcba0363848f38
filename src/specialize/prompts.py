"""THE prompt renderer and THE tokenization rule for the prompt/response boundary.

Training, evaluation and generation all render prompts here and encode them with `encode_prompt`,
so the tokens a model is trained to continue are exactly the tokens it is asked to continue later.

The training rule (`tokenize_for_training`), in four lines:
    prompt_ids   = encode(prompt)                  # with the template's special-token rule
    response_ids = encode(response) + [eos]        # tokenized on its own, EOS appended and trained
    input_ids    = prompt_ids + response_ids
    labels       = [-100] * len(prompt_ids) + response_ids
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from specialize.records import Example, Turn

IGNORE_INDEX = -100

# Stanford Alpaca's template, which Shi et al. (2023, Appendix A) adopt; reproduced character for character.
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
ALPACA_PROMPT_INPUT = (
    ALPACA_PREAMBLE_INPUT + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = ALPACA_PREAMBLE_NO_INPUT + "### Instruction:\n{instruction}\n\n### Response:\n"


class PromptTemplate(Protocol):
    name: str
    # whether the tokenizer should add its own special tokens (BOS) when encoding the prompt;
    # chat templates write their special tokens as text, so adding them again would double them
    add_special_tokens: bool

    def render(self, instruction: str, input: str = "", history: Sequence[Turn] = ()) -> str: ...


@dataclass(frozen=True)
class AlpacaTemplate:
    """Alpaca, with-input and no-input variants. Earlier turns (LIMA's multi-turn items) are rendered
    as preceding Instruction/Response blocks, an extension the papers do not need for single-turn data."""

    name: str = "alpaca"
    add_special_tokens: bool = True

    def render(self, instruction: str, input: str = "", history: Sequence[Turn] = ()) -> str:
        if input:
            text = ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
        else:
            text = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
        if not history:
            return text
        preamble, _, last = text.partition("### Instruction:\n")
        turns = "".join(f"### Instruction:\n{t.user}\n\n### Response:\n{t.assistant}\n\n" for t in history)
        return preamble + turns + "### Instruction:\n" + last


@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's own chat template; the input, if any, follows the instruction after a blank line."""

    tokenizer: Any
    system: str | None = None
    name: str = "chat"
    add_special_tokens: bool = False

    def render(self, instruction: str, input: str = "", history: Sequence[Turn] = ()) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this tokenizer has no chat template; use the alpaca template")
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for t in history:
            messages += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.assistant}]
        content = f"{instruction}\n\n{input}" if input else instruction
        messages.append({"role": "user", "content": content})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


TEMPLATES = ("alpaca", "chat")


def get_template(name: str = "alpaca", tokenizer: Any = None, system: str | None = None) -> PromptTemplate:
    if name == "alpaca":
        return AlpacaTemplate()
    if name == "chat":
        if tokenizer is None:
            raise ValueError("the chat template needs the model's tokenizer")
        return ChatTemplate(tokenizer, system=system)
    raise ValueError(f"unknown template {name!r}; expected one of {', '.join(TEMPLATES)}")


def render_prompt(example: Example, template: PromptTemplate) -> str:
    """The text a model continues with the response."""
    return template.render(example.instruction, example.input, example.history)


def encode_prompt(prompt: str, template: PromptTemplate, tokenizer: Any) -> list[int]:
    """Prompt token ids, exactly as training saw them."""
    return tokenizer(prompt, add_special_tokens=template.add_special_tokens)["input_ids"]


def encode_response(response: str, tokenizer: Any) -> list[int]:
    """Response token ids without EOS, tokenized on their own (never merged across the boundary)."""
    return tokenizer(response, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class TrainFeatures:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int  # tokens of prompt kept
    prompt_truncated: int  # prompt tokens cut (from the left, after any BOS)
    response_truncated: int  # response tokens cut (from the right; EOS counts as one)

    @property
    def truncated(self) -> bool:
        return bool(self.prompt_truncated or self.response_truncated)


def tokenize_for_training(
    example: Example,
    template: PromptTemplate,
    tokenizer: Any,
    max_length: int,
    *,
    max_prompt_length: int | None = None,
    min_response_tokens: int = 16,
) -> TrainFeatures:
    """Prompt and response tokenized separately; loss on the response and its EOS only.

    When the pair does not fit in `max_length`, the prompt is cut from the left (its BOS kept) so at
    least `min_response_tokens` of the response fit, then the response is cut from the right; the
    response's start is never cut. A cut response loses its EOS (the model must not learn to stop
    mid-answer). Every cut is counted in the result so callers can report it.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token; cannot teach the model to stop")
    prompt = encode_prompt(render_prompt(example, template), template, tokenizer)
    response = [*encode_response(example.output, tokenizer), tokenizer.eos_token_id]

    prompt_budget = max_length - min(len(response), min_response_tokens)
    if max_prompt_length is not None:
        prompt_budget = min(prompt_budget, max_prompt_length)
    if prompt_budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for the prompt")
    prompt_cut = max(0, len(prompt) - prompt_budget)
    if prompt_cut:
        keep_bos = template.add_special_tokens and prompt[0] == tokenizer.bos_token_id and prompt_budget > 1
        head = prompt[:1] if keep_bos else []
        prompt = head + prompt[len(prompt) - (prompt_budget - len(head)) :]
    response_cut = max(0, len(prompt) + len(response) - max_length)
    if response_cut:
        response = response[: len(response) - response_cut]
    return TrainFeatures(
        input_ids=prompt + response,
        labels=[IGNORE_INDEX] * len(prompt) + response,
        prompt_len=len(prompt),
        prompt_truncated=prompt_cut,
        response_truncated=response_cut,
    )
