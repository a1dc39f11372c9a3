"""The catalogue of bad input: each gives a short message naming the place and the fix, exit code 2,
no traceback, and nothing written. Plus property-based fuzzing: never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_kit.errors import UserError
from qlora_kit.run import main

DEMO_DIR = REPO / "qlora_kit" / "demo"
DEMO_MODEL, DEMO_DATA = DEMO_DIR / "tiny-qwen2", DEMO_DIR / "data.jsonl"
GOOD = [{"Question": "q?", "Complex_CoT": "because", "Response": "yes"}] * 4


def jsonl(tmp, rows, name="rows.jsonl"):
    path = tmp / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def model_folder(tmp, config=None, files=()):
    folder = tmp / "model"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    for name in files:
        (folder / name).write_bytes(b"\0" * 16)
    return folder


QWEN2 = json.loads((DEMO_MODEL / "config.json").read_text())


def recipe_text(tmp, model=None, data=None, extra="", tokenizer=None):
    model = model or DEMO_MODEL
    data = data or DEMO_DATA
    return (f'[model]\nname = "{model}"\ninit = "random"\ntokenizer = "{tokenizer or DEMO_MODEL}"\n'
            f'[data]\nsource = "{data}"\n[output]\ndir = "{tmp / "out"}"\n{extra}')


# id -> (build(tmp) -> (recipe text or None for a missing file, extra argv), expected message fragments)
CATALOGUE = {
    "recipe: invalid TOML": (lambda t: ("[train\nmax_steps = 1\n", []), ["is not valid TOML", "line 1"]),
    "recipe: unknown key": (lambda t: (recipe_text(t, extra="[train]\nlearning_rte = 1e-4\n"), []),
                            ["unknown key `train.learning_rte`", "did you mean `train.learning_rate`"]),
    "recipe: unknown section": (lambda t: (recipe_text(t, extra="[trian]\nseed = 1\n"), []),
                                ["unknown section [trian]", "did you mean `train`"]),
    "recipe: wrong type": (lambda t: (recipe_text(t, extra='[train]\nbatch_size = "4"\n'), []),
                           ["`train.batch_size` must be a whole number"]),
    "recipe: out of range": (lambda t: (recipe_text(t, extra="[lora]\ndropout = 1.5\n"), []),
                             ["`lora.dropout` must be between 0 and 1"]),
    "recipe: bad choice": (lambda t: (recipe_text(t, extra='[quant]\nquant_type = "int4"\n'), []),
                           ["`quant.quant_type` must be one of nf4, fp4"]),
    "recipe: missing file": (lambda t: (None, []), ["Recipe file not found"]),
    "recipe: not UTF-8": (lambda t: ("[train]\n# caf\xe9\n".encode("latin-1"), []), ["is not UTF-8"]),
    "recipe: bad override": (lambda t: (recipe_text(t), ["train.max_steps"]),
                             ["override `train.max_steps` must look like section.key=value"]),
    "recipe: override wrong type": (lambda t: (recipe_text(t), ["train.max_steps=many"]),
                                    ["`train.max_steps` must be a whole number, got 'many'"]),
    "recipe: malformed list override": (lambda t: (recipe_text(t), ["lora.target_modules=[q_proj"]),
                                        ["`lora.target_modules` takes a list, and this is not a valid TOML one"]),
    "recipe: LoRA target the model lacks": (lambda t: (recipe_text(t), ['lora.target_modules=["qproj"]']),
                                            ["`qproj` is not a layer of qwen2", "did you mean `q_proj`"]),
    "model: tokenizer larger than the model's vocabulary": (
        lambda t: (recipe_text(t, tokenizer=_big_tokenizer(t)), []),
        ["has 1,024 tokens, but the model's embedding has 576 rows"]),
    "recipe: custom format without question": (lambda t: (recipe_text(t), ['data.format="{cot}"']),
                                               ["`data.format` must be `chat`, `plain`, or a template"]),
    "recipe: eval steps without eval rows": (lambda t: (recipe_text(t), ["train.eval_steps=5", "data.eval_rows=0"]),
                                             ["`train.eval_steps` is set but `data.eval_rows` is 0"]),
    "recipe: unknown SFTConfig argument": (lambda t: (recipe_text(t, extra="[sft]\nneftune = 5\n"), []),
                                           ["unknown SFTConfig argument `sft.neftune`"]),
    "data: missing file": (lambda t: (recipe_text(t, data=t / "nope.jsonl"), []),
                           ["Data file not found", "nope.jsonl"]),
    "data: malformed JSONL line": (
        lambda t: (recipe_text(t, data=_write(t / "r.jsonl", json.dumps(GOOD[0]) + "\n{oops\n")), []),
        ["r.jsonl, line 2: not valid JSON"]),
    "data: missing column": (lambda t: (recipe_text(t, data=jsonl(t, [{"Question": "q", "Response": "r"}])), []),
                             ["column `Complex_CoT` (data.cot_column) is not in the data"]),
    "data: CSV with another header": (
        lambda t: (recipe_text(t, data=_write(t / "r.csv", "question,answer\nq,a\n")), []),
        ["column `Question` (data.question_column) is not in the data", "The data has columns: answer, question"]),
    "data: no field is text": (
        lambda t: (recipe_text(t, data=jsonl(t, [{"Question": 1, "Complex_CoT": "c", "Response": "r"}] * 3)), []),
        ["none of the 3 rows is usable", "`Question` is not text: rows 1, 2, 3"]),
    "data: every field empty": (
        lambda t: (recipe_text(t, data=jsonl(t, [{"Question": "", "Complex_CoT": "", "Response": ""}] * 2)), []),
        ["none of the 2 rows is usable", "empty `Question`: rows 1, 2"]),
    "data: empty file": (lambda t: (recipe_text(t, data=_write(t / "r.jsonl", "")), []),
                         ["the data set has no rows"]),
    "data: every row over length": (lambda t: (recipe_text(t), ["data.max_length=16"]),
                                    ["Every training row is longer than data.max_length = 16"]),
    "data: every eval row over length": (
        lambda t: (recipe_text(t), ["data.max_length=30", "data.over_length=truncate", "data.eval_rows=4"]),
        ["Every row is longer than data.max_length = 30 tokens, so there is nothing to evaluate on",
         "data.eval_rows = 0"]),
    "data: over length with policy error": (
        lambda t: (recipe_text(t), ["data.max_length=100", "data.over_length=error"]),
        ["rows are longer than data.max_length = 100", "data.over_length = 'drop'"]),
    "data: wrong encoding": (
        lambda t: (recipe_text(t, data=_write(t / "r.jsonl", json.dumps({"Question": "发烧", "Complex_CoT": "c",
                                                                          "Response": "r"}, ensure_ascii=False),
                                              "gbk")), []),
        ["not UTF-8", "iconv"]),
    "data: unsupported file type": (lambda t: (recipe_text(t, data=_write(t / "r.txt", "q")), []),
                                    ["unsupported file type `.txt`"]),
    "data: JSON that is not a list of rows": (lambda t: (recipe_text(t, data=_write(t / "r.json", '"text"')), []),
                                              ["expected a JSON list of objects"]),
    "data: no rows left to train": (lambda t: (recipe_text(t, data=jsonl(t, GOOD)), ["data.eval_rows=4"]),
                                    ["data.eval_rows = 4 leaves no rows to train on"]),
    "model: missing folder": (lambda t: (recipe_text(t, model=t / "gone"), []),
                              ["The model folder does not exist", "gone"]),
    "model: no config.json": (lambda t: (recipe_text(t, model=model_folder(t)), []), ["has no config.json"]),
    "model: config.json not JSON": (lambda t: (recipe_text(t, model=model_folder(t, "{nope")), []),
                                    ["config.json is not valid JSON"]),
    "model: remote code required": (
        lambda t: (recipe_text(t, model=model_folder(t, {"model_type": "mystery", "auto_map": {"AutoModel": "x.Y"}})),
                   []),
        ["needs its own Python code", "model.trust_remote_code = true"]),
    "model: pickle-only weights": (
        lambda t: (recipe_text(t, model=model_folder(t, QWEN2, ["pytorch_model.bin"])), ["model.init=pretrained"]),
        ["only pickle weights (pytorch_model.bin)", "model.allow_pickle_weights = true"]),
    "model: no weights": (lambda t: (recipe_text(t, model=model_folder(t, QWEN2)), ["model.init=pretrained"]),
                          ["has no weight files", "model.init = 'random'"]),
    "model: GGUF file missing": (lambda t: (recipe_text(t, model=t / "SmolLM2-135M-Instruct.Q4_1.gguf"),
                                            ["model.init=pretrained"]),
                                 ["The GGUF file does not exist", "python -m qlora_kit.smollm2"]),
    "model: not a GGUF file": (lambda t: (recipe_text(t, model=fake_gguf(t)), ["model.init=pretrained"]),
                               ["is not a readable GGUF file", "model.gguf"]),
}


def fake_gguf(tmp):
    path = tmp / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF file" * 8)
    return path


def _big_tokenizer(tmp: Path) -> Path:
    """The demo tokenizer grown to 1,024 tokens: more ids than the demo model's 576 embedding rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(1024 - len(tokenizer))])
    tokenizer.save_pretrained(tmp / "big-tokenizer")
    return tmp / "big-tokenizer"


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def test_catalogue_is_large_enough():
    assert len(CATALOGUE) >= 25


