"""`python -m qlora_kit.merge RUN_DIR [--out DIR] [--dtype float16] [--into original|dequantized]`

Folds a run's LoRA adapter into the base model and writes a plain transformers model folder
(safetensors shards + index, config.json, generation_config.json, the base's tokenizer files, README.md).

    run dir ─► recipe.toml + adapter/ ─► base checkpoint (local folder, hub cache, or rebuilt random-init)
            ─► refusals (adapter ↔ base, quantized base, output folder, free disk): nothing written yet
            ─► per shard: W (original 16-bit, or its NF4 round trip) + scale·B@A in float32 ─► output dtype
            ─► tokenizer/config files ─► verification (PEFT vs merged logits) ─► README.md ─► publish

Why not peft's `merge_and_unload()`: on the 4-bit training model it re-quantizes the merged weight (the
update is mostly rounded away), and on a 16-bit model it needs the whole model in memory. Streaming the
base one output shard at a time (--max-shard-size, 1 GB by default) keeps peak RAM near one shard plus the
adapter and the libraries (~0.4 GB), whatever the model size.

Adapters: plain LoRA, rsLoRA, rank/alpha patterns and DoRA are merged. Anything that is not a low-rank
update of a Linear weight (modules_to_save, trainable tokens, LoRA biases, embedding LoRA, base-rewriting
initialisations such as PiSSA) is refused with the setting named, rather than merged approximately.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qlora_kit.errors import EXIT_USER_ERROR, UserError, print_user_error

if TYPE_CHECKING:
    from qlora_kit.recipe import Recipe

EXIT_VERIFICATION_FAILED = 1
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# Verification passes when max |merged - reference| over all logits <= tolerance x the largest |reference logit|.
# Relative, because logit scales differ by orders of magnitude (a random demo model: ~1; a trained 7B: ~30).
# Both models run in the output dtype (RAM: one 16-bit model at a time), so the difference is rounding noise:
# the merged model rounds W + scale*B@A once per weight where the reference keeps W and runs the adapter in
# float32, and deep networks amplify such per-weight roundings layer after layer. Measured with adapters larger
# than the weights they change (a pessimistic case; tools/bench_merge.py, 0.33 B and 0.58 B Qwen2): float16
# 0.41-0.50%, bfloat16 3.2-3.9%, float32 0.00025% of the largest logit, i.e. 8-10 unit roundoffs (2^-11 for
# float16, 2^-8 for bfloat16). The tolerances leave 2.5-4x headroom over that and stay well below what real
# bugs produce (a wrong scale, a missing or transposed update: errors the size of the adapter's own effect,
# printed beside the figure, with a warning whenever the error comes near it).
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}

# bitsandbytes' 4-bit block size; transformers' BitsAndBytesConfig (the run's loader) has no knob for it.
QUANT_BLOCKSIZE = 64

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json")
TOKENIZER_DIRS = ("additional_chat_templates",)

SAMPLE_PROMPTS = (
    "A 45-year-old man has crushing chest pain radiating to his left arm. What is the most likely diagnosis?",
    "What is the first-line treatment for uncomplicated hypertension in adults, and why?",
    "Explain in one sentence why the sky is blue.",
)
MAX_PROMPT_TOKENS = 96

ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|"
                         r"lora_magnitude_vector)$")
# adapter_config.json keys that choose which layers were adapted or how training ran: the saved A, B (and
# DoRA magnitude) already carry their effect, so they do not change the merge.
NEUTRAL_ADAPTER_KEYS = {
    "peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "lora_dropout", "base_model_name_or_path",
    "revision", "task_type", "inference_mode", "peft_version", "auto_mapping", "megatron_core",
    "init_lora_weights", "qalora_group_size", "ensure_weight_tying",
}
# Initialisations that leave the base untouched (PiSSA, OLoRA, CorDA, LoftQ, ... rewrite the base weights).
PLAIN_INITS = (True, False, "gaussian", "eva")
UNSET = (None, False, "", "none", {}, [])

BNB_AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                    ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m qlora_kit.merge",
        description="Merge a run's LoRA adapter into the original 16-bit base weights, shard by shard.",
        epilog="examples:\n  python tools/merge.py runs/medical\n"
               "  python tools/merge.py runs/medical --out merged/ --dtype bfloat16\n"
               "  python tools/merge.py runs/medical --into dequantized",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run directory (holds adapter/ and recipe.toml)")
    parser.add_argument("--out", help="output folder (default: RUN_DIR/merged)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16", help="dtype of the merged weights")
    parser.add_argument("--into", choices=("original", "dequantized"), default="original",
                        help="original: the 16-bit base weights (default). dequantized: the NF4 round trip of them, "
                             "i.e. the weights the adapter was trained against")
    parser.add_argument("--base", help="take base weights from this local folder or hub id instead of the recipe's")
    parser.add_argument("--revision", default="main", help="hub revision for --base (default: main)")
    parser.add_argument("--max-shard-size", type=parse_size, default="1GB", metavar="SIZE",
                        help="largest output shard, e.g. 500MB or 2GB (default 1GB); peak RAM grows with it")
    parser.add_argument("--no-verify", action="store_true", help="skip comparing merged logits with PEFT's")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing merged model in --out")
    return parser.parse_args(argv)


def parse_size(text: str) -> int:
    """'1GB', '500MB', '100KB' or a byte count -> bytes (decimal units, as transformers' max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500MB or 2GB")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[match[2]]
    return int(float(match[1]) * unit)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return merge(args)
    except UserError as error:
        print_user_error(error)
        return getattr(error, "exit_code", EXIT_USER_ERROR)


def merge(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)  # long paths stay on one line in logs
    quiet_libraries()
    started = time.monotonic()
    run = read_run(Path(args.run_dir))
    adapter = read_adapter(run.adapter_dir, run.recipe.model.allow_pickle_weights)
    out = Path(args.out) if args.out else run.dir / "merged"
    dtype_name = args.dtype
    check_output_dir(out, args.overwrite, protected=[run.dir, *local_inputs(run.recipe, args.base)])

    with contextlib.ExitStack() as stack:
        base = locate_base(run.recipe, args.base, args.revision, stack, console)
        expected = expected_architecture(run.recipe) if args.base else None
        plan = plan_merge(run.recipe, base, adapter, args.into, expected)
        tokenizer_dir = tokenizer_source(run, base, console)
        check_free_disk(out, estimated_output_bytes(base, DTYPES[dtype_name], tokenizer_dir))

        console.print(f"[bold]merge mode:[/] {plan.describe()}")
        console.print(f"[bold]adapter:[/] {adapter.describe()}")
        with staging_dir(out) as stage:
            index = write_merged_shards(base, adapter, plan, stage, DTYPES[dtype_name], args.max_shard_size, console)
            write_model_files(base, stage, dtype_name, index, tokenizer_dir)
            merge_peak = peak_rss_gib()
            merge_wall = time.monotonic() - started
            console.print(f"merged {len(index['weight_map'])} tensors into {len(set(index['weight_map'].values()))} "
                          f"shard(s) in {merge_wall:.1f} s, peak RAM so far {merge_peak:.2f} GiB")
            verification = None if args.no_verify else verify(run, base, adapter, plan, stage, dtype_name, console)
            from qlora_kit.model_card import write_model_card

            write_model_card(stage / "README.md", run=run, base=base, adapter=adapter, plan=plan,
                             dtype_name=dtype_name, verification=verification)
        console.print(f"[bold green]written:[/] {out}")
    wall = time.monotonic() - started
    console.print(f"done in {wall:.1f} s · peak RAM {peak_rss_gib():.2f} GiB "
                  f"(merge alone {merge_peak:.2f} GiB{'' if args.no_verify else '; verification loads whole models'})")
    if verification is not None and not verification.passed:
        console.print("[bold red]verification FAILED:[/] the merged model's logits differ from PEFT's beyond the "
                      "tolerance; the folder is written for inspection, do not ship it.")
        return EXIT_VERIFICATION_FAILED
    return 0


def quiet_libraries() -> None:
    """Our progress bar and summary say what matters; the libraries' own bars and advice would bury them."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # peft still calls a transformers method deprecated for v6; nothing a user of merge can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------------------------
# The run directory and its adapter


@dataclass
class Run:
    dir: Path
    recipe: Recipe
    adapter_dir: Path
    summary: dict


# The run directory's names, as qlora_kit.artifacts defines them (not imported from there: it pulls in the
# transformers Trainer, 4 s of imports a merge never needs; tests check the names agree).
ADAPTER_DIR, RECIPE_FILE, SUMMARY_FILE = "adapter", "recipe.toml", "summary.json"


def read_run(run_dir: Path) -> Run:
    from qlora_kit.recipe import load_recipe

    if not run_dir.is_dir():
        raise UserError(f"Run directory not found: {run_dir}", hint="Pass the output.dir of a finished run.")
    missing = [name for name in (ADAPTER_DIR, RECIPE_FILE) if not (run_dir / name).exists()]
    if missing:
        raise UserError(f"{run_dir} is not a finished run: {' and '.join(missing)} missing.",
                        hint="A finished `python -m qlora_kit.run` leaves adapter/ and recipe.toml in output.dir.")
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    return Run(run_dir.resolve(), load_recipe(run_dir / RECIPE_FILE), (run_dir / ADAPTER_DIR).resolve(), summary)


@dataclass
class LoraModule:
    """One adapted Linear layer as the adapter file stores it."""

    name: str
    """Module path in the base model, e.g. model.layers.0.self_attn.q_proj (its weight is `<name>.weight`)."""
    a: torch.Tensor
    """(r, in_features)"""
    b: torch.Tensor
    """(out_features, r)"""
    scale: float
    magnitude: torch.Tensor | None = None
    """DoRA: the trained norm of each output row."""

    def merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (float32) with the update folded in, the same arithmetic as peft's merge."""
        merged = weight + self.scale * (self.b.float() @ self.a.float())
        if self.magnitude is not None:
            # DoRA: each output row is rescaled to its trained magnitude (peft DoraLinearVariant.merge_unsafe).
            merged = (self.magnitude.float() / torch.linalg.norm(merged, dim=1)).unsqueeze(1) * merged
        return merged


@dataclass
class Adapter:
    folder: Path
    config: dict
    modules: dict[str, LoraModule]

    @property
    def kind(self) -> str:
        kind = "DoRA" if self.config.get("use_dora") else "LoRA"
        return f"rs{kind}" if self.config.get("use_rslora") else kind

    def describe(self) -> str:
        c = self.config
        rule = "alpha/sqrt(r)" if c.get("use_rslora") else "alpha/r"
        scales = sorted({m.scale for m in self.modules.values()})
        scale = f"{scales[0]:g}" if len(scales) == 1 else f"{scales[0]:g} to {scales[-1]:g} (rank/alpha patterns)"
        return f"{self.kind} r={c['r']} alpha={c['lora_alpha']} (scale {rule} = {scale}) on {len(self.modules)} layers"


def read_adapter(folder: Path, allow_pickle: bool) -> Adapter:
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} has no adapter_config.json.", hint="The run's adapter/ folder looks incomplete.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    problems = adapter_config_problems(config)
    if problems:
        raise UserError(f"This adapter cannot be merged exactly ({folder}):", problems,
                        hint="merge folds plain low-rank updates (LoRA, rsLoRA, DoRA) of Linear layers only.")
    state = load_adapter_tensors(folder, allow_pickle)
    return Adapter(folder, config, group_lora_modules(state, config, folder))


