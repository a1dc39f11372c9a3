"""The per-tensor type mixture (plan/gguf_mixture.py) against llama.cpp's llama_tensor_get_type.

Two kinds of check:
  * plain: the q3_k_* mixtures of known layouts (R1-Distill-Qwen-7B, R1-Distill-Llama-8B, SmolLM2-135M, a
    70B-classed model), each expected type written out from the C conditions quoted in gguf_mixture.py, and the
    sizes the card advice reads from them.
  * against llama-quantize itself, where a build is given (`LLAMA_QUANTIZE=/path/to/llama-quantize`; skipped
    otherwise): small random models exported by us as f16, quantized by llama-quantize to every file type we
    write, and each tensor's type in its output read back with gguf's GGUFReader and compared to tensor_type().
    The models cover what the rules read: the layer count (use_more_bits, n_layer/8, n_layer/16), rows 256 does
    not divide (576: SmolLM2), rows 32 does not divide, tied embeddings, grouped-query attention >= 4, and
    llama.cpp's 70B class (80 layers). With a `llama-imatrix` beside the binary, q4_0 / q5_0 also with an
    importance matrix (the one rule that reads it).
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest

from qlora_kit.plan.gguf_mixture import FILE_TYPES, is_70b, tensor_bytes, tensor_type

gguf = pytest.importorskip("gguf")  # the optional `export` extra

LLAMA_QUANTIZE = os.environ.get("LLAMA_QUANTIZE", "")  # path of a llama-quantize binary (llama.cpp's build)
LAYER_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def shapes_of(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, tied: bool,
              vocab: int = 1024) -> dict[str, tuple[int, ...]]:
    """GGUF name -> numpy shape, as the export writes a Qwen2 decoder (q/k/v biases) or a Llama one."""
    kv = kv_heads * hidden // heads
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        shapes["output.weight"] = (vocab, hidden)
    for b in range(layers):
        shapes |= {f"blk.{b}.attn_norm.weight": (hidden,), f"blk.{b}.ffn_norm.weight": (hidden,),
                   f"blk.{b}.attn_q.weight": (hidden, hidden), f"blk.{b}.attn_q.bias": (hidden,),
                   f"blk.{b}.attn_k.weight": (kv, hidden), f"blk.{b}.attn_v.weight": (kv, hidden),
                   f"blk.{b}.attn_output.weight": (hidden, hidden), f"blk.{b}.ffn_gate.weight": (intermediate, hidden),
                   f"blk.{b}.ffn_up.weight": (intermediate, hidden), f"blk.{b}.ffn_down.weight": (hidden, intermediate)}
    return shapes


def mixture(ft_name: str, shapes: dict, layers: int, tied: bool, **facts) -> dict[str, str]:
    ft = FILE_TYPES[ft_name]
    return {name: tensor_type(name, shape, ft, layers, tied, **facts) for name, shape in shapes.items()}


def per_layer(types: dict[str, str], layers: int) -> list[tuple[str, ...]]:
    return [tuple(types[f"blk.{b}.{t}.weight"] for t in LAYER_TENSORS) for b in range(layers)]


# ---------------------------------------------------------------------------------------------------------------
# Plain: the q3_k mixtures of known layouts, from the C conditions

#              attn_q  attn_k  attn_v  attn_output ffn_gate ffn_up  ffn_down
Q3M_FIRST = ("Q3_K", "Q3_K", "Q5_K", "Q4_K", "Q3_K", "Q3_K", "Q5_K")  # i_attention_wv < 2, i_layer < n_layer/16
Q3M_SECOND = ("Q3_K", "Q3_K", "Q5_K", "Q4_K", "Q3_K", "Q3_K", "Q4_K")  # i_attention_wv < 2 only
Q3M_REST = ("Q3_K", "Q3_K", "Q4_K", "Q4_K", "Q3_K", "Q3_K", "Q4_K")


def test_q3_k_m_of_r1_distill_qwen_7b():
    """28 layers: n_layer/16 = 1, so only layer 0's ffn_down is Q5_K; attn_v of layers 0 and 1 Q5_K; untied
    token_embd stays Q3_K, output Q6_K."""
    shapes = shapes_of(3584, 18944, 28, 28, 4, tied=False, vocab=152064)
    types = mixture("q3_k_m", shapes, 28, tied=False)
    assert per_layer(types, 28) == [Q3M_FIRST, Q3M_SECOND] + [Q3M_REST] * 26
    assert (types["token_embd.weight"], types["output.weight"]) == ("Q3_K", "Q6_K")
    assert {types[n] for n in shapes if len(shapes[n]) == 1} == {"F32"}


def test_q3_k_m_of_r1_distill_llama_8b():
    """32 layers: n_layer/16 = 2, ffn_down of layers 0 and 1 Q5_K. GQA 4 (32 / 8 heads) changes nothing for the
    q3_k types: llama.cpp's `n_gqa() >= 4` conditions are Q2_K's and the IQ types'."""
    shapes = shapes_of(4096, 14336, 32, 32, 8, tied=False, vocab=128256)
    types = mixture("q3_k_m", shapes, 32, tied=False)
    assert per_layer(types, 32) == [Q3M_FIRST, Q3M_FIRST] + [Q3M_REST] * 30
    assert (types["token_embd.weight"], types["output.weight"]) == ("Q3_K", "Q6_K")


