"""`python tools/export_gguf.py MERGED_DIR [--type f16|q8_0] [--out FILE] [--overwrite] [--no-modelfile] [--verify]`

Turns a merged model folder (what `tools/merge.py` writes: config.json, safetensors shards, the base's
tokenizer files) into one GGUF file for llama.cpp / Ollama / LM Studio, plus an Ollama `Modelfile` beside it.

    MERGED_DIR ─► config.json ─► hyper-parameters      (Qwen2 and Llama decoders only)
               ─► tokenizer.json, tokenizer_config.json, chat template ─► tokenizer metadata  (gguf_tokenizer)
               ─► safetensors, one tensor at a time ─► llama.cpp names, Llama q/k permuted, f16 or q8_0
               ─► FILE.gguf (written as FILE.gguf.partial, renamed when complete)
               ─► the chat template's format ─► FILE.Modelfile for Ollama                   (gguf_modelfile)

What is written follows llama.cpp's own converter (convert_hf_to_gguf.py) so that llama.cpp reads the file
exactly as it reads one converted there:
  * tensors: `gguf.TensorNameMap` names; 1-D tensors (norms, biases, rope factors) in f32, 2-D weights in
    f16 or q8_0 (`gguf.quants`), falling back to f16 for a row length that is not a multiple of 32.
  * Llama's q_proj/k_proj rows are permuted (`permute_for_llama`): llama.cpp's rope pairs adjacent
    dimensions, transformers' pairs the two halves of each head. Qwen2 is written as is.
  * tied embeddings (config.json `tie_word_embeddings`, SmolLM2): one matrix, written as `token_embd.weight`
    and no `output.weight`; llama.cpp then uses token_embd for the output too, as with its own conversions.
  * vocabulary: every id below config.vocab_size; regular tokens NORMAL, added tokens CONTROL when special
    or shaped like `<|...|>` / `<｜...｜>`, else USER_DEFINED (`<think>`), unused padding rows `[PAD{id}]`.
  * merges, bos/eos/pad ids, add_bos and the chat template: gguf's `SpecialVocab`, the converter's reader.
  * `tokenizer.ggml.pre`: found as llama.cpp's converter finds it, by a hash of the tokenizer's output.

Tensors are read, converted and written one at a time: memory holds the largest tensor (the embedding) and its
conversion temporaries, never the whole model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_kit.errors import EXIT_USER_ERROR, UserError, print_user_error
from qlora_kit.gguf_modelfile import chat_trained, modelfile_path, write_modelfile
from qlora_kit.gguf_tokenizer import load_tokenizer, write_tokenizer

if TYPE_CHECKING:  # gguf and numpy are imported where used: `--help` and the error paths stay instant
    import gguf
    import numpy as np

QUANT_TYPES = ("f16", "q8_0")
F16_MAX = 65504.0
EMBEDDING, OUTPUT = "model.embed_tokens.weight", "lm_head.weight"  # the safetensors keys of both decoders

@dataclass(frozen=True)
class Architecture:
    gguf_name: str        # gguf.MODEL_ARCH member name
    permute_qk: bool      # llama.cpp's converter permutes q/k rows for the Llama family only


ARCHITECTURES = {
    "Qwen2ForCausalLM": Architecture("QWEN2", permute_qk=False),
    "LlamaForCausalLM": Architecture("LLAMA", permute_qk=True),
}


@dataclass(frozen=True)
class HyperParameters:
    context_length: int
    embedding_length: int
    block_count: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    vocab_size: int
    rope_scaling: dict  # rope_type and its settings; {"rope_type": "default"} when unscaled
    tied_embeddings: bool = False  # the output layer is the embedding matrix (SmolLM2, Qwen2.5 <= 3B)


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: where its data comes from and how it is stored."""

    gguf_name: str
    source: str | None        # safetensors key; None for a tensor computed here (Llama 3 rope factors)
    shard: Path | None
    shape: tuple[int, ...]    # numpy order (rows, columns)
    qtype: str                # "F32", "F16" or "Q8_0" (gguf.GGMLQuantizationType member name)
    permute_heads: int = 0    # Llama q/k: the head count to permute rows by; 0 = no permutation


@dataclass
class ExportResult:
    gguf_path: Path
    modelfile_path: Path | None
    pre_tokenizer: str
    tensor_count: int
    size_bytes: int
    seconds: float


# ---------------------------------------------------------------------------------------------------------------
# config.json


