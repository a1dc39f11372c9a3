"""`tools/export_gguf.py RUN_DIR --adapter [--base BASE.gguf]`: the trained LoRA adapter alone, as llama.cpp's
adapter GGUF (what llama.cpp's convert_lora_to_gguf.py writes), plus an Ollama Modelfile `FROM` the base GGUF
with `ADAPTER` this file: tens of MB to download instead of the whole model.

The format, from convert_lora_to_gguf.py (LoraModel.set_type / set_gguf_parameters / modify_tensors):
  * general.type = "adapter", adapter.type = "lora", adapter.lora.alpha (float32), general.architecture the
    base's; no vocabulary, no hyper-parameters beyond those.
  * per adapted Linear layer two tensors named after the base's GGUF tensor: `blk.0.attn_q.weight.lora_a`
    (numpy shape r x in, peft's lora_A) and `.lora_b` (out x r, peft's lora_B).
  * Llama's q/k rows are permuted for llama.cpp's rope exactly as the base's are; for W + s·B·A that permutes
    the rows of B only (LoraTorchTensor.permute: a row permutation goes to B).
llama.cpp applies `W x + scale · B (A x)` with scale = alpha / r (llama-adapter.cpp, times --lora-scaled), so
peft's alpha / r is kept exactly; an rsLoRA adapter (alpha / sqrt(r)) is written with the alpha that gives the
same scale. Stored in f16 (convert_lora_to_gguf's --outtype f16).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.errors import UserError


@dataclass
class AdapterExport:
    gguf_path: Path
    modelfile_path: Path | None
    tensor_count: int
    size_bytes: int
    alpha: float
    rank: int


def base_folder(recipe) -> Path:
    """The folder with the base's config.json (and tokenizer): local as is, a hub id from the local cache."""
    from qlora_kit.merge.hub import hub_file
    from qlora_kit.recipe.schema import is_local_reference

    model = recipe.model
    if is_local_reference(model.name, Path.cwd()):
        return Path(model.name).expanduser()
    return hub_file(model.name, model.revision, "config.json", required=True).parent


def uniform_alpha(adapter) -> tuple[float, int]:
    """(alpha for llama.cpp, rank): one alpha for the whole file, so every module must share rank and scale."""
    ranks = {module.a.shape[0] for module in adapter.modules.values()}
    scales = {round(module.scale, 12) for module in adapter.modules.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise UserError("llama.cpp's adapter format has one alpha per file, but this adapter's layers differ",
                        [f"ranks {sorted(ranks)}, scales {sorted(scales)} (rank_pattern / alpha_pattern)"],
                        hint="Merge it instead (tools/merge.py) and export the merged folder.")
    if adapter.config.get("use_dora"):
        raise UserError("DoRA adapters have no llama.cpp adapter format (llama.cpp applies W + s·B·A only)",
                        hint="Merge it instead (tools/merge.py) and export the merged folder.")
    rank = ranks.pop()
    return scales.pop() * rank, rank  # llama.cpp's scale = alpha / r: this alpha gives peft's scale exactly


def export_adapter(run_dir: Path, out: Path, base_gguf: Path | None = None, overwrite: bool = False,
                   log=print) -> AdapterExport:
    import gguf
    import torch

    from qlora_kit.gguf.dependency import require_gguf
    from qlora_kit.gguf.model_config import hyper_parameters, read_config
    from qlora_kit.gguf.tensors import permute_for_llama
    from qlora_kit.merge.adapter import read_adapter
    from qlora_kit.merge.run_dir import read_run

    require_gguf()
    run = read_run(Path(run_dir))
    if run.recipe.model.gguf_file and base_gguf is None:
        base_gguf = Path(run.recipe.model.gguf_file)  # the run trained on a GGUF base: that file is the base
    modelfile = out.with_suffix(".Modelfile")
    for existing in (out, modelfile):
        if existing.exists() and not overwrite:
            raise UserError(f"{existing} already exists",
                            hint="Pass --overwrite to replace it, or choose another --out.")
    folder = base_folder(run.recipe)
    config, arch = read_config(folder)
    hp = hyper_parameters(config)
    adapter = read_adapter(run.adapter_dir, run.recipe.model.allow_pickle_weights)
    alpha, rank = uniform_alpha(adapter)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_name], hp.block_count)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_name]])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(f"{Path(run_dir).resolve().name} LoRA")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    count = 0
    for module_name, module in sorted(adapter.modules.items(), key=lambda item: natural(item[0])):
        target = name_map.get_name(module_name + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise UserError(f"the adapter adapts {module_name}, which has no GGUF name for {arch.gguf_name}")
        a, b = module.a.float(), module.b.float()
        if arch.permute_qk and ".attn_q." in target:
            b = permute_for_llama(b, hp.head_count)
        elif arch.permute_qk and ".attn_k." in target:
            b = permute_for_llama(b, hp.head_count_kv)
        writer.add_tensor(f"{target}.lora_a", a.to(torch.float16).numpy())
        writer.add_tensor(f"{target}.lora_b", b.contiguous().to(torch.float16).numpy())
        count += 2
    if base_gguf is not None:
        check_against_base(writer, Path(base_gguf))

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)

    written = write_adapter_modelfile(out, base_gguf, run.adapter_dir, hp.vocab_size, log)
    if written is None:
        modelfile.unlink(missing_ok=True)
    return AdapterExport(out, written, count, out.stat().st_size, alpha, rank)


