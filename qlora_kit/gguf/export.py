"""`python tools/export_gguf.py MERGED_DIR [--type f16|q8_0] [--out FILE] [--overwrite] [--no-modelfile] [--verify]`

Turns a merged model folder (what `tools/merge.py` writes: config.json, safetensors shards, the base's
tokenizer files) into one GGUF file for llama.cpp / Ollama / LM Studio, plus an Ollama `Modelfile` beside it.

    MERGED_DIR ─► config.json ─► hyper-parameters      (Qwen2 and Llama decoders only)
               ─► tokenizer.json, tokenizer_config.json, chat template ─► tokenizer metadata  (gguf_tokenizer)
               ─► safetensors, one tensor at a time ─► llama.cpp names and layouts, f16 or q8_0 (gguf_tensors)
               ─► FILE.gguf (written as FILE.gguf.partial, renamed when complete)
               ─► the chat template's format ─► FILE.Modelfile for Ollama                   (gguf_modelfile)
               ─► --verify: the file read back by transformers, compared with MERGED_DIR    (gguf_verify)

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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_kit.errors import EXIT_USER_ERROR, UserError, print_user_error
from qlora_kit.gguf_modelfile import chat_trained, modelfile_path, write_modelfile
from qlora_kit.gguf_tensors import encode_tensor, load_tensor, plan_tensors, stored_bytes, weight_files
from qlora_kit.gguf_tokenizer import load_tokenizer, write_tokenizer

if TYPE_CHECKING:  # gguf is imported where used: `--help` and the error paths stay instant
    import gguf

QUANT_TYPES = ("f16", "q8_0")


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


@dataclass
class ExportResult:
    gguf_path: Path
    modelfile_path: Path | None
    pre_tokenizer: str
    tensor_count: int
    size_bytes: int
    seconds: float
    pre_tokenizer_source: str = ""  # "hash" (llama.cpp's table) or "split regex" (a retrained vocabulary)


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
    if modelfile and written_modelfile is None:  # an earlier export's Modelfile would not fit this file (--overwrite)
        modelfile_path(out).unlink(missing_ok=True)
    return ExportResult(out, written_modelfile, tokenizer.pre_tokenizer, len(plans), out.stat().st_size,
                        time.monotonic() - started, tokenizer.identified_by)


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
    print(f"wrote {result.gguf_path} ({result.size_bytes / 1e6:.1f} MB, {result.tensor_count} tensors, {args.type}, "
          f"pre-tokenizer {result.pre_tokenizer} by {result.pre_tokenizer_source}) in {result.seconds:.1f} s")
    if result.modelfile_path:
        print(f"wrote {result.modelfile_path}: ollama create NAME -f {result.modelfile_path}")
    if args.verify:
        from qlora_kit.gguf_verify import verify_export

        return verify_export(folder, result.gguf_path, args.type)
    return 0


if __name__ == "__main__":
    sys.exit(main())
