"""GGUF export on real (tiny) Qwen2 and Llama models: written with gguf's GGUFWriter, read back by transformers'
own GGUF loader (which undoes llama.cpp's converter, Llama q/k permutation included) and by gguf's GGUFReader.

What transformers 5.23 cannot check is checked from the file itself: its GGUF tokenizer loader skips control
tokens spelled outside the byte-level alphabet (R1's `<｜...｜>` tokens) and appends a new BOS, so special tokens
are round-tripped through a tokenizer rebuilt from the GGUF metadata alone, the way llama.cpp uses it.
Also: the pre-tokenizer name found as llama.cpp's converter finds it (hash table, split-regex fallback, refusal),
tied embeddings (no output.weight), the Ollama Modelfile per chat format (its Go template rendered by a small
emulator and compared with the Jinja template's text), greedy agreement, and one real model (SmolLM2-135M,
`real_model`, skipped where the `smollm2_dir` fixture has no folder). Offline, CPU only.
"""

from __future__ import annotations

import copy
import json
from hashlib import sha256
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import R1_TOKENIZER

from qlora_kit.demo.build import build_tokenizer, make_rows, row_texts
from qlora_kit.errors import UserError
from qlora_kit.gguf.export import export_gguf, main
from qlora_kit.gguf.model_config import hyper_parameters
from qlora_kit.gguf.tensors import llama3_rope_factors, permute_for_llama
from qlora_kit.gguf.tokenizer import CHKTXT, pre_tokenizer_name, tokenizer_hash, write_tokenizer

gguf = pytest.importorskip("gguf")  # the optional `export` extra; qlora_kit.gguf.export imports it lazily

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
CHAT = f"{USER}Is 2024 a leap year?{ASSISTANT}<think>\n2024 / 4 = 506.</think>Yes.{EOS}"
TEXTS = ["A patient has a body temperature of 38.5 °C. Does the patient have a fever?",
         "患者体温38.5摄氏度，是否发烧？请一步一步推理。", "  two spaces\n\nnew lines\ttab 1234567", CHAT]
F16_RELATIVE_TOLERANCE = 1e-2   # of the largest |logit|; measured ~1.3e-3
Q8_RELATIVE_TOLERANCE = 0.1     # measured ~3e-2: q8_0's own rounding, amplified through the layers


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny merged-style folder per architecture, exported once as f16 and once as q8_0


def make_tokenizer(split: str | None):
    """The demo byte-level BPE with R1's special tokens; `split` replaces its Qwen2 split regex (Llama 3's)."""
    from tokenizers import Regex, pre_tokenizers

    tokenizer = build_tokenizer(row_texts(make_rows()))
    if split:
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return tokenizer


def make_model(arch: str, tokenizer, tie_word_embeddings: bool = False):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    config = config_class(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, tie_word_embeddings=tie_word_embeddings, initializer_range=0.1,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-zero q/k/v biases, so a dropped or misnamed bias shows in the logits
        for name, parameter in model.named_parameters():
            if name.endswith("_proj.bias"):
                parameter.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """arch -> (arch, folder, original model, tokenizer, {"f16": path, "q8_0": path}), each built once."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    built = {}

    def get(arch: str):
        if arch not in built:
            # R1-Distill-Llama's tokenizer is Llama 3's: the Llama model gets Llama 3's split ("llama-bpe")
            tokenizer = make_tokenizer(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"] if arch == "llama" else None)
            model = make_model(arch, tokenizer)
            folder = tmp_path_factory.mktemp(f"merged-{arch}")
            # Llama in several shards with an index, as tools/merge.py writes them; Qwen2 in one file
            model.save_pretrained(folder, max_shard_size="200KB" if arch == "llama" else "1GB")
            tokenizer.save_pretrained(folder)
            out = tmp_path_factory.mktemp(f"gguf-{arch}")
            files = {quant: export_gguf(folder, out / f"{arch}-{quant}.gguf", quant, log=lambda *_: None).gguf_path
                     for quant in ("f16", "q8_0")}
            built[arch] = arch, folder, model, tokenizer, files
        return built[arch]

    return get


@pytest.fixture(params=["qwen2", "llama"])
def exported(request, build):
    return build(request.param)


def load_gguf_model(path: Path):
    from qlora_kit.gguf.verify import load_gguf  # transformers' GGUF loader, without its progress bar

    return load_gguf(path)


def compare_logits(reference, candidate, tokenizer) -> tuple[float, float, float]:
    """(max |difference|, that relative to the largest |reference logit|, top-1 agreement) over the prompts."""
    prompts = [row["Question"] for row in make_rows()[:8]] + TEXTS
    worst, scale, agree, positions = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            expected, got = reference(ids).logits[0], candidate(ids).logits[0]
            worst = max(worst, (expected - got).abs().max().item())
            scale = max(scale, expected.abs().max().item())
            agree += (expected.argmax(-1) == got.argmax(-1)).sum().item()
            positions += ids.shape[1]
    return worst, worst / scale, agree / positions


def read_gguf(path: Path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return reader, fields


# ---------------------------------------------------------------------------------------------------------------
# Weights


def test_f16_logits_match_the_original(exported):
    arch, _, model, tokenizer, files = exported
    worst, relative, top1 = compare_logits(model, load_gguf_model(files["f16"]), tokenizer)
    print(f"\n{arch} f16: max |logit diff| {worst:.2e} ({relative:.2e} of max |logit|), top-1 agreement {top1:.3f}")
    assert relative < F16_RELATIVE_TOLERANCE
    assert top1 >= 0.99


def test_q8_0_logits_are_the_original_up_to_q8_0_rounding(exported):
    arch, _, model, tokenizer, files = exported
    loaded = load_gguf_model(files["q8_0"])
    worst, relative, top1 = compare_logits(model, loaded, tokenizer)
    print(f"\n{arch} q8_0: max |logit diff| {worst:.2e} ({relative:.2e} of max |logit|), top-1 agreement {top1:.3f}")
    assert relative < Q8_RELATIVE_TOLERANCE
    assert top1 >= 0.9

    # The error above is q8_0's rounding and nothing else: the original with every 2-D weight rounded through
    # gguf's own q8_0 gives the same logits as the file.
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in rounded.parameters():
            if parameter.ndim == 2:
                q = gguf.quants.quantize(parameter.numpy(), gguf.GGMLQuantizationType.Q8_0)
                parameter.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
    _, rounding_only, _ = compare_logits(rounded, loaded, tokenizer)
    assert rounding_only < 1e-4


def test_tensors_have_llama_cpp_names_types_and_layout(exported):
    arch, folder, model, _, files = exported
    reader, _ = read_gguf(files["q8_0"])
    tensors = {t.name: t for t in reader.tensors}
    per_block = ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                 "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"]
    if arch == "qwen2":
        per_block += ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    expected |= {f"blk.{block}.{name}" for block in range(2) for name in per_block}
    assert set(tensors) == expected
    if arch == "llama":
        assert len(list(folder.glob("model-*.safetensors"))) > 1  # the index path was exercised

    for name, tensor in tensors.items():  # norms and biases f32, matrices q8_0
        is_vector = name.endswith(("norm.weight", ".bias"))
        assert tensor.tensor_type == (gguf.GGMLQuantizationType.F32 if is_vector else gguf.GGMLQuantizationType.Q8_0)

    # Llama's q/k rows are stored permuted for llama.cpp's rope, Qwen2's as they are
    f16 = {t.name: t for t in gguf.GGUFReader(files["f16"]).tensors}
    for block, layer in enumerate(model.model.layers):
        for name, weight, heads in (("attn_q", layer.self_attn.q_proj.weight, 4),
                                    ("attn_k", layer.self_attn.k_proj.weight, 2)):
            original = weight.detach().numpy()
            stored = f16[f"blk.{block}.{name}.weight"].data.astype("float32")
            want = permute_for_llama(original, heads) if arch == "llama" else original
            assert abs(stored - want).max() < 1e-2
            if arch == "llama":
                assert abs(stored - original).max() > 1e-2  # the permutation did something


def test_llama3_rope_scaling_is_written_as_llama_cpp_rope_factors():
    """R1-Distill-Llama-8B's config.json (transformers 4 keys); transformers' own llama3 rope as the reference."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    config_json = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
                   "intermediate_size": 14336, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                   "vocab_size": 128256, "rope_theta": 500000.0, "rope_scaling": scaling}
    factors = llama3_rope_factors(hyper_parameters(config_json))

    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                         rope_parameters={**scaling, "rope_theta": 500000.0})
    unscaled, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert torch.allclose(torch.from_numpy(factors), unscaled / scaled, rtol=1e-5)  # llama.cpp divides by these


