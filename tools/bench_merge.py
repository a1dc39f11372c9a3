"""Peak RAM of merging: qlora_kit's streaming merge vs the naive peft merge, each in its own process.

    python tools/bench_merge.py                       # ~0.37 B-parameter Qwen2, bf16, ~100 MB shards
    python tools/bench_merge.py --layers 12 --verify  # smaller, and also time a merge with verification

Hardware: any CPU machine (a few minutes on 2 cores, < 8 GB RAM). The model is an architecture-exact random
Qwen2 (memory and time do not depend on weight values) saved like a hub checkpoint; the adapter is a real PEFT
LoRA (r=16, all linear layers) with non-zero B. Both merges write float16 safetensors.

  streaming: python -m qlora_kit.merge RUN --no-verify --max-shard-size 100MB   (one output shard at a time)
  naive:     from_pretrained(base) + PeftModel + merge_and_unload() + save_pretrained()

Peak RSS of each child comes from os.wait4 (the kernel's own figure for that process alone). Prints one JSON
object: machine, library versions, command, figures, and the largest weight difference between the two outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/qlora_kit-bench-merge", help="where models and outputs go")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-size", default="100MB", help="max_shard_size of the saved base and of the merge")
    parser.add_argument("--verify", action="store_true", help="also run the streaming merge with verification")
    parser.add_argument("--naive-child", nargs=3, metavar=("BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--fixture-child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.naive_child:
        naive_merge(*args.naive_child)
        return 0
    work = Path(args.workdir)
    if args.fixture_child:
        build_fixture(work, args)
        return 0
    # Everything heavy runs in children: on Linux a child starts with its parent's peak RSS as its own
    # ru_maxrss, so this process must never grow (no torch import here until the figures are taken).
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--fixture-child", *sys.argv[1:]], check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    base, run = fixture_paths(work, args)
    streaming = [sys.executable, "-m", "qlora_kit.merge", str(run), "--overwrite", "--max-shard-size", args.shard_size]
    results = {"streaming": measure([*streaming, "--out", str(work / "out-streaming"), "--no-verify"]),
               "naive": measure([sys.executable, str(Path(__file__).resolve()), "--naive-child", str(base),
                                 str(run / "adapter"), str(work / "out-naive")])}
    if args.verify:
        for dtype in ("float16", "bfloat16"):
            results[f"streaming_with_verification_{dtype}"] = measure(
                [*streaming, "--out", str(work / f"out-verified-{dtype}"), "--dtype", dtype])
    report = {
        "benchmark": "merge peak RSS: streaming (qlora_kit.merge) vs naive (from_pretrained + merge_and_unload)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "versions": versions(),
        "model": model_facts(base, args),
        "results": results,
        "ratio_naive_over_streaming_peak_rss": round(results["naive"]["peak_rss_gib"]
                                                     / results["streaming"]["peak_rss_gib"], 2),
        "max_abs_weight_difference_streaming_vs_naive": max_weight_difference(work / "out-streaming",
                                                                              work / "out-naive"),
    }
    print(json.dumps(report, indent=2))
    return 0


def fixture_paths(work: Path, args) -> tuple[Path, Path]:
    tag = f"h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}-{args.shard_size}"
    return work / f"base-{tag}", work / f"run-{tag}"


def build_fixture(work: Path, args) -> tuple[Path, Path]:
    """A random Qwen2 base in ~100 MB bf16 shards and a run directory with a real LoRA adapter (cached)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from qlora_kit.recipe.loading import recipe_to_toml
    from qlora_kit.recipe.schema import Recipe

    base, run = fixture_paths(work, args)
    if (run / "recipe.toml").is_file():
        return base, run
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    config = Qwen2Config(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 512),
                         vocab_size=args.vocab, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(base, max_shard_size=args.shard_size)
    write_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(run / "adapter")
    recipe = Recipe()
    recipe.model.name, recipe.output.dir = str(base), str(run)
    (run / "recipe.toml").write_text(recipe_to_toml(recipe), encoding="utf-8")
    return base, run


def write_tokenizer(folder: Path) -> None:
    """A small byte-level BPE with a chat template, so verification has real prompts to run."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = ["A patient presents with chest pain radiating to the left arm and shortness of breath.",
            "What is the first-line treatment for uncomplicated hypertension in adults, and why?",
            "Explain in one sentence why the sky is blue."] * 20
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(folder)


def measure(command: list[str]) -> dict:
    """Run one child; its own peak RSS from os.wait4 (not the whole process tree's, not ours)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.monotonic() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.stderr.write(output)
        raise SystemExit(f"benchmark child failed ({code}): {' '.join(command)}")
    result = {"command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(command)),
              "wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 1024**2, 3)}
    verification = [line for line in output.splitlines() if line.startswith("verification:")]
    if verification:
        result["verification"] = verification[-1]
    return result


def naive_merge(base: str, adapter: str, out: str) -> None:
    """What most tutorials do: the whole model in memory, peft merges in place, transformers saves."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    shutil.rmtree(out, ignore_errors=True)
    merged.save_pretrained(out)


def max_weight_difference(a: Path, b: Path) -> float:
    """Largest |difference| between the two merged outputs, tensor by tensor (one at a time in memory)."""
    from safetensors import safe_open

    def locations(folder: Path) -> dict[str, Path]:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(folder / "model.safetensors", "pt") as f:
            return dict.fromkeys(f.keys(), folder / "model.safetensors")

    where_a, where_b = locations(a), locations(b)
    assert where_a.keys() == where_b.keys(), "the two outputs hold different tensors"
    worst = 0.0
    for name in where_a:
        with safe_open(where_a[name], "pt") as fa, safe_open(where_b[name], "pt") as fb:
            worst = max(worst, float((fa.get_tensor(name).float() - fb.get_tensor(name).float()).abs().max()))
    return worst


def model_facts(base: Path, args) -> dict:
    shards = sorted(base.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    return {"architecture": "Qwen2 (random weights)", "hidden": args.hidden, "intermediate": args.intermediate,
            "layers": args.layers, "vocab": args.vocab, "parameters_millions": round(size / 2 / 1e6, 1),
            "base_dtype": "bfloat16", "base_shards": len(shards), "base_size_gib": round(size / 1024**3, 3),
            "lora": "r=16 alpha=32 all-linear, output float16"}


def machine() -> dict:
    import psutil

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 1024**3, 1),
            "python": platform.python_version()}


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "peft", "safetensors", "bitsandbytes")}


if __name__ == "__main__":
    sys.exit(main())