def adapter_config_problems(config: dict) -> list[str]:
    """Every adapter setting that would make a plain low-rank merge wrong, each named."""
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; only LORA adapters are merged")
    if config.get("init_lora_weights", True) not in PLAIN_INITS:
        problems.append(f"init_lora_weights = {config['init_lora_weights']!r} rewrites the base weights at "
                        "initialisation, so the adapter only fits that rewritten base")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save = {config['modules_to_save']} (whole retrained layers) is not supported")
    for key, value in config.items():
        if key in NEUTRAL_ADAPTER_KEYS or key == "modules_to_save" or value in UNSET:
            continue
        problems.append(f"{key} = {value!r} changes what the adapter computes; merge does not support it")
    return problems


def load_adapter_tensors(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / "adapter_model.safetensors").is_file():
        return load_file(folder / "adapter_model.safetensors")
    if (folder / "adapter_model.bin").is_file():
        if not allow_pickle:
            raise UserError(f"{folder} holds adapter_model.bin (pickle), not safetensors.",
                            hint="Set model.allow_pickle_weights = true in the run's recipe.toml if you trust it.")
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise UserError(f"{folder} has no adapter_model.safetensors.", hint="The run's adapter/ folder looks incomplete.")


def group_lora_modules(state: dict[str, torch.Tensor], config: dict, folder: Path) -> dict[str, LoraModule]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        match = ADAPTER_KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if unknown:
        raise UserError(f"The adapter in {folder} holds tensors that are not LoRA updates of Linear layers:",
                        unknown[:5] + ([f"... and {len(unknown) - 5} more"] if len(unknown) > 5 else []),
                        hint="Embedding LoRA, LoRA biases and fully trained modules are not merged.")
    modules, problems = {}, []
    for name, p in sorted(parts.items()):
        a, b = p.get("lora_A.weight"), p.get("lora_B.weight")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{name}: lora_A/lora_B missing or not a (r x in), (out x r) pair")
            continue
        r, alpha = rank_and_alpha(config, name)
        if r != a.shape[0]:
            problems.append(f"{name}: adapter_config says r = {r} but lora_A has rank {a.shape[0]}")
            continue
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        magnitude = p.get("lora_magnitude_vector")
        if config.get("use_dora") and magnitude is None:
            problems.append(f"{name}: use_dora is set but lora_magnitude_vector is missing")
            continue
        modules[name] = LoraModule(name, a, b, scale, magnitude if config.get("use_dora") else None)
    if problems or not modules:
        raise UserError(f"The adapter in {folder} is inconsistent:", problems or ["it holds no LoRA weights"])
    return modules