# ---------------------------------------------------------------------------------------------------------------
# Metadata and tokenizer


def test_hyper_parameters_and_tokenizer_metadata(exported):
    arch, _, model, tokenizer, files = exported
    _, fields = read_gguf(files["f16"])
    config = model.config
    assert fields["general.architecture"] == arch
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert {key: fields[f"{arch}.{key}"] for key in (
        "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
        "attention.head_count_kv", "vocab_size", "rope.dimension_count")} == {
        "context_length": 512, "embedding_length": 64, "block_count": 2, "feed_forward_length": 128,
        "attention.head_count": 4, "attention.head_count_kv": 2, "vocab_size": config.vocab_size,
        "rope.dimension_count": 16}
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(10000.0)
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)

    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == {"qwen2": "deepseek-r1-qwen", "llama": "llama-bpe"}[arch]
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                           tokenizer.pad_token_id)

    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == config.vocab_size
    for index in range(len(tokenizer)):  # every id spelled as the tokenizer spells it
        assert tokens[index] == tokenizer.convert_ids_to_tokens(index)
    kind = {token: types[index] for index, token in enumerate(tokens)}
    assert {kind[t] for t in (BOS, EOS, USER, ASSISTANT)} == {gguf.TokenType.CONTROL}
    assert {kind["<think>"], kind["</think>"]} == {gguf.TokenType.USER_DEFINED}
    assert kind[f"[PAD{len(tokenizer)}]"] == gguf.TokenType.UNUSED  # the embedding's spare rows


