"""Measure the GGUF export: the README's table per type, and the peak RAM / time of a 7B-shaped export.

    python tools/measure_gguf.py quality [--types q4_k_m,q5_k_m,q6_k,q8_0,f16] [--json bench/results/gguf_quality.json]
        SmolLM2-135M-Instruct (the 16-bit folder qlora_kit makes from its official Q4_1 GGUF: `python -m
        qlora_kit.model.smollm2` fetches it): each type exported, its size and tensor mixture, and --verify's figures.
    python tools/measure_gguf.py verify NAME=FOLDER ... [--types f16,...,q4_0] [--json bench/results/gguf_verify.json]
        --verify's bounds, measured: each type exported from each FOLDER (`smollm2`: the base above; `tiny`: the CI's
        tiny random Llama; or a merged folder), checked as written, then damaged copies of it (damages(): a tensor's
        block scales x2 / x0.5 / x-1, two tensors swapped, a header value changed; the bytes edited in place) checked
        against the same reference.
    python tools/measure_gguf.py sizes
        The bytes each type would take for R1-Distill-Qwen-1.5B / -7B / R1-Distill-Llama-8B, computed from their
        shapes with the same per-tensor mixture the export writes (no weights needed), plus the f16 KV cache.
    python tools/measure_gguf.py big [--layers 28] [--type q4_k_m] [--json ...]
        A random-weight R1-Distill-Qwen-7B-shaped folder (bf16 safetensors, one shard per layer) exported with
        --type; prints wall time and the peak RSS of the export process (ru_maxrss, measured in a child process
        so that building the folder does not count). --layers < 28 writes that many layers (the time then scales
        with the parameters written; say so when extrapolating).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {  # config.json values (GUIDE.md)
    "R1-Distill-Qwen-1.5B": dict(hidden=1536, intermediate=8960, layers=28, heads=12, kv=2, vocab=151936, tied=False),
    "R1-Distill-Qwen-7B": dict(hidden=3584, intermediate=18944, layers=28, heads=28, kv=4, vocab=152064, tied=False),
    "R1-Distill-Llama-8B": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv=8, vocab=128256, tied=False),
}
TYPES = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16")


def config_of(m: dict, layers: int | None = None) -> dict:
    return {"hidden_size": m["hidden"], "intermediate_size": m["intermediate"],
            "num_hidden_layers": layers or m["layers"], "num_attention_heads": m["heads"],
            "num_key_value_heads": m["kv"], "vocab_size": m["vocab"], "tie_word_embeddings": m["tied"]}


def parameters(config: dict) -> int:
    from qlora_kit.plan.gguf_sizes import gguf_shapes

    return sum(math.prod(shape) for shape in gguf_shapes(config).values())


def sizes() -> dict:
    """Each type's file for the three models (the mixture the export writes) and the KV cache the advice counts."""
    from qlora_kit.plan.gguf_sizes import CONTEXT, advice_lines, file_bytes, kv_cache_bytes

    table = {}
    for name, m in MODELS.items():
        config = config_of(m)
        table[name] = {t: file_bytes(config, t) for t in TYPES} | {"kv_cache_f16": kv_cache_bytes(config)}
        print(name)
        print("\n".join(advice_lines(config, "MERGED_DIR")))
    return {"context": CONTEXT, "bytes": table}


def quality(types: list[str]) -> dict:
    from qlora_kit.gguf.export import export_gguf
    from qlora_kit.gguf.verify import check_gguf, reference_outputs

    folder = smollm2_folder()
    reference = reference_outputs(folder)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for t in types:
            started = time.monotonic()
            result = export_gguf(folder, Path(tmp) / f"smollm2-{t}.gguf", t, log=lambda *_: None)
            seconds = time.monotonic() - started
            check = check_gguf(folder, result.gguf_path, t, reference=reference)
            rows[t] = {"bytes": result.size_bytes, "export_s": round(seconds, 1), "types": result.types} | check.row()
            print(f"{t}: {result.size_bytes / 1e6:.1f} MB in {seconds:.1f} s, {check.describe()}", flush=True)
    return {"model": "SmolLM2-135M-Instruct (16-bit folder from its official Q4_1 GGUF)", "rows": rows}


# ---------------------------------------------------------------------------------------------------------------
# Damaged files: what --verify must refuse. Each edits a copy's tensor bytes in place (gguf's own reader, r+):
# no re-export, so nothing but the named damage differs from the file the export wrote.

