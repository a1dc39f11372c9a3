"""GGUF export on real (tiny) Qwen2 and Llama models: written with gguf's GGUFWriter, read back by transformers'
own GGUF loader (which undoes llama.cpp's converter, Llama q/k permutation included) and by gguf's GGUFReader.

What transformers 5.23 cannot check is checked from the file itself: its GGUF tokenizer loader skips control
tokens spelled outside the byte-level alphabet (R1's `<｜...｜>` tokens) and appends a new BOS, so special tokens
are round-tripped through a tokenizer rebuilt from the GGUF metadata alone, the way llama.cpp uses it.
Offline, CPU only.
"""

from __future__ import annotations

import copy
import json
from hashlib import sha256
from pathlib import Path

import pytest
import torch
from conftest import R1_TOKENIZER

from qlora_kit.demo_assets import build_tokenizer, make_rows, row_texts
from qlora_kit.errors import UserError
from qlora_kit.gguf_export import (
    export_gguf,
    hyper_parameters,
    llama3_rope_factors,
    main,
    permute_for_llama,
    pre_tokenizer_name,
    write_tokenizer,
)

gguf = pytest.importorskip("gguf")  # the optional `export` extra; qlora_kit.gguf_export imports it lazily

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


def make_model(arch: str, tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    config = config_class(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.1,
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
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


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

    spec = json.loads((R1_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
    chktxt = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ "
              "(multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 "
              "3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
              "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? "
              "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
    ids = Tokenizer.from_file(str(R1_TOKENIZER / "tokenizer.json")).encode(chktxt).ids
    assert sha256(str(ids).encode()).hexdigest() == "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5"
    assert pre_tokenizer_name(spec) == "deepseek-r1-qwen"

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
    from qlora_kit.gguf_verify import check_gguf

    arch, folder, model, tokenizer, files = build("qwen2")
    assert main([str(folder), "--type", "f16", "--no-modelfile", "--overwrite", "--out",
                 str(tmp_path / "a.gguf"), "--verify"]) == 0
    assert "top-1 agreement" in capsys.readouterr().out.split("verification")[1]
    exact = check_gguf(folder, files["f16"], "f16")
    assert exact.passed and exact.max_abs_diff > 0 and exact.top1_agreement >= 0.99  # f16 rounding, no more

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


def test_no_modelfile_for_a_model_trained_on_a_custom_format(tmp_path):
    from qlora_kit.gguf_export import chat_trained

    said = []
    assert chat_trained(tmp_path, said.append)  # a folder from elsewhere: its chat template
    (tmp_path / "qlora_kit_recipe.toml").write_text('[data]\nformat = "chat"\n', encoding="utf-8")
    assert chat_trained(tmp_path, said.append)
    (tmp_path / "qlora_kit_recipe.toml").write_text('[data]\nformat = "Q: {question}\\nA: {response}"\n',
                                                   encoding="utf-8")
    assert not chat_trained(tmp_path, said.append) and "no Modelfile written" in said[-1]