def tokenizer_from_gguf(fields: dict):
    """The tokenizer llama.cpp runs on this file, from its metadata only: BPE over the NORMAL tokens and merges,
    the split regex transformers associates with the file's `tokenizer.ggml.pre`, CONTROL and USER_DEFINED tokens
    matched whole, BOS prepended when add_bos is set."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    vocab = {token: index for index, (token, kind) in enumerate(zip(tokens, types, strict=True))
             if kind != gguf.TokenType.UNUSED}
    merges = [tuple(merge.split(" ")) for merge in fields["tokenizer.ggml.merges"]]
    rebuilt = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    rebuilt.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[fields["tokenizer.ggml.pre"]]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    rebuilt.decoder = decoders.ByteLevel()
    rebuilt.add_special_tokens([AddedToken(token, normalized=False, special=kind == gguf.TokenType.CONTROL)
                                for token, kind in zip(tokens, types, strict=True)
                                if kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)])
    if fields["tokenizer.ggml.add_bos_token"]:
        bos_id = fields["tokenizer.ggml.bos_token_id"]
        rebuilt.post_processor = processors.TemplateProcessing(single=f"{tokens[bos_id]} $A",
                                                               special_tokens=[(tokens[bos_id], bos_id)])
    return rebuilt


def test_tokenizer_round_trip(exported):
    from transformers import AutoTokenizer

    _, _, _, tokenizer, files = exported
    path = files["q8_0"]
    _, fields = read_gguf(path)
    from_metadata = tokenizer_from_gguf(fields)
    for text in TEXTS:  # special tokens, Chinese, digits, whitespace: the ids llama.cpp would feed the model
        assert from_metadata.encode(text).ids == tokenizer(text)["input_ids"], text

    # transformers' own GGUF tokenizer: the same ids for plain text (see the module docstring for special tokens)
    loaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS[:3]:
        assert loaded(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)[
            "input_ids"], text


def test_real_r1_tokenizer_metadata(tmp_path):
    """DeepSeek-R1-Distill-Qwen's own tokenizer files, written as a vocabulary-only GGUF. llama.cpp's converter
    identifies this tokenizer by a hash of its output (convert_hf_to_gguf.py, get_vocab_base_pre) as
    "deepseek-r1-qwen"; the export must name it the same and make llama.cpp tokenize as transformers does."""
    if not (R1_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"real R1 tokenizer fixture not found at {R1_TOKENIZER}")
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from qlora_kit.gguf.tokenizer import load_tokenizer

    spec = json.loads((R1_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
    chktxt = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ "
              "(multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 "
              "3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
              "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? "
              "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
    ids = Tokenizer.from_file(str(R1_TOKENIZER / "tokenizer.json")).encode(chktxt).ids
    r1_hash = "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5"  # llama.cpp's, for R1-Distill-Qwen
    assert sha256(str(ids).encode()).hexdigest() == r1_hash
    # the module's copy of llama.cpp's text, through AutoTokenizer as llama.cpp's converter runs it: the fixture
    # is byte-identical to DeepSeek's tokenizer, so it is found by its hash, not by the split-regex fallback
    assert chktxt == CHKTXT and tokenizer_hash(load_tokenizer(R1_TOKENIZER)) == r1_hash
    assert pre_tokenizer_name(load_tokenizer(R1_TOKENIZER), spec) == ("deepseek-r1-qwen", "hash")

    writer = gguf.GGUFWriter(path=None, arch="qwen2")
    write_tokenizer(writer, R1_TOKENIZER, 151936)  # the 1.5B model's embedding rows (151,665 tokens + spare)
    writer.write_header_to_file(tmp_path / "vocab.gguf")
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    _, fields = read_gguf(tmp_path / "vocab.gguf")

    tokenizer = AutoTokenizer.from_pretrained(R1_TOKENIZER)
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"], fields["tokenizer.ggml.add_bos_token"]) == (
        151646, 151643, 151643, True)
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    kind = dict(zip(tokens, types, strict=True))
    assert tokens[151646] == BOS and tokens[151643] == EOS
    # <|fim_prefix|> is not special in tokenizer.json, but llama.cpp's converter makes <|...|> tokens CONTROL
    assert {kind[t] for t in (BOS, EOS, USER, ASSISTANT, "<|fim_prefix|>")} == {gguf.TokenType.CONTROL}
    assert {kind[t] for t in ("<think>", "</think>", "<tool_call>")} == {gguf.TokenType.USER_DEFINED}
    assert tokens[151665] == "[PAD151665]" and kind["[PAD151665]"] == gguf.TokenType.UNUSED

    from_metadata = tokenizer_from_gguf(fields)
    for text in [*TEXTS, f"{BOS}Be brief.{USER}你好<tool_call>x</tool_call><|fim_prefix|>{ASSISTANT}"]:
        assert from_metadata.encode(text).ids == tokenizer(text)["input_ids"], text


# ---------------------------------------------------------------------------------------------------------------
# Modelfile and command line


def test_modelfile_has_r1_template_stops_and_sampling(exported):
    _, _, _, _, files = exported
    text = files["q8_0"].with_suffix(".Modelfile").read_text(encoding="utf-8")
    assert f"FROM ./{files['q8_0'].name}\n" in text  # each export its own Modelfile, named after it
    assert f"FROM ./{files['f16'].name}\n" in files["f16"].with_suffix(".Modelfile").read_text(encoding="utf-8")
    assert f"{USER}{{{{ .Content }}}}" in text and f"{ASSISTANT}{{{{ .Content }}}}" in text
    assert f"{ASSISTANT}<think>\n{{{{ end }}}}" in text  # generation prompt opens the think block
    for stop in (BOS, EOS, USER, ASSISTANT):
        assert f'PARAMETER stop "{stop}"\n' in text
    assert "PARAMETER temperature 0.6\n" in text and "PARAMETER top_p 0.95\n" in text


def test_command_line_writes_beside_the_folder_and_refuses_to_overwrite(build, capsys):
    _, folder, _, _, _ = build("qwen2")
    expected = folder.parent / f"{folder.name}-q8_0.gguf"
    assert main([str(folder), "--type", "q8_0", "--no-modelfile"]) == 0
    assert expected.is_file() and not (folder / expected.name).exists()
    assert main([str(folder), "--type", "q8_0", "--no-modelfile"]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err


def test_refuses_architectures_it_cannot_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}), encoding="utf-8")
    with pytest.raises(UserError, match="cannot export architecture"):
        export_gguf(tmp_path, tmp_path / "out.gguf")


def test_verify_passes_on_the_export_and_fails_on_another_model(build, tmp_path, capsys):
    from qlora_kit.gguf.verify import check_gguf

    arch, folder, model, tokenizer, files = build("qwen2")
    assert main([str(folder), "--type", "f16", "--no-modelfile", "--overwrite", "--out",
                 str(tmp_path / "a.gguf"), "--verify"]) == 0
    printed = capsys.readouterr()
    assert "top-1 agreement" in printed.out.split("verification")[1] and "greedy tokens ranked first" in printed.out
    assert "Converting and de-quantizing" not in printed.out + printed.err  # transformers' GGUF progress bar
    exact = check_gguf(folder, files["f16"], "f16")
    assert exact.passed and exact.top1_agreement >= 0.99 and exact.tensors > 0  # f16 rounding, no more
    assert exact.weight_error <= 1e-3 and not exact.missing
    assert exact.greedy_agreeing == exact.greedy_total > 0 and len(exact.greedy) == exact.prompts

    # One attention weight changed: the check must see it.
    altered = copy.deepcopy(model)
    with torch.no_grad():
        altered.model.layers[0].self_attn.o_proj.weight.mul_(-1)
    other = tmp_path / "altered"
    altered.save_pretrained(other)
    tokenizer.save_pretrained(other)
    wrong = export_gguf(other, tmp_path / "altered.gguf", "f16", log=lambda *_: None).gguf_path
    failed = check_gguf(folder, wrong, "f16")
    assert not failed.passed and "FAIL" in failed.describe()
    assert failed.greedy_agreeing < failed.greedy_total


def test_greedy_tokens_stop_at_n_or_at_the_end_of_turn(build):
    from qlora_kit.gguf.verify import greedy_tokens

    _, _, model, tokenizer, _ = build("qwen2")
    tokens = greedy_tokens(model, tokenizer, "Is 38.5 °C a fever?", 5)
    assert 1 <= len(tokens) <= 5 and (len(tokens) == 5 or tokens[-1] == tokenizer.eos_token_id)
    with torch.no_grad():  # the same ids as argmax over a full forward pass of prompt + continuation
        from qlora_kit.merge.verify import encode_prompt

        ids = encode_prompt(tokenizer, "Is 38.5 °C a fever?")
        full = torch.cat([ids, torch.tensor([tokens[:-1]], dtype=torch.long)], dim=1)
        assert model(full).logits[0, ids.shape[1] - 1:].argmax(-1).tolist() == tokens


def test_no_modelfile_for_a_model_trained_on_a_custom_format(tmp_path):
    from qlora_kit.gguf.modelfile import chat_trained

    said = []
    assert chat_trained(tmp_path, said.append)  # a folder from elsewhere: its chat template
    (tmp_path / "qlora_kit_recipe.toml").write_text('[data]\nformat = "chat"\n', encoding="utf-8")
    assert chat_trained(tmp_path, said.append)
    (tmp_path / "qlora_kit_recipe.toml").write_text('[data]\nformat = "Q: {question}\\nA: {response}"\n',
                                                   encoding="utf-8")
    assert not chat_trained(tmp_path, said.append) and "no Modelfile written" in said[-1]


# ---------------------------------------------------------------------------------------------------------------
# Pre-tokenizer identification (llama.cpp's hash table, and the split-regex fallback)


def saved_tokenizer(tokenizer, folder: Path) -> tuple[object, dict]:
    """(the tokenizer as the exporter loads it from a folder, its tokenizer.json)."""
    from qlora_kit.gguf.tokenizer import load_tokenizer

    tokenizer.save_pretrained(folder)
    return load_tokenizer(folder), json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))


def test_pre_tokenizer_of_retrained_vocabularies_is_named_by_their_split(tmp_path):
    """The demo tokenizer's merges are its own, so llama.cpp's table cannot know its hash; its split regex is
    exactly Qwen2's (Llama 3's for the variant), which llama.cpp runs under the names written."""
    from qlora_kit.gguf.tokenizer import PRE_TOKENIZER_BY_HASH

    for split, expected in ((None, "deepseek-r1-qwen"), (LLAMA3_SPLIT_FOR_TESTS, "llama-bpe")):
        folder = tmp_path / expected
        tokenizer, spec = saved_tokenizer(make_tokenizer(split), folder)
        assert tokenizer_hash(tokenizer) not in PRE_TOKENIZER_BY_HASH
        assert pre_tokenizer_name(tokenizer, spec) == (expected, "split regex")


def test_unknown_pre_tokenizer_is_refused_with_what_is_missing(tmp_path):
    """A split llama.cpp has no name for (digits in pairs) must not be exported under a guessed name."""
    tokenizer, spec = saved_tokenizer(make_tokenizer(LLAMA3_SPLIT_FOR_TESTS.replace(r"\p{N}{1,3}", r"\p{N}{1,2}")),
                                      tmp_path / "pairs")
    with pytest.raises(UserError) as refused:
        pre_tokenizer_name(tokenizer, spec)
    message = str(refused.value)
    assert "tokenizer.ggml.pre" in message and tokenizer_hash(tokenizer) in message and r"\p{N}{1,2}" in message


def test_the_hash_table_is_llama_cpps():
    """Spot checks of the copied table: names of the tokenizers qlora_kit meets, and the converter's semantics
    for a hash listed twice (its chain of `if`s keeps the later name)."""
    from qlora_kit.gguf.tokenizer import LLAMA_CPP_PRE_TOKENIZERS, PRE_TOKENIZER_BY_HASH

    names = {name for _, name in LLAMA_CPP_PRE_TOKENIZERS}
    assert {"llama-bpe", "qwen2", "deepseek-r1-qwen", "smollm", "gpt-4o", "qwen35"} <= names
    assert PRE_TOKENIZER_BY_HASH["855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"] == "smollm"
    assert PRE_TOKENIZER_BY_HASH["b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166"] == "olmo"
    assert all(len(digest) == 64 and int(digest, 16) >= 0 for digest, _ in LLAMA_CPP_PRE_TOKENIZERS)


# ---------------------------------------------------------------------------------------------------------------
# Tied embeddings


def test_tied_embeddings_write_no_output_tensor_and_read_back_equal(tmp_path):
    """tie_word_embeddings: one matrix, as token_embd.weight, no output.weight (llama.cpp then uses token_embd
    for the output, as in files from its own converter); transformers reads the file back tied, same logits."""
    from safetensors.torch import load_file, save_file

    tokenizer = make_tokenizer(LLAMA3_SPLIT_FOR_TESTS)
    model = make_model("llama", tokenizer, tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    folder = tmp_path / "tied"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = export_gguf(folder, tmp_path / "tied.gguf", "f16", log=lambda *_: None).gguf_path
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
    loaded = load_gguf_model(path)
    assert loaded.config.tie_word_embeddings
    _, relative, top1 = compare_logits(model, loaded, tokenizer)
    assert relative < F16_RELATIVE_TOLERANCE and top1 >= 0.99

    # transformers 5 may save a tied pair as lm_head.weight alone: the same file comes out
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] = weights.pop("model.embed_tokens.weight", weights.get("lm_head.weight"))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    again = export_gguf(folder, tmp_path / "again.gguf", "f16", log=lambda *_: None).gguf_path
    embedding = {t.name: t for t in gguf.GGUFReader(again).tensors}["token_embd.weight"].data
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(again).tensors}
    assert abs(embedding.astype("float32") - model.model.embed_tokens.weight.detach().numpy()).max() < 1e-2


def test_tied_or_not_follows_config_json(tmp_path):
    from qlora_kit.gguf.tensors import EMBEDDING, OUTPUT, embedding_sources

    both = {EMBEDDING: tmp_path, OUTPUT: tmp_path, "model.norm.weight": tmp_path}
    assert embedding_sources(both, tied=True) == ({EMBEDDING: tmp_path, "model.norm.weight": tmp_path}, {})
    assert embedding_sources(both, tied=False) == (both, {})  # untied: output.weight written, even if equal
    only_head = {OUTPUT: tmp_path}
    assert embedding_sources(only_head, tied=True) == (only_head, {OUTPUT: "token_embd.weight"})
    with pytest.raises(UserError, match="lack lm_head.weight"):
        embedding_sources({EMBEDDING: tmp_path}, tied=False)  # an untied model without its output layer


# ---------------------------------------------------------------------------------------------------------------
# Modelfile: chat formats, and the Ollama template rendered as Ollama renders it

SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's chat_template.jinja
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_TEMPLATE = (  # Qwen2-Instruct's: a default system message, no BOS
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CONVERSATIONS = (
    [{"role": "user", "content": "Is 38.5 °C a fever?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Is 38.5 °C a fever?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Is 38.5 °C a fever?"}],
)


def chat_tokenizer(template: str, specials: list[str], bos: str, eos: str):
    """The demo BPE with another chat format's special tokens and Jinja template."""
    tokenizer = make_tokenizer(None)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = bos, eos, eos
    tokenizer.chat_template = template
    return tokenizer


