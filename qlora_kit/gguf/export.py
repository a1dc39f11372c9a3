"""`python tools/export_gguf.py MERGED_DIR [--type q8_0|q6_k|q5_k_m|q4_k_m|q5_0|q4_0|f16|bf16] [--out FILE]
[--imatrix auto|FILE] [--imatrix-tokens N] [--overwrite] [--no-modelfile] [--verify]`
·   `python tools/export_gguf.py RUN_DIR --adapter --base BASE.gguf`

Turns a merged model folder (what `tools/merge.py` writes: config.json, safetensors shards, the base's
tokenizer files) into one GGUF file for llama.cpp / Ollama / LM Studio, plus an Ollama `Modelfile` beside it.

    MERGED_DIR ─► config.json ─► hyper-parameters      (Qwen2 and Llama decoders only)        (model_config)
               ─► tokenizer.json, tokenizer_config.json, chat template ─► tokenizer metadata  (tokenizer)
               ─► safetensors, one tensor at a time ─► llama.cpp names and layouts              (tensors)
                  ─► the storage type llama-quantize would choose for it                        (mixture)
                  ─► K-quant blocks (Q4_K, Q5_K, Q6_K) in numpy                                  (kquants)
                     weighted by the importance matrix with --imatrix (the run's own rows)       (imatrix)
               ─► FILE.gguf (written as FILE.gguf.partial, renamed when complete)
               ─► --imatrix computed: FILE.imatrix beside it, llama.cpp's format (`llama-quantize --imatrix`)
               ─► the chat template's format ─► FILE.Modelfile for Ollama                   (modelfile)
               ─► --verify: the file read back by transformers, compared with MERGED_DIR    (verify)

What is written follows llama.cpp's own converter (convert_hf_to_gguf.py) so that llama.cpp reads the file
exactly as it reads one converted there:
  * tensors: `gguf.TensorNameMap` names; 1-D tensors (norms, biases, rope factors) in f32, 2-D weights in the
    type llama.cpp's llama-quantize gives them for the requested file type (mixture.py: a q4_k_m file has Q6_K
    output and half its attn_v / ffn_down in Q6_K; row lengths no 256-block divides fall back as there).
  * the adapter alone (--adapter): adapter.py, llama.cpp's convert_lora_to_gguf.py format.
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
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_kit.errors import EXIT_USER_ERROR, UserError, print_user_error
from qlora_kit.gguf.dependency import require_gguf
from qlora_kit.gguf.imatrix import (
    DEFAULT_TOKENS,
    Imatrix,
    check_fits,
    imatrix_for_export,
    quantize_metadata,
    save_imatrix,
)
from qlora_kit.gguf.imatrix import describe as describe_imatrix
from qlora_kit.gguf.model_config import (
    HyperParameters,
    hyper_parameters,
    read_config,
)
from qlora_kit.gguf.modelfile import chat_trained, modelfile_path, write_modelfile
from qlora_kit.gguf.tensors import encode_tensor, load_tensor, plan_tensors, stored_bytes, weight_files
from qlora_kit.gguf.tokenizer import load_tokenizer, write_tokenizer
from qlora_kit.plan.gguf_mixture import FILE_TYPES, FileType, file_type

if TYPE_CHECKING:  # gguf is imported where used: `--help` and the error paths stay instant
    import gguf


@dataclass
class ExportResult:
    gguf_path: Path
    modelfile_path: Path | None
    pre_tokenizer: str
    tensor_count: int
    size_bytes: int
    seconds: float
    pre_tokenizer_source: str = ""  # "hash" (llama.cpp's table) or "split regex" (a retrained vocabulary)
    types: dict[str, int] = field(default_factory=dict)  # storage type -> tensor count
    imatrix_path: Path | None = None  # the importance matrix computed for this file and saved beside it
    imatrix: Imatrix | None = None    # the one the quantizers were given (computed or read)
    weighted_tensors: int = 0         # tensors quantized with it


# ---------------------------------------------------------------------------------------------------------------
# Hyper-parameters into the header (model_config.py reads them from config.json)


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


def resolve_type(quant: str | FileType) -> FileType:
    ft = quant if isinstance(quant, FileType) else file_type(quant)
    if ft is None:
        raise UserError(f"unknown --type {quant!r}", [f"choose one of: {', '.join(FILE_TYPES)} "
                                                      "(Ollama's spellings such as q4_K_M work too)"])
    return ft


def imatrix_path_for(out: Path) -> Path:
    """Where a computed importance matrix is saved: beside the .gguf, named after it."""
    return out.with_suffix(".imatrix")


def export_gguf(folder: Path, out: Path, quant: str = "f16", overwrite: bool = False,
                modelfile: bool = True, log: Callable[[str], object] = print, progress: bool = False,
                imatrix: Imatrix | str | Path | None = None, imatrix_tokens: int = DEFAULT_TOKENS) -> ExportResult:
    """Write `out` (and a Modelfile beside it) from the merged model in `folder`. `progress`: a progress bar with
    an ETA on stderr (weights done / all weights, and the imatrix's tokens). `imatrix`: "auto" (the run's training
    rows), a file (an imatrix, or rows / text to compute one from, at most `imatrix_tokens` tokens), or an
    `Imatrix`; a computed one is saved as FILE.imatrix beside `out`."""
    require_gguf()
    import gguf

    started = time.monotonic()
    folder, out = Path(folder), Path(out)
    ft = resolve_type(quant)
    computes = imatrix is not None and not isinstance(imatrix, Imatrix) and not imatrix_file_given(imatrix)
    outputs = [out, *([modelfile_path(out)] if modelfile else []), *([imatrix_path_for(out)] if computes else [])]
    for existing in outputs:
        if existing.exists() and not overwrite:
            raise UserError(f"{existing} already exists",
                            hint="Pass --overwrite to replace it, or choose another --out.")
    config, arch = read_config(folder)
    hp = hyper_parameters(config)
    plans = plan_tensors(weight_files(folder), arch, hp, ft, imatrix=imatrix is not None)
    saved_imatrix = None
    if imatrix is not None and not isinstance(imatrix, Imatrix):
        imatrix = imatrix_for_export(folder, imatrix, imatrix_tokens, progress, log)
        if computes:
            saved_imatrix = save_imatrix(imatrix, imatrix_path_for(out))
            imatrix.path = str(saved_imatrix)
    if imatrix is not None:
        check_fits(imatrix, {p.gguf_name: p.shape[-1] for p in plans if len(p.shape) == 2})
    weighted = {p.gguf_name for p in plans
                if imatrix is not None and p.qtype in QUANTIZED and p.gguf_name in imatrix.sums}

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_name]])
    writer.add_name(folder.resolve().name)
    writer.add_file_type(ft.ftype)  # general.file_type: llama.h's LLAMA_FTYPE_MOSTLY_*, as llama-quantize sets it
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hyper_parameters(writer, hp)
    if weighted:  # what llama-quantize records of the imatrix it quantized with
        # the file's name only: llama-quantize writes the path it was given, which would tell others this
        # machine's folders
        for key, value in quantize_metadata(imatrix, Path(imatrix.path).name if imatrix.path else "").items():
            (writer.add_string if isinstance(value, str) else writer.add_uint32)(key, value)
    hf_tokenizer = load_tokenizer(folder)
    tokenizer = write_tokenizer(writer, folder, hp.vocab_size, hf_tokenizer)
    for plan in plans:
        shape, dtype, nbytes = stored_bytes(plan)
        writer.add_tensor_info(plan.gguf_name, shape, dtype, nbytes,
                               raw_dtype=gguf.GGMLQuantizationType[plan.qtype])

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")  # a crash leaves no file that looks complete
    bar = progress_bar(sum(math.prod(plan.shape) for plan in plans), ft.name, progress)
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for number, plan in enumerate(plans, 1):
            # by keyword, only where there is one: the tensors llama-quantize finds no entry for get none either
            weights = {"importance": imatrix.importance(plan.gguf_name)} if plan.gguf_name in weighted else {}
            writer.write_tensor_data(encode_tensor(plan, load_tensor(plan, hp), bar.update, **weights))
            if not progress and (number % 50 == 0 or number == len(plans)):
                log(f"  {number}/{len(plans)} tensors written")
        writer.close()
        os.replace(partial, out)
    finally:
        bar.close()
        writer.close()
        partial.unlink(missing_ok=True)

    written_modelfile = None
    if modelfile and chat_trained(folder, log):
        written_modelfile = write_modelfile(out, folder, hf_tokenizer, tokenizer, log)
    if modelfile and written_modelfile is None:  # an earlier export's Modelfile would not fit this file (--overwrite)
        modelfile_path(out).unlink(missing_ok=True)
    return ExportResult(out, written_modelfile, tokenizer.pre_tokenizer, len(plans), out.stat().st_size,
                        time.monotonic() - started, tokenizer.identified_by, type_counts(plans), saved_imatrix,
                        imatrix, len(weighted))


QUANTIZED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
"""Storage types whose rounding an importance matrix steers (the float types store the weights as they are)."""


def imatrix_file_given(spec) -> bool:
    """--imatrix FILE names an imatrix file (used as it is), not rows or text to compute one from."""
    from qlora_kit.gguf.imatrix import is_imatrix_file

    return str(spec) != "auto" and Path(spec).is_file() and is_imatrix_file(Path(spec))




def type_counts(plans) -> dict[str, int]:
    """{storage type: tensor count}: what the mixture chose (Q4_K 150, Q6_K 31, F32 121 ...)."""
    counts: dict[str, int] = {}
    for plan in plans:
        counts[plan.qtype] = counts.get(plan.qtype, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def progress_bar(total: int, label: str, enabled: bool):
    """tqdm over weights (millions), with its rate and ETA; a silent stand-in when disabled."""
    from tqdm import tqdm

    return tqdm(total=total, unit=" weights", unit_scale=True, desc=f"GGUF {label}", disable=not enabled,
                dynamic_ncols=True, leave=False)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from qlora_kit.cli import command_name

    parser = argparse.ArgumentParser(
        prog=command_name("python tools/export_gguf.py" if Path(sys.argv[0]).name == "export_gguf.py"
                          else "python -m qlora_kit.gguf"),
        description="Export a merged Qwen2/Llama model folder to GGUF (llama.cpp, Ollama) with an Ollama Modelfile.",
        epilog="examples:\n  python tools/export_gguf.py runs/medical/merged\n"
               "  python tools/export_gguf.py runs/medical/merged --type q8_0 --out medical-q8_0.gguf",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("merged_dir", help="folder written by tools/merge.py (config.json, safetensors, tokenizer); "
                                           "with --adapter, the run directory")
    parser.add_argument("--type", metavar="TYPE",
                        help=f"file type: {', '.join(FILE_TYPES)} (Ollama's spellings work too: q4_K_M). "
                             "Default: the type advised for this model on an 8 GB card (the merge's last lines "
                             "give the same advice): q8_0 wherever it fits (a 135M, a 1.5B: as good as f16 in use "
                             "at half its size), else the best K type that fits (q6_k for a 7B). q4_k_m: "
                             "llama.cpp's mixture of Q4_K with Q6_K for the output and half the attn_v / ffn_down; "
                             "f16 / bf16: exact up to rounding, for re-quantizing")
    parser.add_argument("--adapter", action="store_true",
                        help="MERGED_DIR is a run directory: write only its LoRA adapter, in llama.cpp's adapter "
                             "GGUF format (f16 A/B matrices), plus a Modelfile with FROM <--base gguf> and ADAPTER")
    parser.add_argument("--base", help="with --adapter: the base model's GGUF file the Modelfile names in FROM")
    parser.add_argument("--out", help="output .gguf file (default: beside MERGED_DIR, named <its name>-<type>.gguf)")
    parser.add_argument("--imatrix", metavar="auto|FILE",
                        help="quantize with an importance matrix, as llama-quantize --imatrix does: the rounding "
                             "error of each weight is weighted by how much its input column is used. auto: "
                             "computed through this model from the run's own training rows (the merge keeps the "
                             "run's recipe beside the weights; held-out rows are not used) and saved beside the "
                             ".gguf as <name>.imatrix, which llama-quantize --imatrix reads too. FILE: an imatrix "
                             "file (llama-imatrix's .gguf / .imatrix / .dat, used as it is), or rows "
                             "(.jsonl/.json/.csv/.parquet, rendered as in training) or UTF-8 text to compute it from")
    parser.add_argument("--imatrix-tokens", type=positive_int, default=DEFAULT_TOKENS, metavar="N",
                        help=f"tokens of calibration text run through the model for --imatrix (default "
                             f"{DEFAULT_TOKENS}: {DEFAULT_TOKENS // 512} chunks of 512, as llama-imatrix cuts them)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--no-modelfile", action="store_true", help="do not write the Ollama Modelfile")
    parser.add_argument("--verify", action="store_true",
                        help="read the file back with transformers and set it against MERGED_DIR: every tensor's "
                             "error, the next-token distributions and the merged model's own greedy tokens on "
                             "sample prompts, each within a bound per type (docs/gguf.md); exit 1 past any "
                             "(float32: needs 4 bytes of RAM per parameter)")
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def default_output(folder: Path, quant: str) -> Path:
    """Beside the merged folder, not in it: that folder stays a plain transformers checkpoint."""
    folder = folder.resolve()
    return folder.parent / f"{folder.name}-{quant}.gguf"


def advised_type(folder: Path) -> FileType:
    """No --type: the advice (plan/gguf_sizes.recommended_type) for this folder's config.json, said aloud."""
    from qlora_kit.plan.gguf_sizes import recommended_type

    config, _ = read_config(folder)
    advice = recommended_type(config)
    print(f"--type not given: {advice.type}, the advice for this model on {'an' if advice.card_gib == 8 else 'a'} "
          f"{advice.card_gib} GB card ({advice.reason}). Pass --type to choose another.")
    return resolve_type(advice.type)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(args.merged_dir)
    try:
        if args.adapter and args.imatrix:
            raise UserError("--imatrix quantizes a merged model's weights; --adapter writes the LoRA matrices in f16",
                            hint="Drop --imatrix, or export the merged folder (tools/merge.py) with it.")
        if args.adapter:
            from qlora_kit.gguf.adapter import adapter_main

            return adapter_main(folder, args)
        ft = resolve_type(args.type) if args.type else advised_type(folder)
        out = Path(args.out) if args.out else default_output(folder, ft.name)
        result = export_gguf(folder, out, ft, args.overwrite, modelfile=not args.no_modelfile,
                             progress=sys.stderr.isatty(), imatrix=args.imatrix, imatrix_tokens=args.imatrix_tokens)
    except UserError as error:
        print_user_error(error)
        return getattr(error, "exit_code", EXIT_USER_ERROR)
    mixture = ", ".join(f"{qtype} x{count}" for qtype, count in result.types.items())
    print(f"wrote {result.gguf_path} ({result.size_bytes / 1e6:.1f} MB, {result.tensor_count} tensors: {mixture}; "
          f"pre-tokenizer {result.pre_tokenizer} by {result.pre_tokenizer_source}) in {result.seconds:.1f} s")
    if result.imatrix_path:
        print(f"wrote {result.imatrix_path} ({describe_imatrix(result.imatrix)}): llama-quantize --imatrix reads "
              f"it; pass --imatrix {result.imatrix_path} to reuse it for another --type")
    if result.imatrix is not None:
        print(f"importance matrix used for {result.weighted_tensors} of {result.tensor_count} tensors"
              + ("" if result.weighted_tensors else f" ({ft.name} stores weights unrounded)"))
    if result.modelfile_path:
        print(f"wrote {result.modelfile_path}: ollama create NAME -f {result.modelfile_path}")
    if args.type:
        from qlora_kit.plan.gguf_sizes import recommended_type

        advice = recommended_type(read_config(folder)[0])
        if advice.type != ft.name:
            print(f"note: the advice for this model on an 8 GB card is {advice.type} ({advice.reason}).")
    if args.verify:
        from qlora_kit.gguf.verify import verify_export

        return verify_export(folder, result.gguf_path, ft.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
