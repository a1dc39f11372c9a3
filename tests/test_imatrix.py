"""The importance matrix of `--imatrix` (qlora_kit/gguf/imatrix.py) on real tiny models, real transformers.

  * what is collected: the sums equal Σ x² of the linear layer's input computed here by hand from the model's own
    pieces (ffn_down's input is silu(gate)·up of the normed hidden state, q/k/v's the normed hidden state), over
    the chunks llama-imatrix would cut (512 tokens, BOS first, the tail left out);
  * the names are the export's own tensor names (read back from the .gguf it writes);
  * the file round-trips (GGUF and legacy .dat), and gguf's reader sees llama-imatrix's layout;
  * against llama.cpp itself where a build is given (`LLAMA_QUANTIZE=/path/to/llama-quantize`, with llama-imatrix
    beside it; skipped otherwise): llama-imatrix's matrix of the same text equals ours, its file read and saved
    here comes back byte for byte, and `llama-quantize --imatrix ours.imatrix f16.gguf out.gguf q4_k_m` accepts
    ours (GGUF and .dat);
  * `--imatrix auto` on a demo run trained and merged by the commands a user types writes NAME.imatrix from the
    run's training rows (its held-out rows left out) and llama-quantize's keys into the file;
  * bad input: each a one-screen UserError.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qlora_kit.errors import UserError
from qlora_kit.gguf import imatrix as im

gguf = pytest.importorskip("gguf")  # the optional `export` extra

REPO = Path(__file__).resolve().parents[1]
LLAMA_QUANTIZE = os.environ.get("LLAMA_QUANTIZE", "")  # path of a llama-quantize binary (llama.cpp's build)
LAYER_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def llama_tool(name: str) -> Path:
    """A llama.cpp binary beside LLAMA_QUANTIZE, or a clean skip."""
    if not LLAMA_QUANTIZE:
        pytest.skip("LLAMA_QUANTIZE (a llama.cpp build's llama-quantize) not set")
    path = Path(LLAMA_QUANTIZE).parent / name
    if not path.is_file():
        pytest.skip(f"no {name} beside {LLAMA_QUANTIZE}")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny merged-style folder (rows 256 wide, so the K types are used, not their fallbacks)


def demo_text() -> str:
    from qlora_kit.demo.build import make_rows, row_texts

    return "\n\n".join(row_texts(make_rows()))


def save_tiny(folder: Path, tied: bool) -> Path:
    from transformers import AutoModelForCausalLM, Qwen2Config

    from qlora_kit.demo.build import build_tokenizer, make_rows, row_texts

    tokenizer = build_tokenizer(row_texts(make_rows()))
    config = Qwen2Config(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=tied, initializer_range=0.1,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-untied"), tied=False)


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-tied"), tied=True)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(demo_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def computed(tiny, text_file) -> im.Imatrix:
    tokens, name = im.file_tokens(tiny, text_file)
    return im.compute_imatrix(tiny, tokens, dataset=name, max_tokens=2 * im.CHUNK_TOKENS, log=lambda *_: None)


# ---------------------------------------------------------------------------------------------------------------
# What is collected


def test_sums_are_the_squared_inputs_of_each_linear_layer_over_llama_imatrix_chunks(tiny, text_file, computed):
    from transformers import AutoModelForCausalLM

    from qlora_kit.gguf.imatrix import CHUNK_TOKENS

    tokens, _ = im.file_tokens(tiny, text_file)
    assert len(tokens) > 3 * CHUNK_TOKENS  # a third chunk and a tail exist, and must be left out
    bos = im.bos_token_id(tiny)
    chunks = [tokens[:CHUNK_TOKENS], tokens[CHUNK_TOKENS:2 * CHUNK_TOKENS]]
    if bos is not None:
        chunks = [[bos, *chunk[1:]] for chunk in chunks]

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    normed = {}  # the layer-1 norms' outputs, per chunk
    layer = model.model.layers[1]
    layer.input_layernorm.register_forward_hook(lambda m, i, o: normed.setdefault("attn", []).append(o))
    layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: normed.setdefault("ffn", []).append(o))
    with torch.no_grad():
        for chunk in chunks:  # each chunk on its own from position 0, as llama-imatrix clears its cache per chunk
            model(input_ids=torch.tensor([chunk]))
        attn_in = torch.cat(normed["attn"], 1)[0].double()
        ffn_normed = torch.cat(normed["ffn"], 1)[0]
        mlp = layer.mlp
        down_in = (torch.nn.functional.silu(mlp.gate_proj(ffn_normed)) * mlp.up_proj(ffn_normed)).double()
    by_hand = {"blk.1.attn_q.weight": attn_in, "blk.1.attn_k.weight": attn_in, "blk.1.attn_v.weight": attn_in,
               "blk.1.ffn_gate.weight": ffn_normed.double(), "blk.1.ffn_up.weight": ffn_normed.double(),
               "blk.1.ffn_down.weight": down_in}
    for name, x in by_hand.items():
        assert computed.counts[name] == 2 * CHUNK_TOKENS
        np.testing.assert_allclose(computed.sums[name], (x * x).sum(0).numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(computed.importance(name), (x * x).mean(0).numpy(), rtol=1e-4, atol=1e-8)
    assert computed.chunk_count == 2 and computed.tokens == 2 * CHUNK_TOKENS
    assert computed.datasets == ["calibration.txt"]


def test_a_stream_shorter_than_a_chunk_is_one_chunk_and_too_few_tokens_are_refused(tiny):
    short = list(range(5, 105))
    (chunk,) = im.chunks_of(short, im.DEFAULT_TOKENS, bos_id=7)
    assert chunk == [7, *short[1:]]
    assert len(im.chunks_of(list(range(3000)), 1024, bos_id=None)) == 2  # the budget, in whole chunks
    with pytest.raises(UserError, match="at least 16"):
        im.chunks_of(list(range(10)), im.DEFAULT_TOKENS, bos_id=None)


def test_names_are_the_tensor_names_the_export_writes(tiny, tiny_tied, tmp_path):
    from qlora_kit.gguf.export import export_gguf

    for folder, tied in ((tiny, False), (tiny_tied, True)):
        written = export_gguf(folder, tmp_path / f"{tied}.gguf", "f16", modelfile=False, log=lambda *_: None)
        names = {t.name for t in gguf.GGUFReader(written.gguf_path).tensors}
        layer_matrices = {f"blk.{b}.{t}.weight" for b in range(2) for t in LAYER_TENSORS}
        assert layer_matrices <= names
        assert set(im.collected_weights(folder).values()) == layer_matrices  # llama-imatrix's default set
        # --process-output adds output.weight; a tied output layer is token_embd's matrix, never collected
        with_output = set(im.collected_weights(folder, process_output=True).values())
        assert with_output == layer_matrices | (set() if tied else {"output.weight"})
        assert ("output.weight" in names) is not tied


def test_process_output_collects_the_final_norms_output(tiny, text_file):
    from transformers import AutoModelForCausalLM

    tokens, _ = im.file_tokens(tiny, text_file)
    result = im.compute_imatrix(tiny, tokens, max_tokens=im.CHUNK_TOKENS, process_output=True, log=lambda *_: None)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    chunk = im.chunks_of(tokens, im.CHUNK_TOKENS, im.bos_token_id(tiny))[0]
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([chunk])).last_hidden_state[0].double()
    np.testing.assert_allclose(result.importance("output.weight"), (hidden * hidden).mean(0).numpy(), rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# The file


def test_the_file_round_trips_in_both_formats(computed, tmp_path):
    for suffix in (".imatrix", ".dat"):
        path = im.save_imatrix(computed, tmp_path / f"ours{suffix}")
        back = im.load_imatrix(path)
        assert set(back.sums) == set(computed.sums)
        assert back.datasets == computed.datasets and back.chunk_count == computed.chunk_count
        for name in computed.sums:  # what the quantizer gets is the same from either file
            np.testing.assert_allclose(back.importance(name), computed.importance(name), rtol=1e-6)
        if suffix == ".imatrix":
            assert back.counts == computed.counts
            assert path.read_bytes() == im.save_imatrix(back, tmp_path / "again.imatrix").read_bytes()


def test_gguf_reads_it_with_llama_imatrix_layout(computed, tmp_path):
    reader = gguf.GGUFReader(im.save_imatrix(computed, tmp_path / "ours.imatrix"))
    fields = {name: field for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert list(fields) == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert fields["general.type"].contents() == "imatrix"
    assert fields["imatrix.datasets"].contents() == ["calibration.txt"]
    assert fields["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    assert fields["imatrix.chunk_size"].contents() == 512
    names = [t.name for t in reader.tensors]
    expected = [n + suffix for n in sorted(computed.sums) for suffix in (".in_sum2", ".counts")]
    assert names == expected
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        if tensor.name.endswith(".counts"):
            assert tensor.data.tolist() == [1024.0]
        else:
            assert tensor.data.shape == computed.sums[tensor.name.removesuffix(".in_sum2")].shape


# ---------------------------------------------------------------------------------------------------------------
# Against llama.cpp itself


@pytest.fixture(scope="module")
def tiny_f16(tiny, tmp_path_factory) -> Path:
    from qlora_kit.gguf.export import export_gguf

    out = tmp_path_factory.mktemp("f16") / "tiny-f16.gguf"
    return export_gguf(tiny, out, "f16", modelfile=False, log=lambda *_: None).gguf_path


def test_llama_imatrix_of_the_same_text_equals_ours(tiny, tiny_f16, text_file, computed, tmp_path):
    theirs_path = tmp_path / "theirs.imatrix"
    done = subprocess.run([str(llama_tool("llama-imatrix")), "-m", str(tiny_f16), "-f", str(text_file), "-o",
                           str(theirs_path), "--chunks", "2", "-t", "2", "--no-ppl"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = im.load_imatrix(theirs_path)
    assert set(theirs.sums) == set(computed.sums)
    assert theirs.counts == computed.counts and theirs.chunk_count == computed.chunk_count
    for name in theirs.sums:  # f16 weights there, float32 here: equal to f16 rounding
        want = theirs.importance(name)
        assert np.abs(computed.importance(name) - want).max() <= 1e-2 * want.max(), name
    # its file, read and saved here, is the same bytes: the layout is llama-imatrix's own
    assert im.save_imatrix(theirs, tmp_path / "resaved.imatrix").read_bytes() == theirs_path.read_bytes()


@pytest.mark.parametrize("suffix", [".imatrix", ".dat"])
def test_llama_quantize_accepts_ours(tiny_f16, computed, tmp_path, suffix):
    ours = im.save_imatrix(computed, tmp_path / f"ours{suffix}")
    out = tmp_path / "q4_k_m.gguf"
    done = subprocess.run([str(llama_tool("llama-quantize")), "--imatrix", str(ours), str(tiny_f16), str(out),
                           "q4_k_m", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"loaded {len(computed)} importance matrix entries" in done.stdout + done.stderr
    fields = {name: field.contents() for name, field in gguf.GGUFReader(out).fields.items()}
    assert fields["quantize.imatrix.entries_count"] == len(computed)
    assert fields["quantize.imatrix.dataset"] == "calibration.txt"
    assert fields["quantize.imatrix.chunks_count"] == 2


# ---------------------------------------------------------------------------------------------------------------
# --imatrix auto on a demo run, trained and merged by the commands a user types


@pytest.fixture(scope="module")
def merged_demo(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("demo")
    run, merged = root / "run", root / "merged"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"}
    trained = subprocess.run([sys.executable, "-m", "qlora_kit.run", str(REPO / "recipes" / "demo.toml"),
                              "train.max_steps=2", "train.eval_steps=0", "train.save_steps=0", "samples.count=0",
                              f"output.dir={run}"], capture_output=True, text=True, timeout=600, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "qlora_kit.merge", str(run), "--out", str(merged)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, merged


def test_auto_computes_from_the_runs_training_rows_and_saves_it_beside_the_gguf(merged_demo, tmp_path, capsys):
    from rich.console import Console

    from qlora_kit.data.examples import build_examples
    from qlora_kit.gguf.export import main
    from qlora_kit.recipe.loading import load_recipe

    run, merged = merged_demo
    out = tmp_path / "demo-f16.gguf"
    assert main([str(merged), "--type", "f16", "--imatrix", "auto", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = out.with_suffix(".imatrix")
    assert f"wrote {saved}" in printed
    result = im.load_imatrix(saved)
    assert set(result.sums) == {f"blk.{b}.{t}.weight" for b in range(2) for t in LAYER_TENSORS}
    assert result.datasets == ["data.jsonl (training rows)"]

    # the run's training examples, as training built them; its held-out rows are not in the stream
    examples = build_examples(load_recipe(run / "recipe.toml"), im.load_tokenizer(merged), Console(quiet=True))
    train_tokens = sum(len(e.input_ids) for e in examples.train)
    assert examples.eval and result.counts["blk.0.attn_q.weight"] == min(train_tokens, im.DEFAULT_TOKENS) // 512 * 512
    stream, _ = im.run_tokens(merged)
    assert stream == [t for e in examples.train for t in e.input_ids]


def test_auto_quantized_export_records_the_imatrix_as_llama_quantize_does(merged_demo, tmp_path):
    from qlora_kit.gguf.export import export_gguf

    _, merged = merged_demo
    result = export_gguf(merged, tmp_path / "demo-q4_k_m.gguf", "q4_k_m", modelfile=False, imatrix="auto",
                         log=lambda *_: None)
    fields = {name: field.contents() for name, field in gguf.GGUFReader(result.gguf_path).fields.items()}
    assert fields["quantize.imatrix.file"] == "demo-q4_k_m.imatrix"
    assert fields["quantize.imatrix.dataset"] == "data.jsonl (training rows)"
    assert fields["quantize.imatrix.entries_count"] == 14
    assert fields["quantize.imatrix.chunks_count"] == result.imatrix.chunk_count > 0
    assert result.weighted_tensors > 0


def test_a_rows_file_is_rendered_as_training_renders_it(merged_demo):
    from qlora_kit.data.encode import Encoder
    from qlora_kit.data.render import make_renderer
    from qlora_kit.data.rows import load_rows
    from qlora_kit.recipe.loading import load_recipe

    run, merged = merged_demo
    recipe = load_recipe(run / "recipe.toml")
    tokens, name = im.file_tokens(merged, Path(recipe.data.source))
    tokenizer = im.load_tokenizer(merged)
    encoder = Encoder(tokenizer, make_renderer(tokenizer, recipe.data)[0])
    assert tokens == [t for row in load_rows(recipe.data).rows for t in encoder.encode(row).input_ids]
    assert name == "data.jsonl"


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_one_clear_error(tiny, tiny_f16, computed, tmp_path, capsys):
    from qlora_kit.gguf.export import main

    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    short_dat = tmp_path / "cut.dat"
    short_dat.write_bytes(im.legacy_bytes(computed)[:100])
    other = im.save_imatrix(im.Imatrix({"blk.0.attn_q.weight": np.ones(17, np.float32)},
                                       {"blk.0.attn_q.weight": 512}, ["x"], 1), tmp_path / "other.imatrix")
    cases = {
        "no such file": str(tmp_path / "missing.imatrix"),
        "has no run behind it": "auto",
        "neither an imatrix file nor UTF-8 text": str(junk),
        "cut short": str(short_dat),
        "is a model GGUF": str(tiny_f16),
        "made for another model": str(other),
    }
    for i, (message, spec) in enumerate(cases.items()):
        code = main([str(tiny), "--type", "q8_0", "--imatrix", spec, "--out", str(tmp_path / f"{i}.gguf")])
        error = capsys.readouterr().err
        assert code == 2 and message in error, (message, error)
        assert not (tmp_path / f"{i}.gguf").exists()
    assert main([str(tiny), "--adapter", "--imatrix", "auto"]) == 2
    assert "--adapter writes the LoRA matrices" in capsys.readouterr().err


def test_an_imatrix_without_llama_imatrix_metadata_is_refused_as_llama_quantize_refuses_it(computed, tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "bare.imatrix", arch="llama")
    writer.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones(256, np.float32))
    writer.add_tensor("blk.0.attn_q.weight.counts", np.ones(1, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="without llama-imatrix's metadata"):
        im.load_imatrix(tmp_path / "bare.imatrix")