def natural(name: str) -> list:
    from qlora_kit.gguf.tensors import natural_key

    return natural_key(name)


def check_against_base(writer, base_gguf: Path) -> None:
    """Every `X.lora_a` / `X.lora_b` pair must fit base tensor X as llama.cpp checks it when loading
    (llama-adapter.cpp: the base tensor exists, A's row length is the base's, B has the base's rows)."""
    import gguf

    if not base_gguf.is_file():
        raise UserError(f"base GGUF not found: {base_gguf}")
    reader = gguf.GGUFReader(base_gguf)
    base = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}  # numpy order
    arch = str(reader.fields["general.architecture"].contents())
    problems = []
    tensors = {info_name: info.shape for info_name, info in
               ((name, info) for shard in writer.tensors for name, info in shard.items())}
    mine = str(writer.arch)
    if arch != mine:
        problems.append(f"the base GGUF is a {arch} model, the adapter is for {mine}")
    for name, shape in tensors.items():
        target, part = name.rsplit(".", 1)
        if target not in base:
            problems.append(f"{target} is not in the base GGUF")
        elif part == "lora_a" and shape[-1] != base[target][-1]:
            problems.append(f"{name}: {shape[-1]} columns, the base tensor has {base[target][-1]}")
        elif part == "lora_b" and shape[0] != base[target][0]:
            problems.append(f"{name}: {shape[0]} rows, the base tensor has {base[target][0]}")
    if problems:
        raise UserError(f"the adapter does not fit {base_gguf}", problems[:5],
                        hint="Pass --base the GGUF of the model this run trained (exported from the same base).")


def write_adapter_modelfile(out: Path, base_gguf: Path | None, tokenizer_dir: Path, vocab_size: int,
                            log) -> Path | None:
    """`FROM <base gguf>` + `ADAPTER <this file>` + the chat template and stop tokens, or None with the reason:
    without a template and stop tokens Ollama runs past the end of the turn, so none is written then."""
    import gguf

    from qlora_kit.gguf.modelfile import chat_format, modelfile_text, sampling_settings
    from qlora_kit.gguf.tokenizer import load_tokenizer, write_tokenizer

    if base_gguf is None:
        log("no Modelfile written: pass --base BASE.gguf (the base model exported with tools/export_gguf.py) "
            "for its FROM line")
        return None
    tokenizer = load_tokenizer(tokenizer_dir)
    scratch = gguf.GGUFWriter(path=None, arch="llama")  # the metadata is only read back, never written
    info = write_tokenizer(scratch, tokenizer_dir, vocab_size, tokenizer)
    fmt, reason = chat_format(tokenizer, info, sampling_settings(tokenizer_dir))
    if fmt is None:
        log(f"no Modelfile written: {reason}")
        return None
    text = modelfile_text(out.name, fmt).replace(f"FROM ./{out.name}",
                                                 f"FROM {relative(base_gguf, out.parent)}\nADAPTER ./{out.name}")
    path = out.with_suffix(".Modelfile")
    path.write_text(text, encoding="utf-8")
    return path


def relative(path: Path, start: Path) -> str:
    """The base's path as Ollama reads FROM: relative to the Modelfile's folder."""
    try:
        text = os.path.relpath(path.resolve(), start.resolve())
    except ValueError:  # another drive (Windows)
        return str(path.resolve())
    return text if text.startswith("..") else f"./{text}"


def adapter_main(run_dir: Path, args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(run_dir).resolve() / "adapter.gguf"
    result = export_adapter(Path(run_dir), out, Path(args.base) if args.base else None, args.overwrite)
    print(f"wrote {result.gguf_path} ({result.size_bytes / 1e6:.1f} MB, {result.tensor_count} tensors, LoRA r="
          f"{result.rank}, alpha {result.alpha:g}, f16)")
    if result.modelfile_path:
        print(f"wrote {result.modelfile_path}: ollama create NAME -f {result.modelfile_path}")
    return 0
