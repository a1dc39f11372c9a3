"""Reading rows: every supported file type, the column mapping, and errors that name the row."""

from __future__ import annotations

import csv
import json

import pytest

from qlora_kit.data.rows import load_rows, split_rows
from qlora_kit.errors import UserError
from qlora_kit.recipe.schema import DataSection

ROWS = [{"Question": f"q{i}", "Complex_CoT": f"c{i}", "Response": f"r{i}"} for i in range(10)]


def write(tmp_path, suffix, rows=ROWS):
    path = tmp_path / f"rows{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_type_reads_the_same_rows(tmp_path, suffix):
    rowset = load_rows(DataSection(source=str(write(tmp_path, suffix))))
    assert [(r.question, r.cot, r.response, r.number) for r in rowset.rows] == \
        [(f"q{i}", f"c{i}", f"r{i}", i + 1) for i in range(10)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path, suffix):
    """Windows editors save UTF-8 with a BOM; it must not break the first line or the first CSV header."""
    path = write(tmp_path, suffix)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [r.question for r in load_rows(DataSection(source=str(path))).rows] == [f"q{i}" for i in range(10)]


def test_a_raw_tab_inside_a_jsonl_string_is_text(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"Question": "a\tb", "Complex_CoT": "c", "Response": "r"}\n',  # a raw tab in the string
                    encoding="utf-8")
    assert load_rows(DataSection(source=str(path))).rows[0].question == "a\tb"


def test_column_mapping(tmp_path):
    rows = [{"input": "q", "reasoning": "c", "output": "r"}]
    data = DataSection(source=str(write(tmp_path, ".jsonl", rows)), question_column="input",
                       cot_column="reasoning", response_column="output")
    row = load_rows(data).rows[0]
    assert (row.question, row.cot, row.response) == ("q", "c", "r")


def test_missing_column_lists_the_columns_present(tmp_path):
    path = write(tmp_path, ".csv", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError) as caught:
        load_rows(DataSection(source=str(path)))
    text = caught.value.render()
    assert "column `Question` (data.question_column) is not in the data" in text
    assert "The data has columns: answer, question" in text


def test_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"Question": "q", oops}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"rows.jsonl, line 2: not valid JSON \(Expecting property name"):
        load_rows(DataSection(source=str(path)))
    path.write_text('{"Question": "unterminated\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"line 1: not valid JSON \(Unterminated string starting, column 14\)"):
        load_rows(DataSection(source=str(path)))


def test_bad_rows_are_left_out_and_reported_by_number(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[2]["Response"] = "  "
    rows[5]["Question"] = 42
    del rows[7]["Response"]
    rowset = load_rows(DataSection(source=str(write(tmp_path, ".jsonl", rows))))
    assert len(rowset.rows) == 7 and rowset.total == 10
    assert rowset.dropped == {"empty `Response`": [3], "`Question` is not text": [6], "missing `Response`": [8]}


def test_zero_usable_rows_is_an_error(tmp_path):
    rows = [{"Question": "", "Complex_CoT": "c", "Response": "r"}] * 3
    with pytest.raises(UserError, match="none of the 3 rows is usable"):
        load_rows(DataSection(source=str(write(tmp_path, ".jsonl", rows))))


def test_not_utf8(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(json.dumps({"Question": "发烧", "Complex_CoT": "", "Response": "r"},
                                ensure_ascii=False).encode("gbk"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_rows(DataSection(source=str(path)))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="Data file not found"):
        load_rows(DataSection(source=str(tmp_path / "nope.jsonl")))


def test_split_is_seeded_limited_and_disjoint(tmp_path):
    rows = load_rows(DataSection(source=str(write(tmp_path, ".jsonl")))).rows
    data = DataSection(limit=8, eval_rows=2)
    train, evaluation = split_rows(rows, data, seed=1)
    again_train, again_eval = split_rows(rows, data, seed=1)
    assert [r.number for r in train] == [r.number for r in again_train]
    assert len(train) == 6 and len(evaluation) == 2
    assert not {r.number for r in train} & {r.number for r in evaluation}
    other_train, _ = split_rows(rows, data, seed=2)
    assert [r.number for r in other_train] != [r.number for r in train]
    with pytest.raises(UserError, match="leaves no rows to train on"):
        split_rows(rows, DataSection(eval_rows=10), seed=1)


def test_data_notes_say_what_the_rows_will_not_teach(tmp_path):
    from qlora_kit.data.report import data_notes

    rows = [{"Question": "q1", "Complex_CoT": " ", "Response": "r"},
            {"Question": "q2", "Complex_CoT": "c", "Response": "r"}]
    data = DataSection(source=str(write(tmp_path, ".jsonl", rows)))
    rowset = load_rows(data)
    assert data_notes(rowset, data) == ["1 row(s) with an empty `Complex_CoT`: trained with an empty reasoning part "
                                        "(rows 1)"]
    custom = DataSection(source=data.source, format="Q: {question} A: {response}")
    assert data_notes(rowset, custom) == ["data.format has no {cot}: the reasoning column `Complex_CoT` is not "
                                          "trained on"]
    assert data_notes(rowset, DataSection(source=data.source, cot_column="")) == []


ALPACA = [
    {"instruction": "Name the bone.", "input": "It is in the thigh.", "output": "The femur."},
    {"instruction": "What lowers fever?", "input": "", "output": "<think>\nAntipyretics do.\n</think>\n\nParacetamol."},
    {"instruction": "Continue.", "input": "", "output": "Yes.", "history": [["Hi", "Hello"]]},
    {"instruction": "", "input": "", "output": "Nothing asked."},
    {"instruction": "Be brief.", "input": "Why?", "output": "Because.", "system": "You are a doctor."},
]


def test_alpaca_rows_keep_the_input_and_split_the_thinking(tmp_path):
    rowset = load_rows(DataSection(source=str(write(tmp_path, ".jsonl", ALPACA))))  # layout auto -> alpaca
    got = [(r.question, r.cot, r.response, r.system, r.number) for r in rowset.rows]
    assert got == [("Name the bone.\n\nIt is in the thigh.", "", "The femur.", "", 1),
                   ("What lowers fever?", "Antipyretics do.", "Paracetamol.", "", 2),
                   ("Be brief.\n\nWhy?", "", "Because.", "You are a doctor.", 5)]
    assert rowset.dropped == {
        "has a `history` of earlier turns (multi-turn rows are not trained: split them into single turns)": [3],
        "empty `instruction` and `input`": [4]}


SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "<think>R1</think>A1"}]},
    {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q2"},
                       {"from": "gpt", "value": "A2"}]},
    {"conversations": [{"from": "human", "value": "Q3"}, {"from": "gpt", "value": "A3"},
                       {"from": "human", "value": "more"}, {"from": "gpt", "value": "A3b"}]},
    {"conversations": [{"from": "gpt", "value": "A4"}, {"from": "human", "value": "Q4"}]},
    {"conversations": [{"from": "human", "value": "Q5"}, {"from": "gpt", "value": "<think>only thoughts</think>"}]},
    {"conversations": [{"from": "human", "value": "Q6"}, {"from": "tool", "value": "x"}]},
]