def info_for(tokenizer, add_bos: bool):
    from qlora_kit.gguf.tokenizer import TokenizerInfo

    return TokenizerInfo("qwen2", "split regex", {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token},
                         add_bos, frozenset(tokenizer.get_vocab()))


def go_template(template: str, messages: list[dict]) -> str:
    """Render an Ollama TEMPLATE as Ollama does (Go text/template: trim markers, if / else if / else, range with
    variables, eq / ne / and / not / len / slice), with Ollama's values: .System is the system messages joined,
    .Messages every message. Just the subset the Modelfiles use, so that a test can compare with the Jinja text."""
    import re

    pieces, position = [], 0
    for match in re.finditer(r"\{\{(.*?)\}\}", template, flags=re.S):
        pieces += [("text", template[position:match.start()]), ("action", match.group(1))]
        position = match.end()
    pieces.append(("text", template[position:]))
    for index, (kind, body) in enumerate(pieces):  # `{{- ` eats the whitespace before, ` -}}` the whitespace after
        if kind == "action" and body.startswith("- "):
            pieces[index - 1] = ("text", pieces[index - 1][1].rstrip(" \t\r\n"))
        if kind == "action" and body.endswith(" -"):
            pieces[index + 1] = ("text", pieces[index + 1][1].lstrip(" \t\r\n"))
    actions = [(kind, body.strip(" -") if kind == "action" else body) for kind, body in pieces]

    def parse(index: int):
        nodes = []
        while index < len(actions):
            kind, body = actions[index]
            if kind == "text":
                nodes.append(("text", body))
            elif body == "end" or body.startswith("else"):
                return nodes, index
            elif body.startswith("if "):
                branches, orelse = [], []
                condition = body[3:]
                while True:
                    block, index = parse(index + 1)
                    branches.append((condition, block))
                    if actions[index][1].startswith("else if "):
                        condition = actions[index][1][8:]
                        continue
                    if actions[index][1] == "else":
                        orelse, index = parse(index + 1)
                    break
                nodes.append(("if", branches, orelse))
            elif body.startswith("range "):
                names, source = body[6:].split(":=")
                block, index = parse(index + 1)
                nodes.append(("range", [n.strip() for n in names.split(",")], source.strip(), block))
            elif ":=" in body:
                name, expression = body.split(":=")
                nodes.append(("set", name.strip(), expression.strip()))
            else:
                nodes.append(("out", body))
            index += 1
        return nodes, index

    def evaluate(expression: str, dot, scope: dict):
        tokens = re.findall(r'\(|\)|"[^"]*"|[^\s()]+', expression)

        def operand(at: int):
            token = tokens[at]
            if token == "(":
                value, at = command(at + 1)
                return value, at + 1  # past ")"
            if token.startswith('"'):
                return token[1:-1], at + 1
            if token.isdigit():
                return int(token), at + 1
            if token.startswith("$."):
                return scope["$"][token[2:]], at + 1
            if token.startswith("$"):
                return scope[token], at + 1
            return dot[token[1:]], at + 1

        functions = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "and": lambda a, b: a and b,
                     "not": lambda a: not a, "len": len, "slice": lambda a, i: a[i:]}

        def command(at: int):
            if tokens[at] in functions:
                name, arguments, at = tokens[at], [], at + 1
                while at < len(tokens) and tokens[at] != ")":
                    value, at = operand(at)
                    arguments.append(value)
                return functions[name](*arguments), at
            return operand(at)

        return command(0)[0]

    def run(nodes, dot, scope: dict) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "out":
                out.append(str(evaluate(node[1], dot, scope)))
            elif node[0] == "set":
                scope[node[1]] = evaluate(node[2], dot, scope)
            elif node[0] == "if":
                chosen = next((block for condition, block in node[1] if evaluate(condition, dot, scope)), node[2])
                out.append(run(chosen, dot, scope))
            else:
                (index_name, value_name), items = node[1], evaluate(node[2], dot, scope)
                for index, item in enumerate(items):
                    out.append(run(node[3], item, {**scope, index_name: index, value_name: item}))
        return "".join(out)

    root = {"System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"),
            "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    return run(parse(0)[0], root, {"$": root})