def rank_and_alpha(config: dict, module_name: str) -> tuple[int, float]:
    """r and alpha of one module, resolving rank_pattern/alpha_pattern exactly as peft does."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if not rank_pattern and not alpha_pattern:
        return config["r"], config["lora_alpha"]
    from peft.utils.other import get_pattern_key  # importing peft costs seconds: only when patterns are used

    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module_name), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module_name), config["lora_alpha"])
    return r, alpha


# ---------------------------------------------------------------------------------------------------------------
# The base checkpoint


@dataclass(frozen=True)
class TensorInfo:
    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Checkpoint:
    """A model folder's weights, described from the file headers alone (no tensor is read)."""

    folder: Path
    files: list[str]
    tensors: dict[str, TensorInfo]
    config: dict
    pickled: bool
    origin: str
    """Where the weights come from, in words (shown in the output and the model card)."""
    random_init: bool = False
    bnb_states: dict[str, dict[str, str]] = field(default_factory=dict)
    """Pre-quantized bitsandbytes 4-bit base: weight name -> {quantization-state tensor: its file}."""
    _pickle_cache: tuple = field(default=(None, None), repr=False)

    @property
    def quantization(self) -> dict | None:
        return self.config.get("quantization_config")

    def read(self, name: str, file: str | None = None) -> torch.Tensor:
        """One tensor, read on its own: memory holds what the caller keeps, never a whole weight file."""
        path = self.folder / (file or self.tensors[name].file)
        if self.pickled:
            # Unpickling the file's index is the slow part, so the current file stays memory-mapped; cloned
            # because tied weights share storage in .bin files, and safetensors refuses to save shared tensors.
            if self._pickle_cache[0] != path:
                self._pickle_cache = (path, torch.load(path, map_location="cpu", mmap=True, weights_only=True))
            return self._pickle_cache[1][name].clone()
        from safetensors import safe_open

        # A fresh memory map per tensor: the pages it touched leave our RSS when it closes.
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.get_tensor(name)


