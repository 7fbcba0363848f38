from __future__ import annotations

from specialize.data import Example
from specialize.synth.prompts import ExpertTemplate, clip_words, instruction_prompt, parse_generated


def test_prompt_lists_demos_then_opens_the_next_item():
    demos = [Example(id=str(i), instruction=f"Do task {i}.", input="" if i == 1 else f"data {i}", output="x")
             for i in range(1, 4)]  # fmt: skip
    text = instruction_prompt("biomedical", demos, n=20)
    assert "20 diverse task instructions in the biomedical domain" in text
    assert "1. Instruction: Do task 1.\n1. Input:\n<noinput>\n2. Instruction: Do task 2.\n2. Input:\ndata 2\n" in text
    assert text.endswith("4. Instruction:")


def test_parse_well_formed_list():
    gen = (" Name the gene.\n4. Input:\nBRCA1 mutations raise risk.\n"
           "5. Instruction: Is aspirin an NSAID?\n5. Input:\n<noinput>\n"
           "6. Instruction: Summarize the abstract\n6. Input: Cells divide.\n6. Output: They split.\n")  # fmt: skip
    items, counts = parse_generated(gen, 4, truncated=False)
    assert [(i.instruction, i.input) for i in items] == [
        ("Name the gene.", "BRCA1 mutations raise risk."), ("Is aspirin an NSAID?", ""),
        ("Summarize the abstract", "Cells divide."),
    ]  # fmt: skip
    assert counts["items"] == 3


def test_parse_malformed_generations():
    items, counts = parse_generated(" Only an instruction, no input line.\n", 4, truncated=False)
    assert items == [] and counts["no_input"] == 1
    items, counts = parse_generated(" A.\n4. Input:\nx\n5. Instruction: B cut off mid-sen", 4, truncated=True)
    assert [i.instruction for i in items] == ["A."] and counts["truncated_last"] == 1
    items, counts = parse_generated("", 4, truncated=False)
    assert items == [] and counts["empty"] + counts["no_input"] == 1
    # numbering only counts at the start of a line; "12)" style and any case are accepted there
    items, _ = parse_generated(
        " garbage 5. Instruction: X\n12) input: Y\n13) INSTRUCTION: Z\n13) Input: W", 4, truncated=False
    )
    assert [(i.instruction, i.input) for i in items] == [("garbage 5. Instruction: X", "Y"), ("Z", "W")]


def test_input_without_its_instruction_is_dropped_not_merged_into_the_previous_input():
    gen = " Name the gene.\n4. Input:\nBRCA1\n5. Input:\nTP53 is mutated.\n6. Instruction: Define it\n6. Input: x\n"
    items, counts = parse_generated(gen, 4, truncated=False)
    assert [(i.instruction, i.input) for i in items] == [("Name the gene.", "BRCA1"), ("Define it", "x")]
    assert counts["orphan_input"] == 1


def test_expert_template():
    t = ExpertTemplate("biomedical", "Aspirin inhibits COX.")
    text = t.render("Explain the mechanism.", "aspirin")
    assert text.startswith("You are a biomedical domain expert.")
    assert (
        "### Background:\nAspirin inhibits COX.\n\n### Instruction:\nExplain the mechanism.\n\n### Input:\naspirin"
        in text
    )
    assert text.endswith("### Response:\n")
    assert "Background" not in ExpertTemplate("biomedical").render("Explain.")


def test_items_without_input_are_kept_only_when_inputs_are_optional():
    gen = " Define apoptosis.\n5. Instruction: Name a kinase\n5. Output: PKA\n6. Instruction: Rate it\n6. Input: x\n"
    items, counts = parse_generated(gen, 4, truncated=False, require_input=False)
    assert [(i.instruction, i.input) for i in items] == [("Define apoptosis.", ""), ("Name a kinase", ""),
                                                         ("Rate it", "x")]  # fmt: skip
    assert counts["no_input"] == 2
    strict, _ = parse_generated(gen, 4, truncated=False)
    assert [i.instruction for i in strict] == ["Rate it"]


def test_demo_inputs_are_clipped_to_a_word_budget():
    demo = Example(id="d", instruction="Summarize.", input=" ".join(f"w{i}" for i in range(100)), output="x")
    text = instruction_prompt("biomedical", [demo], n=5, demo_input_words=10)
    assert "1. Input:\nw0 w1 w2 w3 w4 w5 w6 w7 w8 w9 ...\n" in text
    assert clip_words("short text", 10) == "short text" and clip_words("a b c", None) == "a b c"