LLAMA3_SPLIT_FOR_TESTS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                          r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("template, specials, bos, eos, add_bos, name, default", [
    (SMOLLM2_TEMPLATE, ["<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>", False, "ChatML",
     "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    (CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|endoftext|>", False, "ChatML",
     "You are a helpful assistant."),
    (LLAMA3_TEMPLATE, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
     "<|begin_of_text|>", "<|eot_id|>", True, "Llama 3", None),
], ids=["smollm2", "qwen2-chatml", "llama3"])
def test_modelfile_speaks_the_models_own_chat_format(template, specials, bos, eos, add_bos, name, default):
    """The Ollama TEMPLATE renders every conversation as the Jinja template does (less the BOS llama.cpp adds
    itself where add_bos is set); the generation prompt is the template's own (no forced `<think>`: qlora_kit's
    completions start the think block themselves on non-R1 models); the end-of-turn tokens stop generation."""
    from qlora_kit.gguf.modelfile import chat_format, modelfile_text

    tokenizer = chat_tokenizer(template, specials, bos, eos)
    fmt, reason = chat_format(tokenizer, info_for(tokenizer, add_bos), {})
    assert fmt is not None, reason
    assert fmt.name == name and "<think>" not in fmt.template and "<｜" not in fmt.template
    for conversation in CONVERSATIONS:
        jinja = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        if add_bos:
            jinja = jinja.removeprefix(bos)
        assert go_template(fmt.template, conversation) == jinja
    if default:
        assert default in fmt.template

    # a reply being continued (last message from the assistant) stays open
    prefill = [*CONVERSATIONS[0], {"role": "assistant", "content": "<think>\nA fever is"}]
    assert go_template(fmt.template, prefill).endswith("<think>\nA fever is")

    text = modelfile_text("model-q8_0.gguf", fmt)
    stops = {"ChatML": ["<|im_end|>", "<|im_start|>"], "Llama 3": ["<|eot_id|>", "<|start_header_id|>"]}[name]
    for stop in [*stops, eos]:
        assert f'PARAMETER stop "{stop}"\n' in text
    assert "FROM ./model-q8_0.gguf\n" in text and 'TEMPLATE """' in text


def test_r1_ollama_template_renders_as_the_r1_jinja_template(r1_tokenizer):
    from qlora_kit.gguf.modelfile import chat_format

    fmt, _ = chat_format(r1_tokenizer, info_for(r1_tokenizer, True), {})
    assert fmt.name == "R1" and fmt.parameters == {"temperature": 0.6, "top_p": 0.95}
    for conversation in CONVERSATIONS:
        jinja = r1_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert go_template(fmt.template, conversation) == jinja.removeprefix(r1_tokenizer.bos_token)


def test_no_modelfile_for_an_unknown_chat_format_and_none_that_lacks_its_stop_token(tmp_path):
    from qlora_kit.gguf.modelfile import chat_format, write_modelfile

    alpaca = chat_tokenizer("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
                            "{% if add_generation_prompt %}### assistant:\n{% endif %}", [], None, EOS)
    said = []
    assert write_modelfile(tmp_path / "m.gguf", tmp_path, alpaca, info_for(alpaca, False), said.append) is None
    assert not (tmp_path / "m.Modelfile").exists()
    assert len(said) == 1 and said[0].startswith("no Modelfile written: ") and "R1, ChatML or Llama 3" in said[0]

    # ChatML text, but <|im_end|> is not a token: Ollama could not stop on it
    plain = chat_tokenizer(CHATML_TEMPLATE, [], None, EOS)
    fmt, reason = chat_format(plain, info_for(plain, False), {})
    assert fmt is None and "<|im_end|>" in reason

    # R1's special tokens in the vocabulary, ChatML template: ChatML, never R1's template
    mixed = chat_tokenizer(SMOLLM2_TEMPLATE, ["<|im_start|>", "<|im_end|>"], BOS, EOS)
    fmt, _ = chat_format(mixed, info_for(mixed, True), {})
    assert fmt.name == "ChatML" and USER not in fmt.template


# ---------------------------------------------------------------------------------------------------------------
# A real model: SmolLM2-135M-Instruct (Llama, tied embeddings, ChatML, `smollm` pre-tokenizer)

SMOLLM2_PROMPTS = ("What is the capital of France?", "Explain in one sentence why the sky is blue.")
# Greedy tokens that q8_0 must share with the 16-bit model, counted per prompt up to the first difference.
# Measured: 16 of 24 (8/8 "The capital of France is Paris.<|im_end|>"; 8/16 on the sky, where "a process of
# atmospheric absorption" and "a process called Rayleigh scattering" are a near-tie that q8_0's rounding flips).
# f16 agrees on all 24 (bf16 weights are exact in f16). A little below the measure, so that a near-tie flipped
# earlier by another torch build does not fail the test, while a wrong layout (garbage from token 1) does.
SMOLLM2_Q8_MIN_AGREEING = 14


@pytest.mark.real_model
def test_smollm2_exports_as_llama_cpp_converts_it_and_generates_the_same(smollm2_dir, smollm2_gguf, tmp_path):
    """SmolLM2-135M-Instruct's 16-bit folder (made from its official GGUF, `smollm2_gguf`, which llama.cpp's own
    converter wrote): exported f16 and q8_0, the tokenizer metadata and tensor names are the official file's,
    and both files read back compute and generate what the folder does."""

    from qlora_kit.gguf.verify import check_gguf, reference_outputs

    said = []
    results = {quant: export_gguf(smollm2_dir, tmp_path / f"smollm2-{quant}.gguf", quant, log=said.append)
               for quant in ("f16", "q8_0")}
    assert not [line for line in said if line.startswith("no Modelfile")]

    reader, fields = read_gguf(results["f16"].gguf_path)
    tensors = {t.name for t in reader.tensors}
    assert fields["tokenizer.ggml.pre"] == "smollm" and results["f16"].pre_tokenizer == "smollm"
    assert "output.weight" not in tensors and "token_embd.weight" in tensors and len(tensors) == 272  # tied
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"], fields["tokenizer.ggml.add_bos_token"]) == (1, 2, 2, False)
    official_reader, official = read_gguf(smollm2_gguf)  # llama.cpp's own conversion of the same model
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.chat_template", "tokenizer.ggml.add_bos_token", "llama.vocab_size",
                "llama.rope.dimension_count", "llama.attention.head_count_kv"):
        assert fields[key] == official[key], key
    assert tensors == {t.name for t in official_reader.tensors}

    modelfile = results["q8_0"].modelfile_path.read_text(encoding="utf-8")
    assert "(ChatML chat format)" in modelfile and "<|im_start|>assistant\n{{ end -}}" in modelfile
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in modelfile
    assert 'PARAMETER stop "<|im_end|>"\n' in modelfile and 'PARAMETER stop "<|im_start|>"\n' in modelfile
    assert "<think>" not in modelfile and USER not in modelfile

    # Read back as --verify reads them: the weights, the next-token distributions and the greedy tokens, against the
    # folder, for the same prompts; f16 must agree on every greedy token.
    reference = reference_outputs(smollm2_dir, SMOLLM2_PROMPTS, 16)
    for quant in ("f16", "q8_0"):
        check = check_gguf(smollm2_dir, results[quant].gguf_path, quant, reference=reference)
        print(f"\nSmolLM2 {quant}: {results[quant].size_bytes / 1e6:.1f} MB in {results[quant].seconds:.1f} s, "
              f"{check.describe()}")
        assert check.passed, check.describe()
        assert check.greedy_agreeing >= (check.greedy_total if quant == "f16" else SMOLLM2_Q8_MIN_AGREEING)


# ---------------------------------------------------------------------------------------------------------------
# K-quants and the other block types: quantized here, dequantized by the gguf package's own `dequantize`

# Relative RMS error bounds (of the tensor's RMS) on Gaussian weights, measured 0.071 / 0.036 / 0.0178 with
# llama.cpp's reference quantizers; gguf's own Q4_1 / Q5_1 measure 0.077 / 0.0375 on the same data
K_RMSE_BOUND = {"Q4_K": 0.075, "Q5_K": 0.038, "Q6_K": 0.019}
K_LEVELS = {"Q4_K": 15, "Q5_K": 31, "Q6_K": 63}  # steps across a sub-block's range


def structured_tensor() -> np.ndarray:
    """Rows that trip block quantizers: all zeros, one constant, all positive, a single outlier, tiny values,
    a ramp, mixed magnitudes per sub-block; 256-wide blocks each."""
    rng = np.random.default_rng(1)
    rows = [np.zeros(512), np.full(512, 0.37), np.abs(rng.normal(0, 0.02, 512)) + 0.01,
            np.r_[rng.normal(0, 0.01, 511), 3.0], rng.normal(0, 1e-7, 512), np.linspace(-1, 1, 512),
            rng.normal(0, 1, 512) * np.repeat(10.0 ** rng.uniform(-3, 0, 32), 16), -np.abs(rng.normal(0, 0.5, 512))]
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_dequantize_with_gguf_within_their_bounds(qtype):
    from qlora_kit.gguf.quantize import quantize_k

    kind = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    gaussian = rng.normal(0, 0.02, (64, 1024)).astype(np.float32)
    packed = quantize_k(gaussian, qtype)
    assert packed.shape == gguf.quants.quant_shape_to_byte_shape(gaussian.shape, kind)
    back = gguf.quants.dequantize(packed, kind)
    rmse = float(np.sqrt(np.mean((back - gaussian) ** 2) / np.mean(gaussian ** 2)))
    print(f"\n{qtype}: relative RMS error {rmse:.4f} on N(0, 0.02)")
    assert rmse < K_RMSE_BOUND[qtype]

    # every weight within one level of its 256-block's grid (Q4_K/Q5_K: range with 0 over 15 / 31 levels;
    # Q6_K: symmetric, 2·max|x| over 63), measured at most 0.65 of one; weights below float16's resolution
    # (1e-7 here: d underflows, as in llama.cpp) are off by themselves
    x = structured_tensor()
    back = gguf.quants.dequantize(quantize_k(x, qtype), kind)
    assert np.isfinite(back).all()
    block, err = x.reshape(-1, 256), np.abs(back - x).reshape(-1, 256).max(axis=1)
    spread = 2 * np.abs(block).max(axis=1) if qtype == "Q6_K" else block.max(axis=1) - np.minimum(block.min(axis=1), 0)
    assert (err <= spread / K_LEVELS[qtype] + 1e-6).all()
    assert (back[0] == 0).all()
    assert np.allclose(back[1], 0.37, rtol=0.01)