def read_config(folder: Path) -> tuple[dict, Architecture]:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} is not a model folder: it has no config.json",
                        hint="Pass the folder that tools/merge.py wrote (config.json, *.safetensors, tokenizer files).")
    config = json.loads(path.read_text(encoding="utf-8"))
    names = config.get("architectures") or []
    supported = [name for name in names if name in ARCHITECTURES]
    if not supported:
        raise UserError(f"cannot export architecture {names or config.get('model_type')!r} to GGUF",
                        [f"supported: {', '.join(ARCHITECTURES)} (DeepSeek-R1-Distill-Qwen and -Llama)"])
    if config.get("quantization_config"):
        raise UserError("the model folder holds quantized weights (config.json has a quantization_config)",
                        hint="Export the 16-bit folder tools/merge.py writes, not a 4-bit checkpoint.")
    return config, ARCHITECTURES[supported[0]]


def rope_settings(config: dict) -> tuple[float, dict]:
    """(rope theta, scaling) from either spelling: transformers 5 nests both in `rope_parameters`, the
    config.json files the R1 checkpoints ship (transformers 4) have `rope_theta` and `rope_scaling`."""
    parameters = dict(config.get("rope_parameters") or {})
    theta = parameters.pop("rope_theta", config.get("rope_theta", 10000.0))
    scaling = {**(config.get("rope_scaling") or {}), **parameters}
    scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    return float(theta), scaling


def hyper_parameters(config: dict) -> HyperParameters:
    heads = config["num_attention_heads"]
    theta, scaling = rope_settings(config)
    return HyperParameters(
        context_length=config["max_position_embeddings"],
        embedding_length=config["hidden_size"],
        block_count=config["num_hidden_layers"],
        feed_forward_length=config["intermediate_size"],
        head_count=heads,
        head_count_kv=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rope_theta=theta,
        rms_norm_eps=config["rms_norm_eps"],
        vocab_size=config["vocab_size"],
        rope_scaling=scaling,
        # absent in older config.json files: LlamaConfig's and Qwen2Config's default is untied
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def write_hyper_parameters(writer: gguf.GGUFWriter, hp: HyperParameters) -> None:
    import gguf

    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.embedding_length)
    writer.add_block_count(hp.block_count)
    writer.add_feed_forward_length(hp.feed_forward_length)
    writer.add_head_count(hp.head_count)
    writer.add_head_count_kv(hp.head_count_kv)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_norm_eps)
    writer.add_vocab_size(hp.vocab_size)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim * hp.head_count != hp.embedding_length:  # llama.cpp assumes hidden / heads unless told
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)

    rope_type = hp.rope_scaling["rope_type"]
    if rope_type in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType[rope_type.upper()])
        writer.add_rope_scaling_factor(hp.rope_scaling["factor"])
        if rope_type == "yarn":
            writer.add_rope_scaling_orig_ctx_len(hp.rope_scaling["original_max_position_embeddings"])
    elif rope_type not in ("default", "llama3"):  # llama3 travels as the rope_freqs tensor instead
        raise UserError(f"rope scaling {rope_type!r} in config.json has no GGUF export here",
                        ["supported: none, llama3, linear, yarn"])


def llama3_rope_factors(hp: HyperParameters) -> np.ndarray:
    """Per-frequency divisors for Llama 3.1's rope scaling, as llama.cpp's converter computes them (llama.cpp
    divides each rope frequency by its factor: 1 for short wavelengths, `factor` for long ones, a blend between)."""
    import numpy as np

    scaling = hp.rope_scaling
    factor = scaling.get("factor", 8.0)
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen, high_freq_wavelen = old_context / low_freq_factor, old_context / high_freq_factor
    frequencies = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float32) / hp.head_dim))
    factors = []
    for frequency in frequencies:
        wavelen = 2 * math.pi / frequency
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Tensors


def weight_files(folder: Path) -> dict[str, Path]:
    """safetensors key -> shard file, from the index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / shard for name, shard in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{folder} has no safetensors weights (model.safetensors or an index)",
                        hint="tools/merge.py writes safetensors shards with an index.")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def tensor_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes from the safetensors headers, without reading any data."""
    from safetensors import safe_open

    shapes = {}
    for shard in sorted(set(files.values())):
        with safe_open(shard, framework="pt") as f:
            names = list(f.keys())
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in names})
    missing = sorted(set(files) - set(shapes))
    if missing:
        raise UserError("the safetensors index lists tensors its shards do not hold", missing[:5])
    return shapes


def storage_type(shape: tuple[int, ...], quant: str) -> str:
    """F32 for 1-D tensors (llama.cpp's kernels for norms and biases want f32), else the requested type;
    q8_0 packs rows in blocks of 32, so a row length that is not a multiple of 32 stays f16 (as in llama.cpp)."""
    if len(shape) == 1:
        return "F32"
    if quant == "q8_0" and shape[-1] % 32 == 0:
        return "Q8_0"
    return "F16"