def test_sharegpt_rows_one_user_one_assistant_turn(tmp_path):
    rowset = load_rows(DataSection(source=str(write(tmp_path, ".jsonl", SHAREGPT))))  # auto -> sharegpt
    assert [(r.question, r.cot, r.response, r.system, r.number) for r in rowset.rows] == \
        [("Q1", "R1", "A1", "", 1), ("Q2", "", "A2", "S", 2)]
    assert rowset.dropped == {
        "multi-turn conversation (more than one user or assistant turn: split it into single turns)": [3],
        "not one user turn followed by one assistant turn": [4],
        "empty answer (after </think>)": [5],
        "a turn's role `tool` is not user, assistant or system": [6]}


def test_openai_messages_rows_read_the_same_way(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                          {"role": "assistant", "content": "R1 thinks</think>\n\nA"}]}]
    rowset = load_rows(DataSection(source=str(write(tmp_path, ".jsonl", rows)), layout="sharegpt"))
    assert [(r.question, r.cot, r.response, r.system) for r in rowset.rows] == [("Q", "R1 thinks", "A", "S")]


def test_a_layout_without_its_columns_says_which_are_missing(tmp_path):
    with pytest.raises(UserError, match=r"data.layout = 'alpaca' needs the column\(s\) instruction, output"):
        load_rows(DataSection(source=str(write(tmp_path, ".jsonl")), layout="alpaca"))
    with pytest.raises(UserError, match="data.layout = 'sharegpt' needs a `conversations` or `messages` column"):
        load_rows(DataSection(source=str(write(tmp_path, ".jsonl")), layout="sharegpt"))
    with pytest.raises(UserError) as caught:  # none of the layouts: the message names them all
        load_rows(DataSection(source=str(write(tmp_path, ".jsonl", [{"prompt": "x", "answer": "y"}]))))
    assert "data.layout = 'alpaca'" in caught.value.render() and "'sharegpt'" in caught.value.render()


def test_a_row_system_turn_reaches_the_chat_template(tmp_path, demo_tokenizer):
    from qlora_kit.data.render import make_renderer

    rows = load_rows(DataSection(source=str(write(tmp_path, ".jsonl", SHAREGPT[:2])))).rows
    renderer, _ = make_renderer(demo_tokenizer, DataSection(system_prompt="recipe system"))
    assert "recipe system" in renderer(rows[0]).prompt  # no system turn of its own: the recipe's
    assert "S" in renderer(rows[1]).prompt and "recipe system" not in renderer(rows[1]).prompt


def test_the_data_report_speaks_of_the_layout_it_read(tmp_path):
    from qlora_kit.data.report import data_notes

    data = DataSection(source=str(write(tmp_path, ".jsonl", ALPACA)))
    rowset = load_rows(data)
    assert rowset.layout == "alpaca"
    assert data_notes(rowset, data) == ["2 row(s) with no <think>...</think> in the answer: trained with an empty "
                                        "reasoning part (rows 1, 5)"]