def locate_base(recipe, base_override: str | None, revision: str, stack: contextlib.ExitStack, console) -> Checkpoint:
    """The base's weights: --base, the recipe's model, or (init = random) the run's seeded random weights."""
    model = recipe.model
    if base_override is None and model.init == "random":
        return rebuild_random_base(recipe, stack, console)
    name, rev = (base_override, revision) if base_override else (model.name, model.revision)
    folder = resolve_model_folder(name, rev, model.allow_pickle_weights)
    return read_checkpoint(folder, model.allow_pickle_weights, origin=name)


def rebuild_random_base(recipe, stack: contextlib.ExitStack, console) -> Checkpoint:
    from qlora_kit.model import random_model

    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qlora_kit-merge-base-")))
    console.print(f"[bold yellow]base:[/] the run used model.init = 'random': rebuilding its RANDOM-INIT weights "
                  f"from {recipe.model.name} with seed {recipe.train.seed} (same seed, same weights) in a temporary "
                  "folder. The result is a demo model, not a useful one.")
    random_model(recipe.model, recipe.train.seed).save_pretrained(folder)
    checkpoint = read_checkpoint(folder, False, origin=f"{recipe.model.name} (random init, seed {recipe.train.seed})")
    checkpoint.random_init = True
    return checkpoint


def resolve_model_folder(name: str, revision: str, allow_pickle: bool) -> Path:
    """A local folder as is; a hub id through the huggingface_hub cache (HF_HUB_OFFLINE is respected)."""
    from qlora_kit.recipe import is_local_reference

    if is_local_reference(name, Path.cwd()):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise UserError(f"Base model folder not found: {name}",
                            hint="Pass --base with the folder (or hub id) that holds the base weights.")
        return folder
    config = hub_file(name, revision, "config.json", required=True)
    folder = config.parent
    index = hub_file(name, revision, "model.safetensors.index.json")
    if index is not None:
        for file in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())):
            hub_file(name, revision, file, required=True)
    elif hub_file(name, revision, "model.safetensors") is None:
        if not allow_pickle:
            where = " in the local cache (HF_HUB_OFFLINE is set)" if hub_offline() else ""
            raise UserError(f"{name} (revision {revision}) has no safetensors weights{where}.",
                            hint="Only safetensors are loaded by default. If the model ships only .bin (pickle) files "
                                 "and you trust them, set model.allow_pickle_weights = true in the run's recipe.toml.")
        index = hub_file(name, revision, "pytorch_model.bin.index.json")
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())) if index else [
            "pytorch_model.bin"]
        for file in files:
            hub_file(name, revision, file, required=True)
    for file in ("generation_config.json", *TOKENIZER_FILES):
        hub_file(name, revision, file)
    return folder


def hub_file(repo: str, revision: str, filename: str, required: bool = False) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except (EntryNotFoundError, LocalEntryNotFoundError) as e:
        if not required:
            return None
        raise UserError(f"Could not get {filename} of {repo} (revision {revision}).",
                        hint="HF_HUB_OFFLINE is set and the file is not in the local cache: download the model first "
                             "or pass --base with a local folder." if hub_offline() else str(e).splitlines()[0]
                        ) from None
    except (HfHubHTTPError, HFValidationError, OSError, ValueError) as e:
        raise UserError(f"Could not reach {repo} (revision {revision}) on the hub: {str(e).splitlines()[0]}",
                        hint="Check the id, the revision and your connection, or pass --base with a local folder."
                        ) from None


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def read_checkpoint(folder: Path, allow_pickle: bool, origin: str) -> Checkpoint:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} has no config.json, so it is not a model folder.",
                        hint="Pass --base with the folder that holds config.json and the weights.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    files, pickled = weight_files(folder, allow_pickle)
    checkpoint = Checkpoint(folder.resolve(), files, {}, config, pickled, origin)
    for file in files:
        for name, (shape, dtype) in scan_weight_file(folder / file, pickled).items():
            checkpoint.tensors[name] = TensorInfo(file, shape, dtype)
    find_bnb_states(checkpoint)
    return checkpoint


