"""What the benchmark compares (setups, their recipes, the shapes) and what the planner predicts for each.

Light on purpose: the parent process plans and records without importing torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.plan.architectures import ARCHITECTURES

REPO = Path(__file__).resolve().parents[2]
GIB = 1024**3
SETUP_BASES = ("baseline", "qlora_kit")
SWITCHES = ("offload_activations", "embeddings_on_cpu", "tiled_mlp")
DEMO_TOKENIZER = REPO / "qlora_kit" / "demo" / "tiny-qwen2"
# Smoke: the same architectures shrunk, so the Qwen2 (qkv bias) and Llama 3.1 (llama3 RoPE) code paths both run.
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 65536}
SMOKE_MODELS = ["r1-distill-qwen-1.5b", "r1-distill-llama-8b"]
# The baseline, qlora_kit as shipped, and qlora_kit with every memory switch (where the longest sequences are).
DEFAULT_SETUPS = ["baseline", "qlora_kit", "qlora_kit+offload_activations+embeddings_on_cpu+tiled_mlp"]
SMOKE_SETUPS = ["baseline", "qlora_kit"]
# --count (CPU): the switches that change anything on a CPU; offload_activations and embeddings_on_cpu move tensors
# from the GPU to host RAM, and on a CPU both are host RAM (qlora_kit turns them off there and says so).
COUNT_SETUPS = ["baseline", "qlora_kit", "qlora_kit+tiled_mlp"]
CPU_ONLY_SWITCHES = ("tiled_mlp",)
COUNT_LAYERS = [1, 2]
# --protocol (one GPU command, GUIDE §4 in 9 minutes): the most valuable comparison first, the biggest model first.
PROTOCOL_MODELS = ["r1-distill-llama-8b", "r1-distill-qwen-7b", "r1-distill-qwen-1.5b"]
PROTOCOL_SETUPS = ["qlora_kit+offload_activations+embeddings_on_cpu+tiled_mlp", "baseline"]
SMOKE_PROTOCOL_MODELS = ["r1-distill-llama-8b", "r1-distill-qwen-1.5b"]  # both architecture families
PROTOCOL_MINUTES = 8.5  # a trial still running then is killed 15 s later: the JSON is final by 9 minutes
PROTOCOL_SPEED_LENGTH = 1024  # tokens/s here when a setup fits no length under the cap (then measured without it)
PROTOCOL_SPEED_MAX = 4096  # ... and at most this long otherwise: the speed comparison must not eat the budget
NO_ARITHMETIC_MIN_ELEMENTS = 65536  # qlora_kit.tensor_peak.NoArithmetic: elementwise ops on tensors this big skipped
SMOKE_NO_ARITHMETIC_MIN_ELEMENTS = 4096  # tiny shapes: low enough that activations are skipped too (what CI checks)
LEAK_TOLERANCE = 256 * 1024**2  # cuBLAS workspaces and the like may stay allocated between trials
LIBRARIES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets")
def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


@dataclass(frozen=True)
class Setup:
    name: str
    base: str
    """`baseline` or `qlora_kit`."""
    switches: tuple[str, ...] = ()
    """[memory] switches turned on (qlora_kit only)."""


def parse_setup(text: str, memory: tuple[str, ...] | list[str] = ()) -> Setup:
    base, *switches = text.split("+")
    if base == "qlora_kit" and not switches:
        switches = list(memory)
    if base not in SETUP_BASES:
        raise ValueError(f"unknown setup `{text}`: use {' or '.join(SETUP_BASES)}, optionally qlora_kit+SWITCH")
    bad = [s for s in switches if s not in SWITCHES]
    if bad or (base == "baseline" and switches):
        raise ValueError(f"setup `{text}`: switches are {', '.join(SWITCHES)}, and only for qlora_kit")
    switches = tuple(s for s in SWITCHES if s in switches)  # canonical order: one name per combination
    return Setup("+".join((base, *switches)), base, switches)


def settings_of(args) -> dict:
    """Everything that changes what a trial measures: a resumed file must match it exactly."""
    return {"smoke": args.smoke, "budget_gib": args.budget_gib, "warmup": args.warmup, "steps": args.steps,
            "search_steps": args.search_steps, "max_len": args.max_len, "resolution": args.resolution,
            "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout},
            "prompt_tokens": args.prompt_tokens, "seed": args.seed, "batch_size": 1, "cpu_dtype": args.cpu_dtype,
            **({"protocol": True} if getattr(args, "protocol", False) else {}),
            **({"count_layers": args.count_layers, "no_arithmetic_min_elements":
                SMOKE_NO_ARITHMETIC_MIN_ELEMENTS if args.smoke else NO_ARITHMETIC_MIN_ELEMENTS}
               if getattr(args, "count", False) else {})}


def model_config(name: str, smoke: bool, layers: int | None = None) -> dict:
    """config.json essentials; the smoke variant keeps the architecture family but shrinks every dimension;
    `layers`: the real layer dimensions and vocabulary, this many decoder layers (the CPU count's shallow models)."""
    config = dict(ARCHITECTURES[name])
    if smoke:
        tokenizer_ids = json.loads((DEMO_TOKENIZER / "config.json").read_text(encoding="utf-8"))
        config.update(SMOKE_SHAPE, bos_token_id=tokenizer_ids["bos_token_id"],
                      eos_token_id=tokenizer_ids["eos_token_id"])
    if layers is not None:
        config["num_hidden_layers"] = layers
    return config




def bench_recipe(setup: Setup, length: int, steps: int, settings: dict, model_name: str = "bench/random"):
    """The recipe a qlora_kit user would write for this trial; the baseline is modelled as the same recipe with
    plain AdamW (the planner has no bf16-adapter option, so its baseline figure is an approximation)."""
    from qlora_kit.recipe.loading import recipe_from_dict

    lora = settings["lora"]
    # No checkpoints: writing them is not what is measured (and a benchmark has nothing to resume).
    train = {"max_steps": steps, "batch_size": 1, "grad_accum": 1, "logging_steps": 1, "seed": settings["seed"],
             "save_steps": 0}
    if setup.base == "baseline":
        train["optim"] = "adamw_torch"
    elif settings.get("count_layers"):
        # --count stands for a GPU step: qlora_kit's optimizer there (bitsandbytes runs it on a CPU too, unpaged).
        train["optim"] = "paged_adamw_8bit"
    return recipe_from_dict({
        "model": {"name": model_name},  # never read: the weights come from random_weights()
        "lora": {"r": lora["r"], "alpha": lora["alpha"], "dropout": lora["dropout"]},
        "data": {"source": "synthetic", "max_length": length},
        "train": train,
        "memory": dict.fromkeys(setup.switches, True),
    }, where="benchmark recipe")


def planner_estimate(config: dict, setup: Setup, length: int, settings: dict, device: str = "cuda"):
    """The planner's estimate for one trial. On CPU: qlora_kit computes in float32 (or bf16 with --cpu-dtype), the
    baseline in bf16 autocast (its bf16=True), and TRL's loss runs without Triton."""
    from qlora_kit.plan.estimate import Architecture, estimate

    arch = Architecture.from_config(config, "bench")
    dtype = None
    if device == "cpu":
        dtype = settings.get("cpu_dtype", "float32") if setup.base == "qlora_kit" else "bfloat16"
    return estimate(arch, bench_recipe(setup, length, 1, settings), length, 1, device, dtype)


def planner_reserved_gib(config: dict, setup: Setup, length: int, settings: dict) -> float:
    return planner_estimate(config, setup, length, settings).reserved / GIB


def planner_longest(config: dict, setup: Setup, settings: dict) -> int:
    """Longest multiple of the resolution whose predicted reserved memory fits the budget (0 if none)."""
    step, budget = settings["resolution"], settings["budget_gib"]
    fits = [n for n in range(step, settings["max_len"] + 1, step)
            if planner_reserved_gib(config, setup, n, settings) <= budget]
    return max(fits, default=0)