def embedding_sources(files: dict[str, Path], tied: bool) -> tuple[dict[str, Path], dict[str, str]]:
    """(the safetensors tensors to write, {key: GGUF name} where a key is written under another tensor's name).

    Tied (config.json `tie_word_embeddings`): the output layer *is* the embedding, so one matrix is written, as
    token_embd.weight, and no output.weight; llama.cpp then computes the output with token_embd, exactly as for
    the files its own converter writes. transformers saves a tied pair under either key (5.x may keep only
    lm_head.weight), so whichever is there is used; an lm_head.weight saved beside the embedding is dropped, as
    transformers' loader ignores it for a tied model. Untied: both matrices are needed and written."""
    import gguf

    token_embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    files = dict(files)
    present = [key for key in (EMBEDDING, OUTPUT) if key in files]
    if tied and EMBEDDING in files:
        files.pop(OUTPUT, None)
        return files, {}
    if tied and OUTPUT in files:
        return files, {OUTPUT: token_embd}
    if not tied and len(present) == 2:
        return files, {}
    raise UserError(f"the weights lack {' and '.join(k for k in (EMBEDDING, OUTPUT) if k not in files)}",
                    [f"config.json tie_word_embeddings = {str(tied).lower()}: "
                     + ("one of the two is needed" if tied else "both the embedding and lm_head are needed")],
                    hint="The folder is incomplete, or its config.json does not belong to its weights.")


