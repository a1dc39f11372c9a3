"""Measure the GGUF export: the README's table per type, and the peak RAM / time of a 7B-shaped export.

    python tools/measure_gguf.py quality [--types q4_k_m,q5_k_m,q6_k,q8_0,f16] [--json bench/results/gguf_quality.json]
        SmolLM2-135M-Instruct (the 16-bit folder qlora_kit makes from its official Q4_1 GGUF: `python -m
        qlora_kit.model.smollm2` fetches it): each type exported, read back by transformers, compared with the folder on
        the merge check's sample prompts (top-1 agreement per position, max |Δlogit|, greedy tokens agreeing).
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
    from qlora_kit.gguf.verify import check_gguf
    from qlora_kit.model.gguf_base import prepare_gguf_base
    from qlora_kit.model.smollm2 import find
    from qlora_kit.recipe.schema import ModelSection

    source = find()
    if source is None:
        sys.exit("SmolLM2 GGUF not found: run `python -m qlora_kit.smollm2` first")
    model = ModelSection(name=str(source.parent), gguf_file=str(source))
    prepare_gguf_base(model, weights=True)
    folder = Path(model.name)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for t in types:
            started = time.monotonic()
            result = export_gguf(folder, Path(tmp) / f"smollm2-{t}.gguf", t, log=lambda *_: None)
            seconds = time.monotonic() - started
            check = check_gguf(folder, result.gguf_path, t)
            rows[t] = {"bytes": result.size_bytes, "export_s": round(seconds, 1), "types": result.types,
                       "top1_agreement": round(check.top1_agreement, 4), "positions": check.positions,
                       "max_abs_logit_diff": round(check.max_abs_diff, 3),
                       "max_abs_logit": round(check.max_abs_logit, 2),
                       "greedy_agreeing": check.greedy_agreeing, "greedy_total": check.greedy_total}
            print(f"{t}: {result.size_bytes / 1e6:.1f} MB in {seconds:.1f} s, {check.describe()}", flush=True)
    return {"model": "SmolLM2-135M-Instruct (16-bit folder from its official Q4_1 GGUF)", "source": source.name,
            "rows": rows}


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
    parser.add_argument("what", choices=("quality", "sizes", "big"))
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--type", default="q4_k_m")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    result = {"quality": lambda: quality(args.types.split(",")), "sizes": sizes,
              "big": lambda: big(args.layers, args.type)}[args.what]()
    result["command"] = "python tools/measure_gguf.py " + " ".join(sys.argv[1:])
    result["peak_rss_gib_this_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