# Byte offsets of the f16 scales inside one block (ggml-common.h): d, and dmin / m where the block has one.
# Multiplying all of them by a factor multiplies every weight of the tensor by it, exactly (a power of 2).
SCALE_OFFSETS = {"Q8_0": (0,), "Q4_0": (0,), "Q5_0": (0,), "Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2),
                 "Q5_K": (0, 2), "Q6_K": (208,), "Q3_K": (108,)}  # Q3_K: hmask 32, qs 64, scales 12, then d


def scale_tensor(tensor, factor: float) -> None:
    """Every weight of a GGUF tensor (a reader's r+ view) times `factor`: a wrong scale, as a bug would write it."""
    import gguf
    import numpy as np

    kind = tensor.tensor_type.name
    if kind in ("F32", "F16"):
        tensor.data[...] = (tensor.data.astype(np.float32) * factor).astype(tensor.data.dtype)
        return
    raw = tensor.data.reshape(-1)
    if kind == "BF16":
        bits = raw.view(np.uint16)
        values = (bits.astype(np.uint32) << 16).view(np.float32) * np.float32(factor)
        bits[...] = (values.view(np.uint32) >> 16).astype(np.uint16)
        return
    blocks = raw.reshape(-1, gguf.GGML_QUANT_SIZES[tensor.tensor_type][1])
    for offset in SCALE_OFFSETS[kind]:
        scales = np.ascontiguousarray(blocks[:, offset:offset + 2]).view(np.float16)
        blocks[:, offset:offset + 2] = (scales.astype(np.float32) * factor).astype(np.float16).view(np.uint8)


def damaged_copy(source: Path, out: Path, damage: tuple) -> Path:
    """A copy of `source` with one damage: ("scale", tensor, factor) or ("swap", tensor, other tensor): two tensors
    of the same shape and storage type exchanged (a wrong name mapping)."""
    import shutil

    import gguf

    shutil.copyfile(source, out)
    reader = gguf.GGUFReader(out, "r+")
    tensors = {t.name: t for t in reader.tensors}
    kind, name, arg = damage
    if kind == "scale":
        scale_tensor(tensors[name], arg)
    elif kind == "field":  # a header value times `arg` (rope base, norm epsilon): the weights are untouched
        value = next(field for key, field in reader.fields.items() if key.endswith(name))  # <arch>.rope...
        value.parts[value.data[0]][0] *= arg
    else:
        a, b = tensors[name], tensors[arg]
        if a.tensor_type != b.tensor_type or a.data.shape != b.data.shape:
            raise ValueError(f"{name} and {arg} differ in type or shape: swapping them is not a like-for-like damage")
        saved = a.data.copy()
        a.data[...] = b.data
        b.data[...] = saved
    reader.data.flush()
    del reader
    return out


def damages(layers: int) -> dict[str, tuple]:
    mid = layers // 2
    other = mid + 1 if mid + 1 < layers else mid - 1
    return {
        f"ffn_down.{mid} x2": ("scale", f"blk.{mid}.ffn_down.weight", 2.0),
        f"attn_v.{mid} x2": ("scale", f"blk.{mid}.attn_v.weight", 2.0),
        f"attn_output.{mid} x0.5": ("scale", f"blk.{mid}.attn_output.weight", 0.5),
        f"attn_q.{mid} x2": ("scale", f"blk.{mid}.attn_q.weight", 2.0),
        f"ffn_up.{mid} x-1": ("scale", f"blk.{mid}.ffn_up.weight", -1.0),
        "attn_q 0<->1": ("swap", "blk.0.attn_q.weight", "blk.1.attn_q.weight"),
        f"ffn_gate<->ffn_up.{mid}": ("swap", f"blk.{mid}.ffn_gate.weight", f"blk.{mid}.ffn_up.weight"),
        f"attn_k {mid}<->{other}": ("swap", f"blk.{mid}.attn_k.weight", f"blk.{other}.attn_k.weight"),
        "rope base /100": ("field", ".rope.freq_base", 0.01),
        "rms eps x1e6": ("field", ".attention.layer_norm_rms_epsilon", 1e6),
    }


TINY_SHARPEN = 8.0
"""The tiny model's final norm, times this: a random model's next-token distributions are all but uniform (every
logit near 0), so nothing it computes can move far from them; x8 makes them about as peaked as a trained small
model's, so that a header that lies shows in what the file computes. Rounding flips its argmax no more or less
often for it (every logit scales alike): its greedy agreement is the unsharpened model's."""