def test_k_quant_errors_beat_gguf_q4_1_q5_1_and_lower_types_are_not_better():
    """The scale/min search is what makes a K-quant better than the plain min/max blocks of the same bits."""
    from qlora_kit.gguf.quantize import quantize_k

    x = np.random.default_rng(2).standard_t(5, (32, 1024)).astype(np.float32) * 0.02  # heavier tails than normal

    def rmse(back):
        return float(np.sqrt(np.mean((back - x) ** 2)))

    errors = {t: rmse(gguf.quants.dequantize(quantize_k(x, t), gguf.GGMLQuantizationType[t]))
              for t in ("Q4_K", "Q5_K", "Q6_K")}
    for t in ("Q4_1", "Q5_1", "Q8_0"):
        kind = gguf.GGMLQuantizationType[t]
        errors[t] = rmse(gguf.quants.dequantize(gguf.quants.quantize(x, kind), kind))
    assert errors["Q4_K"] < errors["Q4_1"] and errors["Q5_K"] < errors["Q5_1"]
    assert errors["Q8_0"] < errors["Q6_K"] < errors["Q5_K"] < errors["Q4_K"]


def test_block_types_from_gguf_are_its_own_bytes_in_bounded_chunks(monkeypatch):
    """Q4_0 / Q5_0 / Q8_0 (and the Q5_1 fallback) are gguf's numpy quantizers; converted in chunks of rows, the
    bytes are those of one call on the whole tensor."""
    import qlora_kit.gguf.tensors as tensors

    monkeypatch.setattr(tensors, "CHUNK_WEIGHTS", 3 * 96)  # 3 rows per chunk: several chunks and a short last one
    data = torch.from_numpy(np.random.default_rng(3).normal(0, 1, (10, 96)).astype(np.float32)).to(torch.bfloat16)
    for qtype in ("Q4_0", "Q5_0", "Q5_1", "Q8_0", "Q4_K"):
        plan = tensors.TensorPlan("blk.0.attn_q.weight", "x", None, (10, 256 if qtype == "Q4_K" else 96), qtype)
        source = data.repeat(1, 3)[:, :256] if qtype == "Q4_K" else data
        done = []
        encoded = tensors.encode_tensor(plan, source, done.append)
        kind = gguf.GGMLQuantizationType[qtype]
        if qtype == "Q4_K":
            from qlora_kit.gguf.quantize import quantize_k

            whole = quantize_k(source.float().numpy(), qtype)
        else:
            whole = gguf.quants.quantize(source.float().numpy(), kind)
        assert encoded.tobytes() == whole.tobytes()
        assert sum(done) == source.numel() and len(done) > 1
        assert encoded.shape == tensors.stored_bytes(plan)[0]


# ---------------------------------------------------------------------------------------------------------------
# The per-tensor mixture (llama.cpp's llama_tensor_get_type)


def mixture_of(ft_name: str, hidden: int, intermediate: int, layers: int, tied: bool, vocab: int = 1000):
    from qlora_kit.plan.gguf_mixture import FILE_TYPES, tensor_type

    ft = FILE_TYPES[ft_name]
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        shapes["output.weight"] = (vocab, hidden)
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.attn_q.weight": (hidden, hidden),
                   f"blk.{i}.attn_k.weight": (hidden // 4, hidden), f"blk.{i}.attn_v.weight": (hidden // 4, hidden),
                   f"blk.{i}.attn_q.bias": (hidden,), f"blk.{i}.attn_output.weight": (hidden, hidden),
                   f"blk.{i}.ffn_gate.weight": (intermediate, hidden), f"blk.{i}.ffn_up.weight": (intermediate, hidden),
                   f"blk.{i}.ffn_down.weight": (hidden, intermediate)}
    return {name: tensor_type(name, shape, ft, layers, tied) for name, shape in shapes.items()}


def test_q4_k_m_mixture_of_r1_distill_qwen_7b_is_llama_cpps():
    types = mixture_of("q4_k_m", 3584, 18944, 28, tied=False)
    # use_more_bits(i, 28): i < 3, i >= 24, (i - 3) % 3 == 2 -> layers 0-2, 5, 8, ..., 23, 24-27
    more = [i for i in range(28) if i < 3 or i >= 24 or (i - 3) % 3 == 2]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]
    for i in range(28):
        expected = "Q6_K" if i in more else "Q4_K"
        assert (types[f"blk.{i}.attn_v.weight"], types[f"blk.{i}.ffn_down.weight"]) == (expected, expected)
        assert {types[f"blk.{i}.{n}.weight"] for n in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")} == {
            "Q4_K"}
        assert types[f"blk.{i}.attn_norm.weight"] == types[f"blk.{i}.attn_q.bias"] == "F32"
    assert (types["output.weight"], types["token_embd.weight"], types["output_norm.weight"]) == ("Q6_K", "Q4_K", "F32")

    q5 = mixture_of("q5_k_m", 3584, 18944, 28, tied=False)
    assert q5["blk.5.attn_v.weight"] == q5["blk.5.ffn_down.weight"] == q5["output.weight"] == "Q6_K"
    assert q5["blk.6.attn_v.weight"] == q5["blk.6.ffn_down.weight"] == q5["token_embd.weight"] == "Q5_K"
    assert set(mixture_of("q6_k", 3584, 18944, 28, tied=False).values()) == {"Q6_K", "F32"}
    s = mixture_of("q4_k_s", 4096, 14336, 32, tied=False)
    assert [s[f"blk.{i}.attn_v.weight"] for i in (3, 4)] == ["Q5_K", "Q4_K"]
    assert [s[f"blk.{i}.ffn_down.weight"] for i in (3, 4)] == ["Q5_K", "Q4_K"]
    q8 = mixture_of("q8_0", 3584, 18944, 28, tied=False)
    assert q8["output.weight"] == q8["blk.0.attn_v.weight"] == "Q8_0"
    assert mixture_of("q4_0", 3584, 18944, 28, tied=False)["output.weight"] == "Q6_K"  # llama.cpp does that too
    assert set(mixture_of("f16", 3584, 18944, 28, tied=False).values()) == {"F16", "F32"}
    assert set(mixture_of("bf16", 3584, 18944, 28, tied=False).values()) == {"BF16", "F32"}