def scan_weight_file(path: Path, pickled: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor in one file, from its header (safetensors) or memory map (.bin)."""
    if pickled:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        return {name: (tuple(v.get_shape()), SAFETENSORS_DTYPES.get(v.get_dtype(), torch.uint8))
                for name, v in slices.items()}


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def weight_files(folder: Path, allow_pickle: bool) -> tuple[list[str], bool]:
    """The weight files of a model folder and whether they are pickle (.bin) files."""
    for index_name, single, pickled in (("model.safetensors.index.json", "model.safetensors", False),
                                        ("pytorch_model.bin.index.json", "pytorch_model.bin", True)):
        if (folder / index_name).is_file():
            files = sorted(set(json.loads((folder / index_name).read_text(encoding="utf-8"))["weight_map"].values()))
        elif (folder / single).is_file():
            files = [single]
        else:
            continue
        if pickled and not allow_pickle:
            raise UserError(f"{folder} holds only .bin (pickle) weights; pickle can run arbitrary code.",
                            hint="Convert the weights to safetensors, or set model.allow_pickle_weights = true in the "
                                 "run's recipe.toml if you trust the files.")
        return files, pickled
    raise UserError(f"{folder} has no model weights (model.safetensors or model.safetensors.index.json).",
                    hint="Pass --base with the folder (or hub id) that holds the 16-bit base weights.")


def find_bnb_states(checkpoint: Checkpoint) -> None:
    """Pre-quantized bitsandbytes 4-bit bases store each weight as packed bytes plus state tensors: record
    them, and give the weight its real (dequantized) shape and dtype."""
    states = [n for n in checkpoint.tensors if n.endswith((".quant_state.bitsandbytes__nf4",
                                                           ".quant_state.bitsandbytes__fp4"))]
    if not states:
        return
    from bitsandbytes.utils import unpack_tensor_to_dict

    for name in states:
        weight = name.split(".quant_state.")[0]
        state = unpack_tensor_to_dict(checkpoint.read(name))
        aux_names = [weight + s for s in BNB_AUX_SUFFIXES if weight + s in checkpoint.tensors]
        checkpoint.bnb_states[weight] = {aux: checkpoint.tensors[aux].file for aux in aux_names}
        checkpoint.tensors[weight] = dataclasses.replace(checkpoint.tensors[weight], shape=tuple(state["shape"]),
                                                         dtype=getattr(torch, state["dtype"]))
    for aux_files in checkpoint.bnb_states.values():
        for aux in aux_files:
            del checkpoint.tensors[aux]  # folded into their weight: not written to the output


def expected_architecture(recipe) -> dict | None:
    """model_type/architectures of the model the run trained on, when its config can be read offline-safely."""
    from qlora_kit.recipe import is_local_reference

    name = recipe.model.name
    try:
        if is_local_reference(name, Path.cwd()):
            path = Path(name).expanduser() / "config.json"
        else:
            path = hub_file(name, recipe.model.revision, "config.json")
        config = json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else None
    except (UserError, OSError, ValueError):
        return None
    return {k: config.get(k) for k in ("model_type", "architectures")} if config else None


# ---------------------------------------------------------------------------------------------------------------
# The plan, and the checks that must pass before anything is written


@dataclass
class MergePlan:
    into: str
    """`original` or `dequantized`."""
    quant_type: str = ""
    double_quant: bool = False
    round_trip: set[str] = field(default_factory=set)
    """Weights that get the NF4 quantize -> dequantize round trip (dequantized mode, 16-bit base)."""
    prequantized: bool = False

    def describe(self) -> str:
        if self.into == "original":
            return "ORIGINAL 16-bit base weights + LoRA update (default)"
        if self.prequantized:
            return "DEQUANTIZED weights of the pre-quantized bitsandbytes 4-bit base + LoRA update (--into dequantized)"
        return (f"DEQUANTIZED {self.quant_type.upper()} weights + LoRA update (--into dequantized): the "
                f"{len(self.round_trip)} Linear weights the run quantized are quantized exactly as it did "
                f"({self.quant_type}, blocksize {QUANT_BLOCKSIZE}, double quant "
                f"{'on' if self.double_quant else 'off'}) and dequantized; embeddings, norms, lm_head and biases "
                "stay original")


def plan_merge(recipe, base: Checkpoint, adapter: Adapter, into: str, expected: dict | None) -> MergePlan:
    check_architecture(base, expected)
    plan = MergePlan(into)
    quantization = base.quantization
    if quantization:
        method = quantization.get("quant_method", "unknown")
        is_bnb_4bit = method == "bitsandbytes" and quantization.get("load_in_4bit") and base.bnb_states
        if into == "original" or not is_bnb_4bit:
            raise UserError(f"The base at {base.folder} is itself quantized ({method}); merging needs its "
                            "16-bit weights.",
                            hint="Pass --base with the original 16-bit model (the usual fix). A bitsandbytes 4-bit "
                                 "base can instead be merged with --into dequantized.")
        plan.prequantized = True
    elif into == "dequantized":
        if not recipe.quant.load_in_4bit:
            raise UserError("--into dequantized: this run did not quantize its base (quant.load_in_4bit = false).",
                            hint="Merge into the original weights (the default): they are what the run trained on.")
        plan.quant_type, plan.double_quant = recipe.quant.quant_type, recipe.quant.double_quant
        plan.round_trip = quantized_weight_names(base, recipe)
    check_adapter_fits(base, adapter)
    return plan


def check_architecture(base: Checkpoint, expected: dict | None) -> None:
    if not expected:
        return
    found = {k: base.config.get(k) for k in expected}
    if any(expected[k] and found[k] and expected[k] != found[k] for k in expected):
        raise UserError(f"The base at {base.folder} is a different architecture from the run's model.",
                        [f"run trained on: {expected}", f"--base has: {found}"],
                        hint="Pass --base with the same model the run trained on.")


def check_adapter_fits(base: Checkpoint, adapter: Adapter) -> None:
    """Every adapted module must exist in the base with the shape the adapter was trained on."""
    problems = []
    for name, module in adapter.modules.items():
        info = base.tensors.get(f"{name}.weight")
        want = (module.b.shape[0], module.a.shape[1])
        if info is None:
            tied = name.endswith("lm_head") and base.config.get("tie_word_embeddings")
            problems.append(f"{name}: no `{name}.weight` in the base" + (" (lm_head is tied to the embeddings)"
                                                                          if tied else ""))
        elif info.shape != want:
            problems.append(f"{name}: the base weight is {list(info.shape)}, the adapter expects {list(want)}")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise UserError(f"The adapter does not fit the base at {base.folder} "
                        f"({len(problems)} of {len(adapter.modules)} layers):", shown,
                        hint="The adapter was trained on another model: pass --base with the run's base model.")


def quantized_weight_names(base: Checkpoint, recipe) -> set[str]:
    """The Linear weights the run's 4-bit loader quantized, found the way transformers decides it (on an empty
    meta-device skeleton): every nn.Linear except the output head, tied weights and keep-in-fp32 modules."""
    import bitsandbytes as bnb
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    config = AutoConfig.from_pretrained(base.folder, trust_remote_code=recipe.model.trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    quantizer = AutoHfQuantizer.from_config(BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=recipe.quant.quant_type,
        bnb_4bit_use_double_quant=recipe.quant.double_quant), pre_quantized=False)
    quantizer.preprocess_model(skeleton, device_map={"": "cpu"})
    names = {f"{n}.weight" for n, m in skeleton.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    unmatched = sorted(names - base.tensors.keys())
    if unmatched:
        raise UserError("--into dequantized: the checkpoint's tensor names differ from the model's module names, "
                        f"so the quantized layers cannot be found (e.g. {unmatched[0]}).",
                        hint="Merge into the original weights (the default) instead.")
    return names


def local_inputs(recipe, base_override: str | None) -> list[Path]:
    """The local folders the merge reads from: --overwrite must never delete one of them."""
    from qlora_kit.recipe import is_local_reference

    names = [recipe.model.name, recipe.model.tokenizer, base_override]
    return [Path(n).expanduser().resolve() for n in names if n and is_local_reference(n, Path.cwd())]


def check_output_dir(out: Path, overwrite: bool, protected: list[Path]) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder.", hint="Choose another --out.")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"The output folder {out} exists and is not empty.",
                        hint="Choose another --out, or pass --overwrite to replace a previous merge there.")
    resolved = out.resolve()
    if any(resolved == p or resolved in p.parents for p in protected):
        raise UserError(f"--overwrite would delete {out}, which holds the run or the base model.",
                        hint="Choose an --out folder of its own.")
    if not (out / "config.json").is_file():
        raise UserError(f"--overwrite: {out} does not look like a merged model (no config.json); not deleting it.",
                        hint="Empty it yourself or choose another --out.")


def estimated_output_bytes(base: Checkpoint, dtype: torch.dtype, tokenizer_dir: Path | None) -> int:
    weights = sum(output_bytes(t, dtype) for t in base.tensors.values())
    tokenizer = sum(f.stat().st_size for f in tokenizer_files(tokenizer_dir)) if tokenizer_dir else 0
    return weights + tokenizer + 1_000_000  # + config, index and model card


def check_free_disk(out: Path, needed: int) -> None:
    """Refuse before writing when the disk cannot hold the output; a full disk mid-merge wastes the time spent."""
    probe = out.resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise UserError(f"Not enough free disk for the merged model: it needs about {needed / 1024**3:.2f} GiB, "
                        f"{probe} has {free / 1024**3:.2f} GiB free.",
                        hint="Free some space, choose --out on another disk, or merge to a smaller --dtype.")


# ---------------------------------------------------------------------------------------------------------------
# Writing


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """Write into a sibling folder and move it into place at the end: an interrupted merge never leaves a
    half-written folder that looks like a model, and a failed one leaves nothing at all."""
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in created:  # deepest first; rmdir only removes them while empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    usual_permissions(stage)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        stage.rename(out)


def usual_permissions(folder: Path) -> None:
    """mkdtemp and safetensors create owner-only folders and files; a model folder is normally shared like
    any other, so apply the user's umask as mkdir/open would have."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_merged_shards(base: Checkpoint, adapter: Adapter, plan: MergePlan, stage: Path, dtype: torch.dtype,
                        max_shard_bytes: int, console) -> dict:
    """Stream the base one output shard at a time: read its tensors, fold in the updates, write it, free it.
    Output shards are cut by size, not copied from the base, whose single files can be most of the model
    (R1-Distill-Qwen-1.5B ships one 3.5 GB file)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from safetensors.torch import save_file

    shards = plan_output_shards(base, dtype, max_shard_bytes)
    weight_map, total_size = {}, 0
    columns = (TextColumn("[bold]merging shards"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("", total=len(shards))
        for i, names in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            progress.update(task, description=file)
            shard = {name: merged_tensor(name, base, adapter, plan, dtype) for name in names}
            save_file(shard, stage / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            total_size += sum(t.numel() * t.element_size() for t in shard.values())
            del shard  # freed here, by reference count: nothing else holds the tensors
            progress.advance(task)
    base._pickle_cache = (None, None)
    return {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}


def plan_output_shards(base: Checkpoint, dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per output shard, in the base's file order (sequential reads), each shard at most
    max_shard_bytes unless one tensor alone is larger."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, info in base.tensors.items():
        nbytes = output_bytes(info, dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def output_bytes(info: TensorInfo, dtype: torch.dtype) -> int:
    return math.prod(info.shape) * (dtype.itemsize if info.dtype.is_floating_point else info.dtype.itemsize)


def merged_tensor(name: str, base: Checkpoint, adapter: Adapter, plan: MergePlan, dtype: torch.dtype) -> torch.Tensor:
    tensor = base.read(name)
    if name in base.bnb_states:
        tensor = dequantize_stored(base, name, tensor)
    elif name in plan.round_trip:
        tensor = nf4_round_trip(tensor, plan.quant_type, plan.double_quant)
    module = adapter.modules.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
    if module is not None:
        tensor = module.merge_into(tensor.float())
    if not tensor.is_floating_point():
        return tensor.contiguous()
    if dtype == torch.float16 and tensor.dtype != torch.float16 and tensor.numel():
        # A reduction, not isfinite(): no full-size temporaries (isfinite on a large tensor costs 2.5x its size).
        low, high = torch.aminmax(tensor)
        if max(-float(low), float(high)) > torch.finfo(torch.float16).max:
            raise UserError(f"{name} has values beyond float16's range (±65504) after merging.",
                            hint="Merge with --dtype bfloat16 (same range as float32).")
    return tensor.to(dtype).contiguous()


def nf4_round_trip(weight: torch.Tensor, quant_type: str, double_quant: bool) -> torch.Tensor:
    """The weight as the run's 4-bit layer saw it, in float32. bitsandbytes picks the same 4-bit codes whether
    it is given bf16 or fp32 values (checked), so quantizing the float32 copy reproduces the run exactly."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.float().contiguous(), blocksize=QUANT_BLOCKSIZE,
                                       compress_statistics=double_quant, quant_type=quant_type)
    return bnbf.dequantize_4bit(packed, state).float()