def test_q3_k_s_and_q3_k_l():
    shapes = shapes_of(4096, 14336, 32, 32, 8, tied=False)
    small = mixture("q3_k_s", shapes, 32, tied=False)
    assert set(per_layer(small, 32)) == {("Q3_K",) * 7}  # no rule for Q3_K_S in a dense decoder
    assert (small["token_embd.weight"], small["output.weight"]) == ("Q3_K", "Q6_K")
    large = mixture("q3_k_l", shapes, 32, tied=False)
    # attn_v `Q3_K_L -> Q5_K`, ffn_down `arch == FALCON ? Q4_K : Q5_K`, attn_output `Q3_K_L -> Q5_K`
    assert set(per_layer(large, 32)) == {("Q3_K", "Q3_K", "Q5_K", "Q5_K", "Q3_K", "Q3_K", "Q5_K")}
    assert (large["token_embd.weight"], large["output.weight"]) == ("Q3_K", "Q6_K")


def test_q3_k_m_of_smollm2_falls_back_where_256_does_not_divide_576():
    """hidden 576 (tied), intermediate 1536: rows of 576 fall back (Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1),
    ffn_down's rows of 1536 do not; the tied embedding is the output: `nx % qk_k != 0 -> Q8_0`."""
    shapes = shapes_of(576, 1536, 30, 9, 3, tied=True, vocab=49152)
    types = mixture("q3_k_m", shapes, 30, tied=True)
    assert "output.weight" not in types and types["token_embd.weight"] == "Q8_0"
    first = ("Q4_0", "Q4_0", "Q5_1", "Q5_0", "Q4_0", "Q4_0", "Q5_K")    # 30/16 = 1: layer 0's ffn_down Q5_K
    second = ("Q4_0", "Q4_0", "Q5_1", "Q5_0", "Q4_0", "Q4_0", "Q4_K")
    rest = ("Q4_0", "Q4_0", "Q5_0", "Q5_0", "Q4_0", "Q4_0", "Q4_K")
    assert per_layer(types, 30) == [first, second] + [rest] * 28
    # rows 32 does not divide either: F16, as llama.cpp's `must use F16 due to unusual shape`
    odd = mixture("q3_k_m", shapes_of(80, 256, 2, 5, 5, tied=False), 2, tied=False)
    assert odd["blk.0.attn_q.weight"] == odd["output.weight"] == odd["token_embd.weight"] == "F16"
    assert odd["blk.0.ffn_down.weight"] == "Q4_K"  # rows of 256; 2 // 16 = 0 layers get Q5_K