@pytest.mark.parametrize("case", list(CATALOGUE), ids=list(CATALOGUE))
def test_bad_input_gives_a_short_message_and_writes_nothing(case, tmp_path, capsys):
    build, expected = CATALOGUE[case]
    text, argv = build(tmp_path)
    recipe = tmp_path / "recipe.toml"
    if text is not None:
        recipe.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    code = main([str(recipe), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    for fragment in expected:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    assert "Traceback" not in err and len(err.splitlines()) < 25
    assert not (tmp_path / "out").exists(), "nothing may be written"


KEYS = ["model.name", "model.init", "quant.quant_type", "quant.compute_dtype", "lora.r", "lora.dropout",
        "lora.target_modules", "data.format", "data.max_length", "train.learning_rate", "train.max_steps",
        "train.warmup", "nosuch.key", "train.nosuch", "sft.neftune_noise_alpha"]
VALUES = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True).map(repr),
                   st.sampled_from(["true", "false", '"nf4"', "[1, 2]", '["q_proj"]', "{a = 1}", '"{question}{cot}"']),
                   st.text(max_size=20))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4),
       st.lists(st.text(max_size=30), max_size=2))
def test_fuzzed_overrides_never_raise_anything_but_a_user_error(pairs, junk):
    from qlora_kit.recipe.loading import recipe_from_dict
    from qlora_kit.recipe.schema import Recipe

    try:
        assert isinstance(recipe_from_dict({}, [f"{k}={v}" for k, v in pairs] + junk), Recipe)
    except UserError as error:
        assert error.problems or error.title