def dequantize_stored(base: Checkpoint, name: str, packed: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    state = {aux.removeprefix(name + "."): base.read(aux, file) for aux, file in base.bnb_states[name].items()}
    return bnbf.dequantize_4bit(packed, bnbf.QuantState.from_dict(state, device=torch.device("cpu"))).float()


def write_model_files(base: Checkpoint, stage: Path, dtype_name: str, index: dict, tokenizer_dir: Path | None) -> None:
    (stage / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (stage / "config.json").write_text(json.dumps(merged_config(base.config, dtype_name), indent=2) + "\n",
                                       encoding="utf-8")
    generation = base.folder / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, stage / "generation_config.json")
    else:
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(stage)).save_pretrained(stage)
    for file in tokenizer_files(tokenizer_dir):
        target = stage / file.relative_to(tokenizer_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)  # bytes as the base ships them: no re-save through transformers


def merged_config(config: dict, dtype_name: str) -> dict:
    """The base's config.json, unquantized and in the merged dtype; everything else untouched."""
    merged = {k: v for k, v in config.items() if k not in ("quantization_config", "_pre_quantization_dtype")}
    merged["dtype"] = dtype_name
    if "torch_dtype" in merged:  # older transformers read this name
        merged["torch_dtype"] = dtype_name
    return merged