def test_the_70b_class_lifts_attn_v():
    """`if (qs.model.type == LLM_TYPE_70B) { if (new_type == Q3_K || new_type == Q4_K) new_type = Q5_K; }`"""
    assert is_70b("LlamaForCausalLM", 80, 64, 8) and is_70b("qwen2", 80, 64, 8) and is_70b("Qwen2ForCausalLM", 80, 8, 8)
    assert not is_70b("llama", 80, 64, 64)  # LLM_TYPE_65B: no grouped-query attention
    assert not is_70b("LlamaForCausalLM", 32, 32, 8)
    shapes = shapes_of(8192, 28672, 80, 64, 8, tied=False)
    for ft, lifted in (("q3_k_s", "Q5_K"), ("q3_k_m", "Q5_K"), ("q4_k_m", "Q5_K"), ("q4_k_s", "Q5_K"),
                       ("q5_k_m", "Q5_K"), ("q6_k", "Q6_K"), ("q8_0", "Q8_0")):
        types = mixture(ft, shapes, 80, tied=False, seventy_b=True)
        assert types["blk.40.attn_v.weight"] == lifted, ft  # 40: not a use_more_bits layer of 80
        assert types["blk.40.attn_q.weight"] == mixture(ft, shapes, 80, tied=False)["blk.40.attn_q.weight"]
    assert mixture("q4_k_m", shapes, 80, tied=False, seventy_b=True)["blk.0.attn_v.weight"] == "Q6_K"


def test_the_imatrix_changes_only_q4_0_and_q5_0():
    """`(Q4_0 || Q5_0) && qs.has_imatrix && i_layer < n_layer/8 -> Q4_1 / Q5_1` for ffn_down; no K type reads
    `has_imatrix`."""
    shapes = shapes_of(4096, 14336, 32, 32, 8, tied=False)
    for ft in FILE_TYPES:
        if ft in ("q4_0", "q5_0"):
            continue
        assert mixture(ft, shapes, 32, tied=False, imatrix=True) == mixture(ft, shapes, 32, tied=False), ft
    for ft, first in (("q4_0", "Q4_1"), ("q5_0", "Q5_1")):
        types = mixture(ft, shapes, 32, tied=False, imatrix=True)
        assert [types[f"blk.{b}.ffn_down.weight"] for b in (3, 4)] == [first, ft.upper()]
        assert types["blk.0.attn_v.weight"] == ft.upper()


def test_q3_k_m_bytes_are_its_mixture_not_its_bits():
    """R1-Distill-Qwen-7B: the q3_k_m file is Q3_K only for attn_q/k, ffn_gate/up and token_embd, so it is
    larger than 3.4375 bits x parameters; llama.cpp's own Qwen2.5-7B Q3_K_M file is 3.81 GB."""
    from qlora_kit.plan.gguf_sizes import file_bytes, gguf_shapes

    qwen7b = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
              "num_key_value_heads": 4, "vocab_size": 152064, "architectures": ["Qwen2ForCausalLM"]}
    shapes = gguf_shapes(qwen7b)
    size = file_bytes(qwen7b, "q3_k_m")
    assert size == sum(tensor_bytes(shapes[n], t) for n, t in mixture("q3_k_m", shapes, 28, tied=False).items())
    parameters = sum(math.prod(shape) for shape in shapes.values())
    assert size / 1e9 == pytest.approx(3.81, abs=0.01) and size > 1.1 * parameters * 3.4375 / 8
    assert file_bytes(qwen7b, "q3_k_s") < size < file_bytes(qwen7b, "q3_k_l") < file_bytes(qwen7b, "q4_k_m")


# ---------------------------------------------------------------------------------------------------------------
# Against llama-quantize: random models exported by us as f16, quantized by llama.cpp

needs_llama_quantize = pytest.mark.skipif(not LLAMA_QUANTIZE or not Path(LLAMA_QUANTIZE).is_file(),
                                          reason="set LLAMA_QUANTIZE to a llama-quantize binary to compare with it")

