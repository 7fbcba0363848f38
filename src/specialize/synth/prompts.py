"""The two self-specialization prompts, in this project's words, following the requirements the paper lists
(Kang et al., Table 5). Either can be replaced from a file; `{domain}` and `{n}` are filled in.

Parsing the numbered (instruction, input) list the model writes back is here too, next to the format it parses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from specialize.data import Example, Turn

INSTRUCTION_PROMPT = """\
You are asked to come up with a set of {n} diverse task instructions in the {domain} domain. The instructions \
will be given to a language model, and we will evaluate how well the model completes them.

Here are the requirements:
1. Do not repeat the verb across instructions, to maximize diversity. Vary the wording as well.
2. Mix questions with imperative instructions.
3. Cover diverse types of tasks: open-ended generation, classification, extraction, editing, question \
answering, and more.
4. A language model must be able to complete each instruction: ask for no visual or audio output and for no \
action in the world. Write the instructions in English.
5. Each instruction is 1 to 2 sentences long, either an imperative sentence or a question.
6. Write an input for every instruction: a specific example that involves realistic data, not a simple \
placeholder, with enough content to make the instruction challenging.
7. Cover diverse tasks and inputs while staying within the {domain} domain.

List of {n} tasks:
"""

RESPONSE_PREAMBLE = (
    "You are a {domain} domain expert. Given an instruction and an input, generate the best response to solve "
    "the given {domain} task."
)

NO_INPUT = "<noinput>"
_ITEM = re.compile(r"^\s*(\d+)\s*[.)]\s*Instruction\s*:\s*", re.IGNORECASE | re.MULTILINE)
_INPUT = re.compile(r"\n\s*(?:\d+\s*[.)]\s*)?Input\s*:\s*", re.IGNORECASE)
_OUTPUT = re.compile(r"\n\s*(?:\d+\s*[.)]\s*)?Output\s*:", re.IGNORECASE)


def format_item(number: int, instruction: str, input: str) -> str:
    return f"{number}. Instruction: {instruction.strip()}\n{number}. Input:\n{input.strip() or NO_INPUT}\n"


def clip_words(text: str, max_words: int | None) -> str:
    """The first `max_words` words, marked with an ellipsis when cut (None keeps everything)."""
    words = text.split()
    if max_words is None or len(words) <= max_words:
        return text
    return " ".join(words[:max_words]) + " ..."


def instruction_prompt(
    domain: str,
    demos: Sequence[Example],
    n: int = 20,
    template: str = INSTRUCTION_PROMPT,
    demo_input_words: int | None = None,
) -> str:
    """The generation prompt: requirements, the demos as the first list items, then the next item's header.

    `demo_input_words` clips long demo inputs (BoX abstracts): prompt length drives generation cost on CPU.
    """
    text = template.format(domain=domain, n=n)
    for i, d in enumerate(demos, start=1):
        text += format_item(i, d.instruction, clip_words(d.input, demo_input_words))
    return text + f"{len(demos) + 1}. Instruction:"


@dataclass(frozen=True)
class Parsed:
    instruction: str
    input: str


def parse_generated(
    text: str, first_number: int, *, truncated: bool, require_input: bool = True
) -> tuple[list[Parsed], dict[str, int]]:
    """(instruction, input) pairs from the model's continuation of `N. Instruction:`.

    Items without an `Input:` line are counted and dropped (or, with `require_input=False`, kept with an
    empty input: small models often skip the line); an `Input:` line with no instruction of its own is
    counted and dropped rather than appended to the previous item's input; when generation hit the length
    limit the last item may be cut off mid-way, so it is dropped too (as the paper does).
    """
    full = f"{first_number}. Instruction: " + text
    starts = list(_ITEM.finditer(full))
    counts = {"items": len(starts), "no_input": 0, "truncated_last": 0, "empty": 0, "orphan_input": 0}
    items: list[Parsed] = []
    for i, m in enumerate(starts):
        body = full[m.end() : starts[i + 1].start() if i + 1 < len(starts) else len(full)]
        if i == len(starts) - 1 and truncated:
            counts["truncated_last"] += 1
            continue
        parts = _INPUT.split(body, maxsplit=1)
        instruction = parts[0].strip()
        if len(parts) < 2:
            counts["no_input"] += 1
            if require_input:
                continue
            parts = ["", ""]
            instruction = _OUTPUT.split(instruction, maxsplit=1)[0].strip()
        input_, *orphans = _INPUT.split(parts[1])  # a second `N. Input:` is an item that lost its instruction
        counts["orphan_input"] += len(orphans)
        input_ = _OUTPUT.split(input_, maxsplit=1)[0].strip()  # models sometimes add an output
        input_ = "" if input_ == NO_INPUT or input_.lower() == NO_INPUT else input_
        if not instruction:
            counts["empty"] += 1
            continue
        items.append(Parsed(instruction, input_))
    return items, counts


@dataclass(frozen=True)
class ExpertTemplate:
    """The response prompt (a PromptTemplate): the expert preamble, an optional retrieved document, then the
    Alpaca sections, so the answer starts exactly where training later puts responses."""

    domain: str
    document: str | None = None
    preamble: str = RESPONSE_PREAMBLE
    name: str = "expert"
    add_special_tokens: bool = True

    def render(self, instruction: str, input: str = "", history: Sequence[Turn] = ()) -> str:
        text = self.preamble.format(domain=self.domain) + "\n\n"
        if self.document:
            text += f"### Background:\n{self.document.strip()}\n\n"
        text += f"### Instruction:\n{instruction}\n\n"
        if input:
            text += f"### Input:\n{input}\n\n"
        return text + "### Response:\n"