def tiny_model(folder: Path) -> Path:
    """The CI's model (tests/test_gguf_verify.py): a 2-layer Llama, rows 256 wide (the K types are used, not their
    fallbacks), seeded random weights, the demo's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qlora_kit.demo.build import build_tokenizer, make_rows, row_texts

    tokenizer = build_tokenizer(row_texts(make_rows()))
    config = LlamaConfig(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(TINY_SHARPEN)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct's 16-bit folder, made from its official Q4_1 GGUF (cached)."""
    from qlora_kit.model.gguf_base import prepare_gguf_base
    from qlora_kit.model.smollm2 import find
    from qlora_kit.recipe.schema import ModelSection

    source = find()
    if source is None:
        sys.exit("SmolLM2 GGUF not found: run `python -m qlora_kit.smollm2` first")
    model = ModelSection(name=str(source.parent), gguf_file=str(source))
    prepare_gguf_base(model, weights=True)
    return Path(model.name)


def verify_measure(folder: Path, types: list[str], label: str) -> dict:
    """Each type exported from `folder`, checked as --verify checks it, then damaged copies of it checked too."""
    from qlora_kit.gguf.export import export_gguf
    from qlora_kit.gguf.verify import check_gguf, reference_outputs

    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    reference = reference_outputs(folder)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for t in types:
            clean = export_gguf(folder, Path(tmp) / f"{t}.gguf", t, modelfile=False, log=lambda *_: None).gguf_path
            rows[t] = {"as written": check_gguf(folder, clean, t, reference=reference).row()
                       | {"bytes": clean.stat().st_size}}
            print(f"{label} {t} as written: {rows[t]['as written']}", flush=True)
            for what, damage in damages(layers).items():
                broken = damaged_copy(clean, Path(tmp) / f"{t}-damaged.gguf", damage)
                rows[t][what] = check_gguf(folder, broken, t, reference=reference).row()
                print(f"{label} {t} {what}: {rows[t][what]}", flush=True)
            clean.unlink()
    return rows


def verify(models: list[str], types: list[str]) -> dict:
    """`verify NAME=FOLDER ...`: FOLDER `smollm2` (the base), `tiny` (the CI's model, built here) or a merged
    folder (a fine-tuned SmolLM2, the demo's merge)."""
    result = {"types": types, "models": {}, "damages": "tools/measure_gguf.py damages(): layer = layers // 2"}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in models:
            name, _, where = spec.partition("=")
            folder = (smollm2_folder() if where == "smollm2" else tiny_model(Path(tmp) / "tiny") if where == "tiny"
                      else Path(where))
            result["models"][name] = verify_measure(folder, types, name)
    return result


def random_qwen2(folder: Path, shape: dict, dtype_name: str) -> Path:
    """Random weights (N(0, 0.02), seeded) of a Qwen2 at `shape` (hidden, intermediate, layers, heads, kv, vocab),
    in one safetensors file of dtype `dtype_name` ("float16", "bfloat16"), with the R1-Distill-Qwen tokenizer of
    the shared fixtures: a merged folder as tools/merge.py leaves one."""
    import shutil

    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    h, i, kv = shape["hidden"], shape["intermediate"], shape["kv"] * (shape["hidden"] // shape["heads"])
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": h, "intermediate_size": i,
              "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
              "num_key_value_heads": shape["kv"], "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "vocab_size": shape["vocab"], "tie_word_embeddings": False,
              "torch_dtype": dtype_name, "bos_token_id": 151646, "eos_token_id": 151643}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)

    def rnd(*size):
        return (torch.randn(*size, generator=generator) * 0.02).to(dtype)

    ones = torch.ones(h, dtype=dtype)
    tensors = {"model.embed_tokens.weight": rnd(shape["vocab"], h), "lm_head.weight": rnd(shape["vocab"], h),
               "model.norm.weight": ones}
    for b in range(shape["layers"]):
        p = f"model.layers.{b}."
        tensors |= {p + "input_layernorm.weight": ones.clone(), p + "post_attention_layernorm.weight": ones.clone(),
                    p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.q_proj.bias": rnd(h),
                    p + "self_attn.k_proj.weight": rnd(kv, h), p + "self_attn.k_proj.bias": rnd(kv),
                    p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.v_proj.bias": rnd(kv),
                    p + "self_attn.o_proj.weight": rnd(h, h), p + "mlp.gate_proj.weight": rnd(i, h),
                    p + "mlp.up_proj.weight": rnd(i, h), p + "mlp.down_proj.weight": rnd(h, i)}
    save_file(tensors, folder / "model.safetensors")
    tokenizer = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "r1-distill-qwen-tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        sys.exit("the R1-Distill-Qwen tokenizer fixture is needed (shared/fixtures/r1-distill-qwen-tokenizer)")
    for file in tokenizer.iterdir():
        if file.is_file():
            shutil.copyfile(file, folder / file.name)
    return folder


