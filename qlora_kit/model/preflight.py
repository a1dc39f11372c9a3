"""Pre-flight: refuse a model that cannot serve this recipe, before anything is written or a weight is loaded.

    check_model_files(model)         the local folder: present, a config.json, safetensors, no code to run
    check_model_matches(recipe, tk)  config.json (read once) against the recipe: the tokenizer's ids fit the
                                     embedding, and every lora.target_modules name is a layer of the model

An unreadable config is left to the loader, which reports it with its own message (model.py).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import torch

from qlora_kit.errors import UserError
from qlora_kit.recipe.schema import ModelSection, Recipe

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def check_model_files(model: ModelSection) -> None:
    """Refuse a local model folder that cannot load safely, before anything is written or loaded:
    missing, no config.json, pickle-only weights, code that would have to run."""
    from transformers import CONFIG_MAPPING

    folder = Path(model.name).expanduser()
    if not folder.is_absolute() and not folder.exists():
        return  # a hub id: checked when it is fetched
    if not folder.is_dir():
        raise UserError(f"The model folder does not exist: {folder}",
                        hint="Set model.name to a local folder with config.json, or a hub id.")
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} has no config.json, so it is not a model folder.",
                        hint="Point model.name at the folder that holds config.json and the weights.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path} is not valid JSON ({e}).") from None
    if config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING and not model.trust_remote_code:
        raise UserError(f"{folder} needs its own Python code to load (config.json has auto_map, model_type "
                        f"{config.get('model_type')!r} is not built into transformers).",
                        hint="Read that code first; set model.trust_remote_code = true only if you trust it.")
    if model.init == "random" or model.gguf_file:
        return  # no weights to check: built from the seed, or dequantized from the GGUF when training starts
    files = [p.name for p in folder.iterdir()]
    if not any(name.endswith(".safetensors") for name in files):
        pickled = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
        if not pickled:
            raise UserError(f"{folder} has no weight files.",
                            hint="Download the weights, or set model.init = 'random' for a config-only folder.")
        if not model.allow_pickle_weights:
            raise UserError(f"{folder} has only pickle weights ({', '.join(sorted(pickled)[:3])}): loading them "
                            "can run arbitrary code.",
                            hint="Convert them to safetensors, or set model.allow_pickle_weights = true if you "
                                 "trust their source.")


def check_model_matches(recipe: Recipe, tokenizer) -> None:
    if recipe.model.trust_remote_code:
        return  # building the config or a skeleton would run the model's code; load_model does, where asked
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(recipe.model.name, revision=recipe.model.revision)
    except Exception:  # noqa: BLE001 - an unreadable model is reported where it is loaded, with its own message
        return
    check_tokenizer_fits(recipe, tokenizer, config.vocab_size)
    check_lora_targets(recipe, config)


def check_tokenizer_fits(recipe: Recipe, tokenizer, vocab: int | None) -> None:
    """More tokens than embedding rows: the higher ids would crash the lookup at the first step (an IndexError
    deep inside torch)."""
    if vocab and len(tokenizer) > vocab:
        raise UserError(f"The tokenizer ({recipe.model.tokenizer or recipe.model.name}) has {len(tokenizer):,} tokens, "
                        f"but the model's embedding has {vocab:,} rows: ids from {vocab:,} up cannot be looked up.",
                        hint="Use the model's own tokenizer (leave model.tokenizer empty), or a model whose "
                             "vocabulary matches this tokenizer.")


def check_lora_targets(recipe: Recipe, config) -> None:
    """Every target must name a layer; the names come from the model built on the meta device (no memory)."""
    targets = recipe.lora.target_modules
    if targets == ["all-linear"]:
        return
    from transformers import AutoModelForCausalLM

    from qlora_kit.model.loading import linear_layer_names

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - not a causal LM transformers can build: the loader says so
        return
    # Any module name peft can match (it also adapts embeddings and convolutions); whether it can adapt that
    # layer type is peft's to say. The suggestions are the Linear layers, what LoRA usually targets.
    names = [name for name, _ in skeleton.named_modules() if name]
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if missing:
        leaves = linear_layer_names(skeleton)
        problems = []
        for target in missing:
            close = difflib.get_close_matches(target, leaves, n=1, cutoff=0.6)
            problems.append(f"`{target}` is not a layer of {config.model_type}"
                            + (f" (did you mean `{close[0]}`?)" if close else ""))
        raise UserError("lora.target_modules names layers this model does not have:", problems,
                        hint=f"Its Linear layers: {', '.join(leaves)}; or use 'all-linear'.")