def plan_tensors(files: dict[str, Path], arch: Architecture, hp: HyperParameters, quant: str) -> list[TensorPlan]:
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_name], hp.block_count)
    files, renamed = embedding_sources(files, hp.tied_embeddings)
    shapes = tensor_shapes(files)
    plans, unknown = [], []
    for source in sorted(files, key=natural_key):
        if source.endswith("rotary_emb.inv_freq"):  # recomputed by every runtime; llama.cpp's converter drops it
            continue
        gguf_name = renamed.get(source) or name_map.get_name(source, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            unknown.append(source)
            continue
        heads = 0
        if arch.permute_qk and gguf_name.startswith("blk.") and ".attn_q." in gguf_name:
            heads = hp.head_count
        elif arch.permute_qk and gguf_name.startswith("blk.") and ".attn_k." in gguf_name:
            heads = hp.head_count_kv
        shape = shapes[source]
        plans.append(TensorPlan(gguf_name, source, files[source], shape, storage_type(shape, quant), heads))
    if unknown:
        raise UserError(f"{len(unknown)} tensor(s) have no GGUF name for this architecture", unknown[:5],
                        hint="The folder holds more than a plain decoder (an adapter, a value head?).")
    if hp.rope_scaling["rope_type"] == "llama3":
        plans.append(TensorPlan(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS], None, None, (hp.head_dim // 2,),
                                "F32"))
    return plans


def natural_key(name: str) -> list:
    """layers.2 before layers.10: llama.cpp does not care, but people reading `gguf-dump` do."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def permute_for_llama(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's `LlamaModel.permute`: within each head, rows [first half | second half] become
    interleaved pairs, because llama.cpp rotates adjacent dimensions where transformers rotates halves."""
    head_rows = weights.shape[0] // heads
    return (weights.reshape(heads, 2, head_rows // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def stored_bytes(plan: TensorPlan) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, numpy dtype, byte count) of the tensor as written: GGUFWriter needs them before any data."""
    import gguf
    import numpy as np

    if plan.qtype == "Q8_0":
        shape = gguf.quants.quant_shape_to_byte_shape(plan.shape, gguf.GGMLQuantizationType.Q8_0)
        return shape, np.dtype(np.uint8), math.prod(shape)
    dtype = np.dtype(np.float32 if plan.qtype == "F32" else np.float16)
    return plan.shape, dtype, math.prod(plan.shape) * dtype.itemsize


def load_tensor(plan: TensorPlan, hp: HyperParameters) -> np.ndarray:
    """The tensor in float32 (bf16 has no numpy type), permuted where llama.cpp expects it."""
    if plan.source is None:
        return llama3_rope_factors(hp)
    from safetensors import safe_open

    with safe_open(plan.shard, framework="pt") as f:
        data = f.get_tensor(plan.source).float().numpy()
    return permute_for_llama(data, plan.permute_heads) if plan.permute_heads else data


def encode_tensor(plan: TensorPlan, data: np.ndarray) -> np.ndarray:
    import gguf
    import numpy as np

    if plan.qtype == "F32":
        return data.astype(np.float32)
    if plan.qtype == "F16":
        largest = float(np.abs(data).max()) if data.size else 0.0
        if largest > F16_MAX:  # a cast would store inf: fail loudly rather than write a broken model
            raise UserError(f"{plan.source} has values up to {largest:.3g}, beyond float16's range",
                            hint="Export with --type q8_0 (its per-block scales cover this range).")
        return data.astype(np.float16)
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ModuleNotFoundError:
        raise UserError("GGUF export needs the `gguf` package (llama.cpp's own Python writer)",
                        hint="pip install 'qlora_kit[export]'   (or: pip install gguf)") from None


def export_gguf(folder: Path, out: Path, quant: str = "f16", overwrite: bool = False,
                modelfile: bool = True, log: Callable[[str], object] = print) -> ExportResult:
    """Write `out` (and a Modelfile beside it) from the merged model in `folder`."""
    require_gguf()
    import gguf

    started = time.monotonic()
    folder, out = Path(folder), Path(out)
    if quant not in QUANT_TYPES:
        raise UserError(f"unknown --type {quant!r}", [f"choose one of: {', '.join(QUANT_TYPES)}"])
    for existing in (out, modelfile_path(out)) if modelfile else (out,):
        if existing.exists() and not overwrite:
            raise UserError(f"{existing} already exists",
                            hint="Pass --overwrite to replace it, or choose another --out.")
    config, arch = read_config(folder)
    hp = hyper_parameters(config)
    plans = plan_tensors(weight_files(folder), arch, hp, quant)

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_name]])
    writer.add_name(folder.resolve().name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hyper_parameters(writer, hp)
    hf_tokenizer = load_tokenizer(folder)
    tokenizer = write_tokenizer(writer, folder, hp.vocab_size, hf_tokenizer)
    for plan in plans:
        shape, dtype, nbytes = stored_bytes(plan)
        writer.add_tensor_info(plan.gguf_name, shape, dtype, nbytes,
                               raw_dtype=gguf.GGMLQuantizationType[plan.qtype])

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")  # a crash leaves no file that looks complete
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for number, plan in enumerate(plans, 1):
            writer.write_tensor_data(encode_tensor(plan, load_tensor(plan, hp)))
            if number % 50 == 0 or number == len(plans):
                log(f"  {number}/{len(plans)} tensors written")
        writer.close()
        os.replace(partial, out)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)

    written_modelfile = None
    if modelfile and chat_trained(folder, log):
        written_modelfile = write_modelfile(out, folder, hf_tokenizer, tokenizer, log)
    return ExportResult(out, written_modelfile, tokenizer.pre_tokenizer, len(plans), out.stat().st_size,
                        time.monotonic() - started)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tools/export_gguf.py",
        description="Export a merged Qwen2/Llama model folder to GGUF (llama.cpp, Ollama) with an Ollama Modelfile.",
        epilog="examples:\n  python tools/export_gguf.py runs/medical/merged\n"
               "  python tools/export_gguf.py runs/medical/merged --type q8_0 --out medical-q8_0.gguf",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("merged_dir", help="folder written by tools/merge.py (config.json, safetensors, tokenizer)")
    parser.add_argument("--type", choices=QUANT_TYPES, default="f16",
                        help="weight storage: f16 (exact up to rounding) or q8_0 (half the size)")
    parser.add_argument("--out", help="output .gguf file (default: beside MERGED_DIR, named <its name>-<type>.gguf)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--no-modelfile", action="store_true", help="do not write the Ollama Modelfile")
    parser.add_argument("--verify", action="store_true",
                        help="read the file back with transformers and compare logits with MERGED_DIR on sample "
                             "prompts (float32: needs 4 bytes of RAM per parameter); exit 1 past the tolerance")
    return parser.parse_args(argv)


def default_output(folder: Path, quant: str) -> Path:
    """Beside the merged folder, not in it: that folder stays a plain transformers checkpoint."""
    folder = folder.resolve()
    return folder.parent / f"{folder.name}-{quant}.gguf"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(args.merged_dir)
    out = Path(args.out) if args.out else default_output(folder, args.type)
    try:
        result = export_gguf(folder, out, args.type, args.overwrite, modelfile=not args.no_modelfile)
    except UserError as error:
        print_user_error(error)
        return getattr(error, "exit_code", EXIT_USER_ERROR)
    print(f"wrote {result.gguf_path} ({result.size_bytes / 1e6:.1f} MB, {result.tensor_count} tensors, "
          f"{args.type}, pre-tokenizer {result.pre_tokenizer}) in {result.seconds:.1f} s")
    if result.modelfile_path:
        print(f"wrote {result.modelfile_path}: ollama create NAME -f {result.modelfile_path}")
    if args.verify:
        from qlora_kit.gguf_verify import verify_export

        return verify_export(folder, result.gguf_path, args.type)
    return 0


if __name__ == "__main__":
    sys.exit(main())