# name -> (architecture, hidden, intermediate, layers, heads, kv heads, tied)
LAYOUTS = {
    "qwen2-28-layers": ("qwen2", 256, 512, 28, 4, 1, False),     # R1-Distill-Qwen's layer count
    "smollm2-shape": ("llama", 576, 1536, 30, 9, 3, True),       # rows of 576, tied embedding
    "llama-gqa4-32-layers": ("llama", 256, 512, 32, 16, 4, False),  # R1-Distill-Llama's layer count, GQA 4
    "llama-70b-class": ("llama", 256, 256, 80, 8, 1, False),     # LLM_TYPE_70B: 80 layers, GQA
    "qwen2-70b-class": ("qwen2", 256, 256, 80, 8, 8, False),
    "rows-not-32": ("qwen2", 80, 256, 3, 5, 1, False),           # 80: `must use F16 due to unusual shape`
}
LLAMA_TYPES = {"q3_k_s": "Q3_K_S", "q3_k_m": "Q3_K_M", "q3_k_l": "Q3_K_L", "q4_k_s": "Q4_K_S", "q4_k_m": "Q4_K_M",
               "q5_k_s": "Q5_K_S", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K", "q8_0": "Q8_0", "q5_0": "Q5_0", "q4_0": "Q4_0"}


def random_folder(folder: Path, layout: tuple) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from qlora_kit.demo.build import build_tokenizer, make_rows, row_texts

    arch, hidden, intermediate, layers, heads, kv_heads, tied = layout
    tokenizer = build_tokenizer(row_texts(make_rows()))
    config = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch](
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def llama_cpp_types(f16: Path, out: Path, llama_type: str, imatrix: Path | None = None) -> dict[str, str]:
    command = [LLAMA_QUANTIZE, *(["--imatrix", str(imatrix)] if imatrix else []), str(f16), str(out), llama_type, "2"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    out.unlink()
    return types


def our_types(f16: Path, ft_name: str, imatrix: bool = False) -> dict[str, str]:
    """tensor_type() for every tensor of our f16 file, with the facts the file itself states."""
    reader = gguf.GGUFReader(f16)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.")}
    arch = fields["general.architecture"]
    layers, heads = fields[f"{arch}.block_count"], fields[f"{arch}.attention.head_count"]
    kv_heads = fields.get(f"{arch}.attention.head_count_kv", heads)
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    return {t.name: tensor_type(t.name, tuple(int(n) for n in reversed(t.shape)), FILE_TYPES[ft_name], layers, tied,
                                imatrix=imatrix, seventy_b=is_70b(arch, layers, heads, kv_heads))
            for t in reader.tensors}


@pytest.fixture(scope="module")
def exported_f16(tmp_path_factory):
    from qlora_kit.gguf.export import export_gguf

    made = {}

    def get(name: str) -> Path:
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            folder = random_folder(root / "merged", LAYOUTS[name])
            made[name] = export_gguf(folder, root / "f16.gguf", "f16", modelfile=False, log=lambda *_: None).gguf_path
        return made[name]

    return get


@needs_llama_quantize
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_tensor_gets_llama_quantizes_type(exported_f16, layout, tmp_path):
    f16 = exported_f16(layout)
    differences = {}
    for ft_name, llama_type in LLAMA_TYPES.items():
        theirs = llama_cpp_types(f16, tmp_path / f"{ft_name}.gguf", llama_type)
        ours = our_types(f16, ft_name)
        assert set(theirs) == set(ours)
        differences |= {(ft_name, name): (ours[name], theirs[name]) for name in ours if ours[name] != theirs[name]}
    assert differences == {}


@needs_llama_quantize
def test_with_an_importance_matrix_too(exported_f16, tmp_path):
    """llama-imatrix (beside llama-quantize) over a few lines of text, then q4_0 / q5_0 / q3_k_m / q4_k_m with it:
    the one rule that reads `has_imatrix` (ffn_down of the first eighth -> Q4_1 / Q5_1) and none other."""
    imatrix_tool = Path(LLAMA_QUANTIZE).with_name("llama-imatrix")
    if not imatrix_tool.is_file():
        pytest.skip("no llama-imatrix beside llama-quantize")
    f16 = exported_f16("llama-gqa4-32-layers")
    text = tmp_path / "calibration.txt"
    text.write_text("A patient has a body temperature of 38.5 degrees. Does the patient have a fever? " * 40)
    matrix = tmp_path / "imatrix.gguf"
    done = subprocess.run([str(imatrix_tool), "-m", str(f16), "-f", str(text), "-o", str(matrix), "-c", "64",
                           "--chunks", "2", "-t", "2", "-ngl", "0"], capture_output=True, text=True)
    assert done.returncode == 0 and matrix.is_file(), done.stdout[-2000:] + done.stderr[-2000:]
    for ft_name in ("q4_0", "q5_0", "q3_k_m", "q4_k_m"):
        theirs = llama_cpp_types(f16, tmp_path / f"{ft_name}.gguf", LLAMA_TYPES[ft_name], imatrix=matrix)
        assert our_types(f16, ft_name, imatrix=True) == theirs, ft_name
    assert theirs != {} and our_types(f16, "q4_0", imatrix=True) != our_types(f16, "q4_0")


# ---------------------------------------------------------------------------------------------------------------
# The card advice below q4_k_m (plan/gguf_sizes.recommended_type)

QWEN_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "architectures": ["Qwen2ForCausalLM"]}
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "architectures": ["LlamaForCausalLM"]}


