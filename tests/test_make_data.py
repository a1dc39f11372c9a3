"""make-data's parts without a teacher: chunks in the student's tokens (the real R1 tokenizer), the held-out split
before chunking, the teacher's replies read strictly, and the checks every row must pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_kit.make_data.checks import QuestionIndex, answer_problem, language_of, ngrams, question_problem
from qlora_kit.make_data.chunks import chunk_documents, held_out_units
from qlora_kit.make_data.documents import Document, Page
from qlora_kit.make_data.prompts import PLACEHOLDERS, export_prompts, load_prompts
from qlora_kit.make_data.replies import Refused, read_answer, read_questions, read_score

PARAGRAPH = ("Hepatitis B is an infection of the liver caused by the hepatitis B virus. It spreads through contact "
             "with infected blood or body fluids, for example from mother to child at birth. ")


@pytest.fixture(scope="module")
def count(r1_tokenizer):
    return lambda text: len(r1_tokenizer(text, add_special_tokens=False).input_ids)


def guide(name: str = "guide.pdf", sections: int = 4, paragraphs: int = 3) -> Document:
    """A document of `sections` headed sections, one per page, each of `paragraphs` numbered paragraphs."""
    pages = tuple(Page(s + 1, "\n\n".join([f"# Section {s}",
                                           *(f"P{s}.{p} of {name}: {PARAGRAPH}" for p in range(paragraphs))]))
                  for s in range(sections))
    return Document(Path(name), "pdf", pages)


def test_chunks_fit_the_budget_start_at_headings_and_keep_their_pages(count):
    chunks = chunk_documents([guide()], count, budget=120, overlap=60, eval_share=0)
    assert chunks and all(c.tokens <= 120 for c in chunks)
    assert all(c.tokens == count(c.text) for c in chunks)
    # Every paragraph is in some chunk, in order; a chunk never spans two sections (a heading cuts once the chunk
    # holds a third of the budget, and one paragraph is more than that here).
    for s in range(4):
        own = [c for c in chunks if f"# Section {s}" in c.text]
        assert own and all(c.first_page == c.last_page == s + 1 and c.heading == f"Section {s}" for c in own)
        text = " ".join(c.text for c in own)
        assert all(f"P{s}.{p} of" in text for p in range(3))
    # A chunk that starts mid-section repeats the heading (where it is) and the previous paragraph (overlap).
    second = [c for c in chunks if c.heading == "Section 0"][1]
    assert second.text.startswith("# Section 0\n\n") and "P0.0" not in second.text.split("\n\n")[1]
    assert {c.split for c in chunks} == {"train"} and len({c.id for c in chunks}) == len(chunks)


def test_overlap_repeats_only_the_same_section(count):
    chunks = chunk_documents([guide()], count, budget=120, overlap=60, eval_share=0)
    for before, after in zip(chunks, chunks[1:], strict=False):
        if before.heading != after.heading:  # a new section starts clean
            assert after.text.startswith(f"# {after.heading}") and not set(before.text.split("\n\n")[1:]) & set(
                after.text.split("\n\n")[1:])


def test_chunk_ids_are_stable_and_a_paragraph_longer_than_the_budget_is_cut_at_sentences(count):
    long = Document(Path("long.md"), "markdown", (Page(None, "# Long\n\n" + PARAGRAPH * 12),))
    first = chunk_documents([long], count, budget=100, overlap=0, eval_share=0)
    again = chunk_documents([long], count, budget=100, overlap=0, eval_share=0)
    assert [c.id for c in first] == [c.id for c in again] and len(first) > 3
    assert all(c.tokens <= 100 for c in first)
    assert all(c.text.rstrip().endswith(".") for c in first)  # cut at sentence ends
    assert first[0].pages == "" and first[0].first_page is None


def test_the_held_out_side_is_whole_documents_and_no_chunk_text_is_on_both_sides(count):
    docs = [guide(f"doc{i}.pdf", sections=2) for i in range(5)]
    chunks = chunk_documents(docs, count, budget=120, overlap=60, eval_share=0.2)
    sides = {}
    for chunk in chunks:
        sides.setdefault(chunk.source, set()).add(chunk.split)
    assert all(len(s) == 1 for s in sides.values())  # a document is on one side
    assert sum(s == {"eval"} for s in sides.values()) == 1  # a fifth of five documents
    train = {p for c in chunks if c.split == "train" for p in c.text.split("\n\n")}
    held = {p for c in chunks if c.split == "eval" for p in c.text.split("\n\n")}
    assert not {p for p in train & held if not p.startswith("#")}


def test_a_single_document_is_split_by_section(count):
    chunks = chunk_documents([guide(sections=10)], count, budget=120, overlap=60, eval_share=0.2)
    held = {c.heading for c in chunks if c.split == "eval"}
    train = {c.heading for c in chunks if c.split == "train"}
    assert len(held) == 2 and not held & train  # two of ten sections, whole
    assert held_out_units([(guide(), [])], 0.0) == set()


def test_questions_are_read_from_a_numbered_list_or_json_and_refused_otherwise():
    assert read_questions("1. What causes it?\n2) How does it spread?\n3、如何预防？") == [
        "What causes it?", "How does it spread?", "如何预防？"]
    assert read_questions('```json\n{"questions": ["A?", "B?"]}\n```') == ["A?", "B?"]
    assert read_questions("**1.** What is HBV?") == ["What is HBV?"]
    for reply, reason in (('{"questions": ["What does hepatitis B', "questions: broken JSON"),
                          ('{"items": 3}', "questions: JSON without a list of questions"),
                          ("Question: What is the vaccine?", "questions: no numbered list")):
        with pytest.raises(Refused) as refused:
            read_questions(reply)
        assert refused.value.reason == reason


def test_the_reasoning_is_taken_from_where_the_teacher_puts_it():
    assert read_answer("<think>\nstep 1\n</think>\n\nThe answer.") == read_answer("step 1\n</think>The answer.")
    assert read_answer("<think>step 1</think>The answer.").reasoning_from == "<think> block"
    field = read_answer("The answer.", reasoning_field="thought it through")
    assert (field.reasoning, field.answer, field.reasoning_from) == ("thought it through", "The answer.",
                                                                     "reasoning field")
    both = read_answer("<think>echo</think>The answer.", reasoning_field="its own")  # the field wins, tags go
    assert (both.reasoning, both.answer) == ("its own", "The answer.")
    unclosed = read_answer("<think>still thinking when the tokens ran out")
    assert unclosed.answer == "" and unclosed.reasoning.startswith("still")
    assert read_answer("Just an answer.") == read_answer("Just an answer.", "")
    assert read_answer("Just an answer.").reasoning == ""


def test_scores_are_whole_numbers_from_one_to_ten():
    for reply, score in (("Score: 8\nSupported.", 8), ("**Score:** 9/10", 9), ("评分：7", 7), ('{"score": 10}', 10),
                         ("The answer is fine. Score = 6", 6)):
        assert read_score(reply) == score, reply
    for reply, reason in (("Looks fine.", "judge: no score"), ("Score: 11", "judge: score not a whole number from "
                                                                           "1 to 10"),
                          ("Score: 7.5", "judge: score not a whole number from 1 to 10"), ('{"score": ', "judge: "
                                                                                                      "broken JSON")):
        with pytest.raises(Refused) as refused:
            read_score(reply)
        assert refused.value.reason == reason


def test_each_question_and_answer_problem_has_its_reason():
    assert question_problem("What causes hepatitis B?") == ""
    assert question_problem("乙型肝炎如何传播？") == ""
    assert question_problem("Hepatitis B is a liver infection.") == "question: not a question (no question mark)"
    assert question_problem("Why?") == "question: too short to stand alone"
    assert question_problem("What does the passage say about HBV?") == \
        "question: refers to the passage instead of its subject"
    assert question_problem("文中提到的疫苗保护率是多少？") == "question: refers to the passage instead of its subject"
    assert answer_problem("r", "a", "length") == "answer: cut off at the token limit"
    assert answer_problem("r", "", "stop") == "answer: empty (reasoning only)"
    assert answer_problem("", "a", "stop") == "answer: no reasoning"
    assert answer_problem("r", "a </think>", "stop") == "answer: stray think tags"
    assert answer_problem("r", "a", "stop") == ""
    assert language_of("乙型肝炎 HBV") == "zh" and language_of("Hepatitis B 乙肝") == "en"


@pytest.mark.parametrize(("first", "second", "duplicate"), [
    ("What causes hepatitis B?", "What causes hepatitis B infection?", True),
    ("How is hepatitis B prevented?", "How can hepatitis B be prevented?", True),
    ("乙型肝炎是如何传播的？", "乙型肝炎如何传播？", True),
    ("What causes hepatitis B?", "WHAT causes hepatitis  B ?", True),
    ("How does hepatitis B spread?", "What causes hepatitis B?", False),
    ("乙型肝炎是如何传播的？", "乙型肝炎疫苗的保护率是多少？", False),
])
def test_near_duplicate_questions(first, second, duplicate):
    index = QuestionIndex()
    assert index.add(first)
    assert index.add(second) is not duplicate
    assert ngrams("乙型肝炎") == {"乙型", "型肝", "肝炎"}  # Chinese: bigrams; English: trigrams


def test_prompts_are_files_a_user_can_edit(tmp_path):
    written = export_prompts(tmp_path)
    assert len(written) == 2 * len(PLACEHOLDERS) and export_prompts(tmp_path) == []  # never overwritten
    (tmp_path / "en" / "questions.txt").write_text("Ask {count} questions about {text}, {reader}.")
    from qlora_kit.errors import UserError

    with pytest.raises(UserError) as refused:
        load_prompts("en", tmp_path)
    assert "unknown placeholder {reader}" in refused.value.render() and "questions.txt" in refused.value.title
    (tmp_path / "en" / "questions.txt").write_text("Ask {count} questions about:\n{text}")
    prompts = load_prompts("en", tmp_path)
    assert prompts.fill("questions", text="HBV", count=2, document="d", where="") == "Ask 2 questions about:\nHBV"
    assert load_prompts("zh").files["answer"].name == "answer.txt" and "问题" in load_prompts("zh").texts["answer"]