def test_row_lengths_256_does_not_divide_fall_back_as_in_llama_cpp():
    """SmolLM2-135M: hidden 576 (not a multiple of 256), intermediate 1536 (one), tied embedding."""
    types = mixture_of("q4_k_m", 576, 1536, 30, tied=True)
    assert types["token_embd.weight"] == "Q8_0"   # tied: the output rule, `nx % qk_k != 0 -> Q8_0`
    assert "output.weight" not in types
    assert types["blk.1.attn_q.weight"] == types["blk.1.ffn_up.weight"] == "Q5_0"   # Q4_K -> Q5_0
    assert types["blk.0.attn_v.weight"] == "Q8_0"                                  # Q6_K -> Q8_0
    assert (types["blk.0.ffn_down.weight"], types["blk.4.ffn_down.weight"]) == ("Q6_K", "Q4_K")  # 1536 columns
    assert mixture_of("q5_k_m", 576, 1536, 30, tied=True)["blk.1.attn_q.weight"] == "Q5_1"  # Q5_K -> Q5_1
    assert mixture_of("q6_k", 576, 1536, 30, tied=True)["blk.1.attn_q.weight"] == "Q8_0"    # Q6_K -> Q8_0
    assert mixture_of("q4_k_m", 100, 256, 2, tied=True)["blk.0.attn_q.weight"] == "F16"     # not even 32


def test_type_names_accept_ollama_spellings():
    from qlora_kit.plan.gguf_mixture import file_type

    assert file_type("q4_K_M").ftype == 15 == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert file_type("Q5_K_M").ftype == gguf.LlamaFileType.MOSTLY_Q5_K_M
    assert file_type("Q6_K").ftype == gguf.LlamaFileType.MOSTLY_Q6_K
    assert file_type("q8_0").ftype == gguf.LlamaFileType.MOSTLY_Q8_0
    assert file_type("BF16").ftype == gguf.LlamaFileType.MOSTLY_BF16
    assert file_type("Q3_K_M").ftype == gguf.LlamaFileType.MOSTLY_Q3_K_M
    assert file_type("q2_k") is None


# ---------------------------------------------------------------------------------------------------------------
# K-quant exports of a tiny Llama whose rows are 256 long (so the K types are used, not their fallbacks)


@pytest.fixture(scope="module")
def k_exported(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qlora_kit.gguf.export import main as export_main

    tokenizer = make_tokenizer(GGUF_LLAMA_SPLIT())
    config = LlamaConfig(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path_factory.mktemp("k") / "merged"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    files = {}
    for spelling in ("q4_K_M", "q5_k_m", "Q6_K"):  # Ollama's spellings; the file names are ours
        assert export_main([str(folder), "--type", spelling, "--no-modelfile"]) == 0
        files[spelling.lower()] = folder.parent / f"merged-{spelling.lower()}.gguf"
    return folder, model, tokenizer, files


def GGUF_LLAMA_SPLIT():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    return GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]


# Top-1 agreement with the original, at least. A random tiny model has no margin between its top logits, so
# its agreement is low for any rounding (gguf's own q8_0 of every matrix: 0.97): the strict check is the
# rounding-only comparison below; the real model's agreement is in test_real_model.py and docs/gguf.md
K_AGREEMENT = {"q6_k": 0.8, "q5_k_m": 0.7, "q4_k_m": 0.6}


@pytest.mark.parametrize("ft", ["q4_k_m", "q5_k_m", "q6_k"])
def test_k_quant_exports_read_back_by_transformers(k_exported, ft):
    _, model, tokenizer, files = k_exported
    path = files[ft]
    reader, fields = read_gguf(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert fields["general.file_type"] == {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}[ft]
    # use_more_bits(i, 2): layer 1 only (i >= 7·2/8); layer 0 keeps the default type
    expected = {"q4_k_m": {"blk.1.attn_v.weight": "Q6_K", "blk.1.ffn_down.weight": "Q6_K",
                           "blk.0.attn_v.weight": "Q4_K", "blk.0.attn_q.weight": "Q4_K",
                           "token_embd.weight": "Q4_K", "output.weight": "Q6_K"},
                "q5_k_m": {"blk.1.attn_v.weight": "Q6_K", "blk.0.attn_v.weight": "Q5_K", "output.weight": "Q6_K"},
                "q6_k": {"blk.0.attn_q.weight": "Q6_K", "token_embd.weight": "Q6_K"}}[ft]
    assert {name: types[name] for name in expected} == expected
    assert types["blk.0.attn_norm.weight"] == "F32"

    loaded = load_gguf_model(path)
    worst, relative, top1 = compare_logits(model, loaded, tokenizer)
    print(f"\nllama {ft}: max |logit diff| {worst:.2e} ({relative:.2e} of max |logit|), top-1 agreement {top1:.3f}")
    assert top1 >= K_AGREEMENT[ft]

    # and that error is the quantizers' rounding alone: the original with each matrix rounded through
    # kquants / gguf.quants in the type the file gives it, dequantized by gguf, computes the file's logits
    from qlora_kit.gguf.quantize import QUANTIZERS, quantize_k

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in rounded.named_parameters():
            if parameter.ndim == 2:
                qtype = types[name_map.get_name(name, try_suffixes=(".weight",))]
                data = parameter.numpy()
                packed = quantize_k(data, qtype) if qtype in QUANTIZERS else gguf.quants.quantize(
                    data, gguf.GGMLQuantizationType[qtype])
                parameter.copy_(torch.from_numpy(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[qtype])))
    _, rounding_only, _ = compare_logits(rounded, loaded, tokenizer)
    assert rounding_only < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# The adapter alone (llama.cpp's convert_lora_to_gguf.py format)


def unpermute_for_llama(weights: torch.Tensor, heads: int) -> torch.Tensor:
    head_rows = weights.shape[0] // heads
    return weights.reshape(heads, head_rows // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def test_adapter_gguf_fits_the_base_gguf_and_applied_by_hand_gives_the_merged_logits(k_exported, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from qlora_kit.gguf.export import main as export_main
    from qlora_kit.recipe.loading import recipe_to_toml
    from qlora_kit.recipe.schema import Recipe

    folder, model, tokenizer, _ = k_exported
    base_gguf = tmp_path / "base-f16.gguf"
    assert export_main([str(folder), "--type", "f16", "--out", str(base_gguf), "--no-modelfile"]) == 0
    run = tmp_path / "run"
    recipe = Recipe()
    recipe.model.name, recipe.output.dir = str(folder), str(run)
    torch.manual_seed(1)  # init_lora_weights=False: B is random, so the update shows in the logits
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(run / "adapter")
    tokenizer.save_pretrained(run / "adapter")
    (run / "recipe.toml").write_text(recipe_to_toml(recipe), encoding="utf-8")
    merged = peft_model.merge_and_unload().eval()

    out = tmp_path / "adapter.gguf"
    assert export_main([str(run), "--adapter", "--base", str(base_gguf), "--out", str(out)]) == 0
    assert "LoRA r=8, alpha 16" in capsys.readouterr().out
    reader, fields = read_gguf(out)
    assert (fields["general.type"], fields["adapter.type"], fields["general.architecture"]) == ("adapter", "lora",
                                                                                                 "llama")
    assert fields["adapter.lora.alpha"] == pytest.approx(16.0)
    base = {t.name: t for t in gguf.GGUFReader(base_gguf).tensors}
    lora = {t.name: t for t in reader.tensors}
    targets = {name.rsplit(".", 1)[0] for name in lora}
    assert len(targets) == 2 * 7 and len(lora) == 2 * len(targets)  # every Linear of both layers, A and B
    for target in targets:  # llama.cpp's load checks: A's row length is W's, B has W's rows, one rank
        a, b, w = lora[f"{target}.lora_a"], lora[f"{target}.lora_b"], base[target]
        assert a.shape[0] == w.shape[0] and b.shape[1] == w.shape[1] and a.shape[1] == b.shape[0] == 8

    modelfile = out.with_suffix(".Modelfile").read_text(encoding="utf-8")
    assert "FROM ./base-f16.gguf\nADAPTER ./adapter.gguf\n" in modelfile
    assert 'TEMPLATE """' in modelfile and 'PARAMETER stop "<｜end▁of▁sentence｜>"' in modelfile

    # W + (alpha / r)·B·A on the dequantized base, by hand, computes what the merged model computes
    by_hand = load_gguf_model(base_gguf)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    parameters = dict(by_hand.named_parameters())
    with torch.no_grad():
        for name in list(parameters):
            target = name_map.get_name(name, try_suffixes=(".weight",))
            if target not in targets:
                continue
            a = torch.from_numpy(lora[f"{target}.lora_a"].data.astype(np.float32))
            b = torch.from_numpy(lora[f"{target}.lora_b"].data.astype(np.float32))
            if ".attn_q." in target or ".attn_k." in target:  # stored permuted, as the base's q/k rows are
                b = unpermute_for_llama(b, 4 if ".attn_q." in target else 2)
            parameters[name] += fields["adapter.lora.alpha"] / 8 * (b @ a)
    worst, relative, top1 = compare_logits(merged, by_hand, tokenizer)
    _, without, _ = compare_logits(merged, load_gguf_model(base_gguf), tokenizer)
    print(f"\nadapter by hand vs merged: {relative:.2e} of max |logit|, top-1 {top1:.3f} (base alone: {without:.2e})")
    assert relative < F16_RELATIVE_TOLERANCE and top1 >= 0.97
    assert without > 10 * relative  # the adapter changes the logits: the check above is not vacuous


def test_adapter_export_refuses_a_base_gguf_it_does_not_fit(k_exported, tmp_path, build, capsys):
    from qlora_kit.gguf.adapter import check_against_base

    _, _, _, _, files = build("llama")  # hidden 64: not this adapter's base
    writer = gguf.GGUFWriter(path=None, arch="llama")
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((8, 256), dtype=np.float16))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((256, 8), dtype=np.float16))
    with pytest.raises(UserError, match="does not fit"):
        check_against_base(writer, files["f16"])