def tokenizer_source(run: Run, base: Checkpoint, console) -> Path | None:
    """The folder whose tokenizer files are copied: the recipe's tokenizer, else the base's own; the run's
    re-saved copy in adapter/ only when there is no other."""
    model = run.recipe.model
    if model.tokenizer:
        folder = resolve_tokenizer_folder(model.tokenizer, model.revision)
    elif base.random_init:  # the rebuilt weights live in a temporary folder; the tokenizer beside the config
        folder = resolve_tokenizer_folder(model.name, model.revision)
    else:
        folder = base.folder
    if folder is not None and tokenizer_files(folder):
        return folder
    console.print(f"[yellow]note:[/] the base ships no tokenizer files; copying the run's copy from {run.adapter_dir}.")
    return run.adapter_dir if tokenizer_files(run.adapter_dir) else None


def resolve_tokenizer_folder(location: str, revision: str) -> Path | None:
    from qlora_kit.recipe import is_local_reference

    if is_local_reference(location, Path.cwd()):
        folder = Path(location).expanduser()
        return folder if folder.is_dir() else None
    found = [hub_file(location, revision, name) for name in TOKENIZER_FILES]
    found = [f for f in found if f is not None]
    return found[0].parent if found else None


def tokenizer_files(folder: Path | None) -> list[Path]:
    if folder is None:
        return []
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    for sub in TOKENIZER_DIRS:
        if (folder / sub).is_dir():
            files += sorted(p for p in (folder / sub).rglob("*") if p.is_file())
    return files


# ---------------------------------------------------------------------------------------------------------------
# Verification: the merged folder must compute what PEFT computes with the unmerged adapter