ROW_VALUES = st.one_of(st.none(), st.text(max_size=40), st.integers(), st.lists(st.text(max_size=3), max_size=2),
                       st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(st.sampled_from(["Question", "Complex_CoT", "Response", "other"]), ROW_VALUES),
                min_size=1, max_size=6))
def test_fuzzed_rows_load_render_and_encode_or_explain(demo_tokenizer, tmp_path_factory, rows):
    from qlora_kit.data.encode import Encoder, encode_rows
    from qlora_kit.data.render import make_renderer
    from qlora_kit.data.rows import load_rows
    from qlora_kit.recipe.schema import DataSection

    data = DataSection(source=str(jsonl(tmp_path_factory.mktemp("fuzz"), rows)))
    try:
        rowset = load_rows(data)
    except UserError:
        return
    renderer, _ = make_renderer(demo_tokenizer, data)
    for example in encode_rows(Encoder(demo_tokenizer, renderer), rowset.rows):
        assert example.input_ids[-1] == demo_tokenizer.eos_token_id and 1 in example.completion_mask


@pytest.mark.parametrize("rows", ['{"Question": "q?", "Complex_CoT": "c", "Response": "r"}\n{oops\n',
                                  '{"Question": "q?", "Response": "r"}\n'])
def test_a_data_mistake_is_answered_before_the_libraries_load(tmp_path, rows):
    """A bad row or a missing column is found by reading the file, which needs no tokenizer: it is answered as fast
    as a recipe typo, before torch and transformers are imported (they take most of a minute on a slow disk)."""
    import subprocess
    import sys

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(recipe_text(tmp_path, data=_write(tmp_path / "r.jsonl", rows)), encoding="utf-8")
    probe = ("import sys\nfrom qlora_kit.run import main\ncode = main([sys.argv[1]])\n"
             "print('exit', code, 'torch imported:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe, str(recipe)], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert "exit 2 torch imported: False" in result.stdout, result.stdout + result.stderr
    assert "r.jsonl" in result.stdout + result.stderr