def test_a_6_gb_card_gets_the_best_type_below_q4_k_m_that_fits():
    from qlora_kit.plan.gguf_sizes import file_bytes, kv_cache_bytes, recommended_type

    # 7B: q4_k_m needs 5.45 GB of the card's 5.37 at 8192 tokens, q4_k_s 5.22 (llama.cpp: +0.27 ppl on Llama-3-8B
    # against q3_k_m's +0.66), so q4_k_s, not q3_k_m
    advice = recommended_type(QWEN_7B, 6)
    assert (advice.type, advice.fits, advice.context) == ("q4_k_s", True, None)
    # 8B: even q3_k_m misses by 16 MB at 8192 tokens (its KV cache is 1.07 GB); whole on the card at 7168
    advice = recommended_type(LLAMA_8B, 6)
    assert (advice.type, advice.fits, advice.context) == ("q3_k_m", False, 7168) and "7168 tokens" in advice.reason
    budget = 6 * 1024**3 - 1024**3 - 0.3e9
    assert file_bytes(LLAMA_8B, "q3_k_m") + kv_cache_bytes(LLAMA_8B, 7168) <= budget
    assert file_bytes(LLAMA_8B, "q3_k_m") + kv_cache_bytes(LLAMA_8B, 8192) > budget
    assert recommended_type(LLAMA_8B, 6, context=4096).type == "q3_k_l"
    # the 8 GB card keeps its answers: the default export (no --type) never needs Q3_K blocks for these models
    assert (recommended_type(QWEN_7B).type, recommended_type(LLAMA_8B).type) == ("q6_k", "q5_k_m")


def test_sizes_read_the_70b_class_and_the_imatrix():
    from qlora_kit.plan.gguf_mixture import use_more_bits
    from qlora_kit.plan.gguf_sizes import file_bytes, gguf_shapes

    llama70 = LLAMA_8B | {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                          "num_attention_heads": 64}
    shapes = gguf_shapes(llama70)
    unlifted = sum(tensor_bytes(shapes[n], t) for n, t in mixture("q4_k_m", shapes, 80, tied=False).items())
    plain = sum(not use_more_bits(i, 80) for i in range(80))  # the layers whose attn_v is Q4_K, lifted to Q5_K
    attn_v = shapes["blk.0.attn_v.weight"]
    assert plain == 40
    lift = tensor_bytes(attn_v, "Q5_K") - tensor_bytes(attn_v, "Q4_K")
    assert file_bytes(llama70, "q4_k_m") - unlifted == plain * lift
    mha = llama70 | {"num_key_value_heads": 64}  # LLM_TYPE_65B: not lifted
    shapes = gguf_shapes(mha)
    assert file_bytes(mha, "q4_k_m") == sum(tensor_bytes(shapes[n], t)
                                            for n, t in mixture("q4_k_m", shapes, 80, tied=False).items())
    q4 = file_bytes(LLAMA_8B, "q4_0")
    blocks = 4 * 4096 * 14336 // 32  # ffn_down of layers 0-3 (32 // 8): a Q4_1 block is 2 bytes more than Q4_0's
    assert file_bytes(LLAMA_8B, "q4_0", imatrix=True) - q4 == blocks * 2
    assert file_bytes(LLAMA_8B, "q4_k_m", imatrix=True) == file_bytes(LLAMA_8B, "q4_k_m")