@dataclass
class Verification:
    dtype: str
    reference: str
    device: str
    prompts: int
    positions: int
    max_abs_diff: float
    max_abs_logit: float
    adapter_effect: float
    top1_agreement: float

    @property
    def tolerance(self) -> float:
        return RELATIVE_TOLERANCE[self.dtype] * self.max_abs_logit

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{self.prompts} prompts, {self.positions} positions: max |Δlogit| {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:.3g} = {RELATIVE_TOLERANCE[self.dtype]:g} x largest logit "
                f"{self.max_abs_logit:.3g}), top-1 agreement {100 * self.top1_agreement:.1f}%, "
                f"adapter effect {self.adapter_effect:.3g} → {verdict}")


def verify(run: Run, base: Checkpoint, adapter: Adapter, plan: MergePlan, merged_dir: Path, dtype_name: str,
           console) -> Verification:
    from transformers import AutoTokenizer

    trust = run.recipe.model.trust_remote_code
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=trust)
    prompts = [encode_prompt(tokenizer, p) for p in SAMPLE_PROMPTS]
    console.print(f"verifying on {device}: {len(prompts)} prompts through base + adapter (PEFT) and the merged "
                  f"folder, one model at a time, in {dtype_name}")
    reference, without_adapter = reference_logits(run, base, adapter, plan, dtype_name, prompts, device)
    merged = merged_logits(merged_dir, trust, prompts, device)
    result = compare_logits(reference, merged, without_adapter, dtype_name, device,
                            "PEFT on the NF4 base, as trained" if plan.into == "dequantized"
                            else "PEFT on the original 16-bit base")
    style = "green" if result.passed else "red"
    console.print(f"[bold {style}]verification:[/] {result.describe()}")
    if result.passed and result.max_abs_diff > 0.5 * result.adapter_effect > 0:
        console.print(f"[yellow]note:[/] the merge error is comparable to the adapter's whole effect: {dtype_name} "
                      "rounding swallows part of this (small) update; --dtype float32 keeps it.")
    return result


def encode_prompt(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids of a user turn rendered with the chat template (which adds BOS itself), else plain text."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([ids[:MAX_PROMPT_TOKENS]])


def reference_logits(run: Run, base: Checkpoint, adapter: Adapter, plan: MergePlan, dtype_name: str,
                     prompts: list[torch.Tensor], device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logits of base + unmerged adapter as PEFT applies it, and of the base alone (the adapter's effect)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype, recipe = DTYPES[dtype_name], run.recipe
    kwargs = dict(dtype=dtype, device_map={"": device}, trust_remote_code=recipe.model.trust_remote_code,
                  use_safetensors=not base.pickled)
    if plan.into == "dequantized" and not plan.prequantized:
        # The run's own 4-bit model: bitsandbytes dequantizes each weight inside the forward pass.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=plan.quant_type, bnb_4bit_use_double_quant=plan.double_quant,
            bnb_4bit_compute_dtype=dtype)
    base_model = AutoModelForCausalLM.from_pretrained(base.folder, **kwargs)
    if device == "cpu":
        # bitsandbytes' CPU inference path would repack the 4-bit weights and compute in bfloat16 whatever the
        # compute dtype; training ran the plain dequantize-then-matmul path, so the reference must as well.
        from qlora_kit.model import keep_cpu_weights_trainable

        keep_cpu_weights_trainable(base_model)
    model = PeftModel.from_pretrained(base_model, adapter.folder)
    try:
        with_adapter = run_prompts(model, prompts, device)
        with model.disable_adapter():
            without_adapter = run_prompts(model, prompts, device)
    finally:
        del model
        free_memory()
    return with_adapter, without_adapter


def merged_logits(merged_dir: Path, trust_remote_code: bool, prompts: list[torch.Tensor], device: str):
    from transformers import AutoModelForCausalLM

    # Plain loading, dtype from config.json: exactly what a user of the merged folder does.
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto", device_map={"": device},
                                                 trust_remote_code=trust_remote_code)
    try:
        return run_prompts(model, prompts, device)
    finally:
        del model
        free_memory()


@torch.inference_mode()
def run_prompts(model, prompts: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=ids.to(device)).logits[0].float().cpu() for ids in prompts]


def compare_logits(reference: list[torch.Tensor], merged: list[torch.Tensor], without_adapter: list[torch.Tensor],
                   dtype_name: str, device: str = "cpu", what: str = "") -> Verification:
    positions = sum(r.shape[0] for r in reference)
    agree = sum(int((r.argmax(-1) == m.argmax(-1)).sum()) for r, m in zip(reference, merged, strict=True))
    return Verification(
        dtype=dtype_name, reference=what, device=device, prompts=len(reference), positions=positions,
        max_abs_diff=max(float((r - m).abs().max()) for r, m in zip(reference, merged, strict=True)),
        max_abs_logit=max(float(r.abs().max()) for r in reference),
        adapter_effect=max(float((r - b).abs().max()) for r, b in zip(reference, without_adapter, strict=True)),
        top1_agreement=agree / positions)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return getattr(psutil.Process().memory_info(), "peak_wset", psutil.Process().memory_info().rss) / 1024**3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**3 if sys.platform == "darwin" else peak / 1024**2


if __name__ == "__main__":
    sys.exit(main())