def make_big(folder: Path, layers: int) -> None:
    """Random bf16 weights at R1-Distill-Qwen-7B's shapes, one safetensors shard per layer (as merge writes)."""
    import torch
    from safetensors.torch import save_file

    m = MODELS["R1-Distill-Qwen-7B"]
    h, i, kv = m["hidden"], m["intermediate"], m["kv"] * (m["hidden"] // m["heads"])
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": h, "intermediate_size": i,
              "num_hidden_layers": layers, "num_attention_heads": m["heads"], "num_key_value_heads": m["kv"],
              "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "vocab_size": m["vocab"], "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    weight_map = {}

    def rnd(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    shards = [("model-embed.safetensors", {"model.embed_tokens.weight": rnd(m["vocab"], h),
                                           "lm_head.weight": rnd(m["vocab"], h),
                                           "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)})]
    for b in range(layers):
        p = f"model.layers.{b}."
        shards.append((f"model-{b:03d}.safetensors", {
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.q_proj.bias": rnd(h),
            p + "self_attn.k_proj.weight": rnd(kv, h), p + "self_attn.k_proj.bias": rnd(kv),
            p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.v_proj.bias": rnd(kv),
            p + "self_attn.o_proj.weight": rnd(h, h), p + "mlp.gate_proj.weight": rnd(i, h),
            p + "mlp.up_proj.weight": rnd(i, h), p + "mlp.down_proj.weight": rnd(h, i)}))
    for file, tensors in shards:
        save_file(tensors, folder / file)
        weight_map |= dict.fromkeys(tensors, file)
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    r1 = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    tokenizer = next((p for p in r1.rglob("tokenizer.json")), None)
    if tokenizer is None:
        sys.exit("the R1-Distill-Qwen tokenizer fixture is needed for the big export (shared/fixtures)")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer.parent / name).read_bytes())


# The export process's own peak: VmHWM (Linux; reset at exec). ru_maxrss is not used: after fork + exec it
# still counts the parent's pages at the fork (here the parent built the 3+ GB folder).
PEAK_KIB = ("def peak_kib():\n"
            "    try:\n"
            "        return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            "    except OSError:\n"
            "        import resource; return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n")


def big(layers: int, type_name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "merged"
        make_big(folder, layers)
        out = Path(tmp) / f"big-{type_name}.gguf"
        repo = str(Path(__file__).resolve().parents[1])
        code = (f"import resource, sys, time; sys.path.insert(0, {repo!r}); from qlora_kit.gguf.export import "
                f"export_gguf; t = time.monotonic(); r = export_gguf({str(folder)!r}, {str(out)!r}, {type_name!r}, "
                "modelfile=False, log=lambda *_: None); print(time.monotonic() - t, r.size_bytes, "
                "peak_kib(), r.types)")
        code = PEAK_KIB + code
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        seconds, size, rss_kib, *types = done.stdout.strip().splitlines()[-1].split(" ", 3)
        written = parameters(config_of(MODELS["R1-Distill-Qwen-7B"], layers))
        row = {"layers": layers, "type": type_name, "parameters": written, "seconds": round(float(seconds), 1),
               "bytes": int(size), "peak_rss_gib": round(int(rss_kib) / 1024**2, 2), "types": " ".join(types),
               "extrapolated_28_layer_seconds": None}
        if layers < 28:
            full = parameters(config_of(MODELS["R1-Distill-Qwen-7B"]))
            row["extrapolated_28_layer_seconds"] = round(float(seconds) * full / written)
        print(json.dumps(row), flush=True)
        return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("quality", "sizes", "big", "verify"))
    parser.add_argument("models", nargs="*", help="verify: NAME=FOLDER (FOLDER smollm2, tiny or a merged folder)")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--type", default="q4_k_m")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    result = {"quality": lambda: quality(args.types.split(",")), "sizes": sizes,
              "big": lambda: big(args.layers, args.type),
              "verify": lambda: verify(args.models, args.types.split(","))}[args.what]()
    result["command"] = "python tools/measure_gguf.py " + " ".join(sys.argv[1:])
    result["peak_rss_gib_this_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