def test_sizes_per_type_and_the_card_advice_from_config_json():
    from qlora_kit.plan.gguf_sizes import advice_lines, file_bytes, kv_cache_bytes

    qwen7b = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
              "num_key_value_heads": 4, "vocab_size": 152064, "architectures": ["Qwen2ForCausalLM"]}
    sizes = {t: file_bytes(qwen7b, t) / 1e9 for t in ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16")}
    assert sizes == pytest.approx({"q4_k_m": 4.68, "q5_k_m": 5.44, "q6_k": 6.25, "q8_0": 8.09, "f16": 15.23}, abs=0.01)
    assert kv_cache_bytes(qwen7b, 8192) == 2 * 28 * 8192 * 4 * 128 * 2
    lines = advice_lines(qwen7b, "runs/x/merged")
    line = {row.split()[0]: row for row in lines[1:-2]}  # one line per type, then why: and the command
    assert "a 12 GB card" in line["q8_0"]  # q8_0 does not fit the 8 GB card it trained on
    assert "an 8 GB card" in line["q4_k_m"] and "a 6 GB card" in line["q3_k_m"]
    assert lines[-1].endswith("python tools/export_gguf.py runs/x/merged --type q6_k")


# A line-by-line scalar transcription of ggml-quants.c (float32 scalars, sums left to right as in C), to check
# the vectorised kernels against: quantize_row_q4_K_ref / make_qkx2_quants and quantize_row_q6_K_ref /
# make_qx_quants(rmse_type 1)

def _f32(value) -> np.float32:
    return np.float32(value)


def scalar_make_qkx2(x, w, nmax, rmin, rdelta, nstep):
    n = len(x)
    mn, mx, sum_w, sum_x = x[0], x[0], w[0], w[0] * x[0]
    for i in range(1, n):
        mn, mx = min(mn, x[i]), max(mx, x[i])
        sum_w, sum_x = _f32(sum_w + w[i]), _f32(sum_x + w[i] * x[i])
    mn = min(mn, _f32(0))
    if mx == mn:
        return _f32(0), -mn, [0] * n
    iscale = _f32(nmax / (mx - mn))
    scale = _f32(1 / iscale)
    levels = [int(max(0, min(nmax, np.rint(iscale * (x[i] - mn))))) for i in range(n)]
    best = _f32(0)
    for i in range(n):
        diff = _f32(scale * levels[i] + mn - x[i])
        best = _f32(best + w[i] * diff * diff)
    for step in range(nstep + 1):
        iscale = _f32(_f32(_f32(rmin) + _f32(rdelta) * _f32(step)) + _f32(nmax)) / (mx - mn)
        aux = [int(max(0, min(nmax, np.rint(iscale * (x[i] - mn))))) for i in range(n)]
        sl = sl2 = sxl = _f32(0)
        for i in range(n):
            sl, sl2 = _f32(sl + w[i] * aux[i]), _f32(sl2 + w[i] * aux[i] * aux[i])
            sxl = _f32(sxl + w[i] * aux[i] * x[i])
        det = _f32(sum_w * sl2 - sl * sl)
        if det > 0:
            this_scale, this_min = _f32((sum_w * sxl - sum_x * sl) / det), _f32((sl2 * sum_x - sl * sxl) / det)
            if this_min > 0:
                this_min, this_scale = _f32(0), _f32(sxl / sl2)
            err = _f32(0)
            for i in range(n):
                diff = _f32(this_scale * aux[i] + this_min - x[i])
                err = _f32(err + w[i] * diff * diff)
            if err < best:
                levels, best, scale, mn = aux, err, this_scale, this_min
    return scale, -mn, levels


def scalar_q4_k_block(x):
    scales, mins, levels = [], [], []
    for j in range(8):
        sub = x[32 * j:32 * j + 32]
        sum_x2 = _f32(0)
        for v in sub:
            sum_x2 = _f32(sum_x2 + v * v)
        av_x = _f32(np.sqrt(sum_x2 / 32))
        s, m, lv = scalar_make_qkx2(sub, [_f32(av_x + abs(v)) for v in sub], 15, -1.0, 0.1, 20)
        scales.append(s), mins.append(m), levels.extend(lv)
    max_scale, max_min = max([_f32(0)] + scales), max([_f32(0)] + mins)
    inv_s = _f32(63 / max_scale) if max_scale > 0 else _f32(0)
    inv_m = _f32(63 / max_min) if max_min > 0 else _f32(0)
    ls = [min(63, int(np.rint(inv_s * s))) for s in scales]
    lm = [min(63, int(np.rint(inv_m * m))) for m in mins]
    d, dmin = np.float16(max_scale / 63), np.float16(max_min / 63)
    for j in range(8):
        step = _f32(np.float32(d) * ls[j])
        if step == 0:
            continue
        offset = _f32(np.float32(dmin) * lm[j])
        for k in range(32):
            levels[32 * j + k] = int(max(0, min(15, np.rint(_f32(x[32 * j + k] + offset) / step))))
    sc = [0] * 12
    for j in range(8):
        if j < 4:
            sc[j], sc[j + 4] = ls[j], lm[j]
        else:
            sc[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            sc[j - 4] |= (ls[j] >> 4) << 6
            sc[j] |= (lm[j] >> 4) << 6
    qs = [levels[64 * c + k] | (levels[64 * c + 32 + k] << 4) for c in range(4) for k in range(32)]
    return np.array([d]).view(np.uint8).tolist() + np.array([dmin]).view(np.uint8).tolist() + sc + qs


def test_vectorised_q4_k_is_the_scalar_transcription_of_llama_cpps_reference():
    from qlora_kit.gguf.quantize import quantize_q4_k

    x = np.concatenate([np.random.default_rng(4).normal(0, 0.02, (4, 256)), structured_tensor()[:, :256]]).astype(
        np.float32)
    vectorised = quantize_q4_k(x)
    same = sum(vectorised[b].tolist() == scalar_q4_k_block(list(x[b])) for b in range(len(x)))
    # measured: 12/12 identical. numpy sums in another order than C, so a last-bit difference could move a
    # near-tie on another build: one block is allowed to differ
    assert same >= len(x) - 1, f"{same}/{len(x)} blocks byte-identical"
