"""Reading and writing recipes: TOML files, `key=value` overrides, validation, the resolved TOML a run keeps.

Loading reports *every* problem at once (unknown keys with a "did you mean", wrong types,
impossible values), each naming its key, so a user fixes a recipe in one round trip.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from qlora_kit.errors import UserError, did_you_mean
from qlora_kit.recipe.schema import (
    LOSS_TYPES,
    PREFERENCE_METHODS,
    REWARD_NAMES,
    TRACKERS,
    ModelSection,
    Recipe,
    is_local_reference,
)

CHOICES: dict[str, tuple[str, ...]] = {
    "model.init": ("pretrained", "random"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2", "flash_attention_3"),
    "quant.quant_type": ("nf4", "fp4"),
    "quant.compute_dtype": ("auto", "bfloat16", "float16", "float32"),
    "data.over_length": ("drop", "error", "truncate"),
    "data.layout": ("auto", "columns", "alpaca", "sharegpt"),
    "data.hub": ("huggingface", "modelscope"),
    "model.hub": ("huggingface", "modelscope"),
    "train.method": ("sft", "grpo", *PREFERENCE_METHODS),
    "grpo.loss_type": ("dapo", "grpo", "dr_grpo", "bnpo"),
    "train.lr_scheduler": ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts",
                           "polynomial", "inverse_sqrt"),
}

# Each value must satisfy the check; the message says what was expected.
RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "lora.r": (lambda v: v >= 1, "at least 1"),
    "lora.alpha": (lambda v: v >= 1, "at least 1"),
    "lora.dropout": (lambda v: 0 <= v < 1, "between 0 and 1"),
    "data.max_length": (lambda v: v >= 16, "at least 16 tokens"),
    "data.limit": (lambda v: v >= 0, "0 (all rows) or more"),
    "data.eval_rows": (lambda v: v >= 0, "0 or more"),
    "train.epochs": (lambda v: v > 0, "greater than 0"),
    "train.max_steps": (lambda v: v >= 0, "0 (use epochs) or more"),
    "train.batch_size": (lambda v: v >= 1, "at least 1"),
    "train.grad_accum": (lambda v: v >= 1, "at least 1"),
    "train.learning_rate": (lambda v: 0 < v < 1, "between 0 and 1, e.g. 2e-4"),
    "train.warmup": (lambda v: v >= 0, "0 or more"),
    "train.weight_decay": (lambda v: v >= 0, "0 or more"),
    "train.max_grad_norm": (lambda v: v >= 0, "0 or more"),
    "train.logging_steps": (lambda v: v >= 1, "at least 1"),
    "train.eval_steps": (lambda v: v >= 0, "0 (end only) or more"),
    "train.save_steps": (lambda v: v >= 0, "0 (only on interrupt) or more"),
    "train.save_total_limit": (lambda v: v >= 1, "at least 1"),
    "output.preview_rows": (lambda v: v >= 0, "0 or more"),
    "samples.count": (lambda v: v >= 0, "0 (none) or more"),
    "samples.max_new_tokens": (lambda v: v >= 1, "at least 1"),
    "eval.limit": (lambda v: v >= 0, "0 (all questions) or more"),
    "grpo.num_generations": (lambda v: v >= 2, "at least 2 (GRPO compares completions within a group)"),
    "grpo.max_completion_length": (lambda v: v >= 1, "at least 1 token"),
    "grpo.temperature": (lambda v: v > 0, "greater than 0"),
    "grpo.top_p": (lambda v: 0 < v <= 1, "above 0 and at most 1"),
    "grpo.beta": (lambda v: v >= 0, "0 (no reference model) or more"),
    "grpo.length_cache": (lambda v: v >= 0, "0 (a quarter of max_completion_length) or more"),
    "pref.beta": (lambda v: v > 0, "greater than 0, e.g. 0.1"),
    "pref.desirable_weight": (lambda v: v > 0, "greater than 0"),
    "pref.undesirable_weight": (lambda v: v > 0, "greater than 0"),
}

SECTIONS = {f.name: f.type for f in dataclasses.fields(Recipe) if f.name != "source_path"}


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, apply `section.key=value` overrides, validate, and resolve local paths."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Recipe file not found: {path}",
                        hint="Pass the path of a .toml recipe, e.g. recipes/demo.toml.")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}",
                        hint="Fix that line (strings need quotes, each [section] once); recipes/medical.toml "
                             "shows the layout.") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text.", hint="Save the recipe as UTF-8.") from None
    recipe = recipe_from_dict(raw, overrides, where=str(path))
    recipe.source_path = str(path.resolve())
    _resolve_local_paths(recipe, path.resolve().parent)
    normalize_gguf_reference(recipe.model, path.resolve().parent)
    return recipe


def recipe_from_dict(raw: dict[str, Any], overrides=(), where: str = "recipe") -> Recipe:
    """Build a validated Recipe from parsed TOML plus overrides; raises one UserError listing every problem."""
    problems: list[str] = []
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        _apply_override(raw, item, problems)

    recipe = Recipe()
    for section_name, values in raw.items():
        if section_name not in SECTIONS:
            problems.append(f"unknown section [{section_name}]{did_you_mean(section_name, SECTIONS)}")
            continue
        if not isinstance(values, dict):
            problems.append(f"`{section_name}` must be a table ([{section_name}]), got {values!r}")
            continue
        if section_name == "sft":
            recipe.sft = dict(values)
            continue
        section = getattr(recipe, section_name)
        hints = typing.get_type_hints(type(section))
        for key, value in values.items():
            full = f"{section_name}.{key}"
            if key not in hints:
                problems.append(f"unknown key `{full}`{did_you_mean(key, hints, prefix=section_name + '.')}")
                continue
            coerced, error = _coerce(value, hints[key])
            if error:
                problems.append(f"`{full}` {error}, got {value!r}")
                continue
            setattr(section, key, coerced)
    problems += _check_values(recipe)
    if problems:
        source = f"{where} with the command-line overrides" if overrides else where
        count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        raise UserError(f"{source}: {count} in the recipe:", problems,
                        hint="Fix the keys above (docs/recipe.md lists every key).")
    return recipe


def _apply_override(raw: dict, item: str, problems: list[str]) -> None:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        problems.append(f"override `{item}` must look like section.key=value, e.g. train.max_steps=50")
        return
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if _takes_list_or_table(parts[0], parts[1]):
            if text.strip().startswith(("[", "{")):  # e.g. lora.target_modules=[q_proj: a broken list, not text
                problems.append(f"override `{item}`: `{key.strip()}` takes a list, and this is not a valid TOML "
                                f'one; write it like {key.strip()}=["a","b"] (quote the whole argument in the shell)')
                return
            # Bare words are the list's items: output.report_to=tensorboard, lora.target_modules=q_proj,v_proj.
            text = "[" + ",".join(f'"{word.strip()}"' for word in text.split(",") if word.strip()) + "]"
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                problems.append(f"override `{item}`: `{key.strip()}` takes a list of names, e.g. "
                                f'{key.strip()}=["a","b"]')
                return
            raw.setdefault(parts[0], {})[parts[1]] = value
            return
        # A bare word is the common case for strings (data.source=rows.jsonl, data.format={question} ...).
        value = _bare_text(f"{parts[0]}.{parts[1]}", text)
    raw.setdefault(parts[0], {})
    if isinstance(raw[parts[0]], dict):
        raw[parts[0]][parts[1]] = value


TEMPLATE_KEYS = ("data.format", "data.system_prompt")
"""Text keys whose bare command-line values get TOML's escapes: the shell strips the quotes of
data.format="Q: {question}\nA: {response}", and a literal backslash-n is never what a template means."""


def _bare_text(key: str, text: str) -> str:
    if key not in TEMPLATE_KEYS or "\\" not in text:
        return text
    try:
        return tomllib.loads('v = "' + text.replace('"', '\\"') + '"')["v"]
    except tomllib.TOMLDecodeError:
        return text


def _takes_list_or_table(section: str, key: str) -> bool:
    section_type = typing.get_type_hints(Recipe).get(section)
    if not dataclasses.is_dataclass(section_type):  # [sft] is a free table, an unknown section is reported later
        return False
    annotation = typing.get_type_hints(section_type).get(key)
    return typing.get_origin(annotation) in (list, dict)


def _coerce(value: Any, annotation: Any) -> tuple[Any, str]:
    """Return (value, "") if `value` fits the field type, else (None, "must be ...")."""
    if annotation is bool:
        return (value, "") if isinstance(value, bool) else (None, "must be true or false")
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (value, "") if ok else (None, "must be a whole number")
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (float(value), "") if ok else (None, "must be a number")
    if annotation is str:
        return (value, "") if isinstance(value, str) else (None, "must be a string (in quotes)")
    if typing.get_origin(annotation) is list:
        # A single string is accepted for convenience: target_modules = "all-linear".
        if isinstance(value, str):
            return [value], ""
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value), ""
        return None, "must be a string or a list of strings"
    if isinstance(annotation, types.GenericAlias) or typing.get_origin(annotation) is dict:
        return (value, "") if isinstance(value, dict) else (None, "must be a table")
    raise TypeError(f"no coercion for {annotation}")  # our bug, not the user's


def _check_values(recipe: Recipe) -> list[str]:
    problems = []
    for full, allowed in CHOICES.items():
        value = _get(recipe, full)
        if value not in allowed:
            problems.append(f"`{full}` must be one of {', '.join(allowed)}, got {value!r}"
                            f"{did_you_mean(str(value), allowed)}")
    for full, (check, expected) in RANGES.items():
        value = _get(recipe, full)
        if not check(value):
            problems.append(f"`{full}` must be {expected}, got {value!r}")
    if not recipe.lora.target_modules:
        problems.append('`lora.target_modules` is empty: name the layers that get adapters, or "all-linear"')
    data = recipe.data
    if not data.source:
        problems.append("`data.source` is empty: name a data file or a hub data set id")
    if data.format not in ("chat", "plain"):
        problems += [f"`data.format` {p}" for p in template_problems(data.format)]
    problems += [f"`output.report_to` has {name!r}: one of {', '.join(TRACKERS)} expected"
                 f"{did_you_mean(str(name), TRACKERS)}" for name in recipe.output.report_to if name not in TRACKERS]
    if recipe.train.eval_steps and not data.eval_rows and not data.eval_source:
        problems.append("`train.eval_steps` is set but `data.eval_rows` is 0: hold out rows to evaluate on")
    if recipe.memory.tiled_mlp and recipe.distributed.fsdp:
        problems.append("`memory.tiled_mlp` does not work with `distributed.fsdp` (its per-slice backward would run "
                        "FSDP's gradient hooks once per slice): turn one of them off")
    problems += grpo_problems(recipe)
    problems += preference_problems(recipe)
    if recipe.sft:
        from qlora_kit.recipe.trainer_arguments import sft_table_problems

        problems += sft_table_problems(recipe.sft)
    return problems


def grpo_problems(recipe: Recipe) -> list[str]:
    """The [grpo] section against itself and the rest of the recipe (its keys matter only with method = grpo,
    but a broken reward table is reported either way: it would fail the day the method is switched)."""
    g, t = recipe.grpo, recipe.train
    problems = []
    for name, weight in g.rewards.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            problems.append(f"`grpo.rewards.{name}` must be a number (the reward's weight), got {weight!r}")
        if name not in REWARD_NAMES and not is_reward_file(name):
            problems.append(f"`grpo.rewards` has {name!r}: one of {', '.join(REWARD_NAMES)} expected, or your own "
                            f'as "path/to/file.py:function"{did_you_mean(name, REWARD_NAMES)}')
    if g.rewards and not any(w for w in g.rewards.values() if isinstance(w, (int, float))):
        problems.append("`grpo.rewards` gives every reward weight 0: GRPO would have nothing to learn from")
    if g.length_cache >= g.max_completion_length:
        problems.append(f"`grpo.length_cache` ({g.length_cache}) must be below grpo.max_completion_length "
                        f"({g.max_completion_length})")
    if t.method != "grpo":
        if recipe.model.adapter and t.method == "sft":
            problems.append("`model.adapter` (start from a trained adapter) is for GRPO and preference tuning; an SFT "
                            "run starts from a fresh adapter")
        return problems
    if not g.rewards:
        problems.append('`grpo.rewards` is empty: name at least one reward, e.g. {format = 0.5, choice = 1.0}')
    if (t.batch_size * t.grad_accum) % g.num_generations:
        problems.append(f"train.batch_size x train.grad_accum ({t.batch_size} x {t.grad_accum}) must be a multiple of "
                        f"grpo.num_generations ({g.num_generations}): each step scores whole groups of completions")
    if g.max_completion_length >= recipe.data.max_length:
        problems.append(f"`grpo.max_completion_length` ({g.max_completion_length}) leaves no room for the prompt "
                        f"in data.max_length ({recipe.data.max_length}): raise data.max_length")
    if recipe.distributed.fsdp:
        problems.append("`distributed.fsdp` is not supported with train.method = \"grpo\" (generation would need every "
                        "rank's shard): use one GPU")
    if "lm_head" in recipe.lora.target_modules:
        problems.append("`lora.target_modules` has lm_head: GRPO computes log-probabilities from the head's own "
                        "weight, so an adapter there would never train; leave it out")
    for switch in ("tiled_mlp", "offload_activations"):  # TRL's GRPOTrainer has neither
        if getattr(recipe.memory, switch):
            problems.append(f"`memory.{switch}` is an SFT switch: turn it off for train.method = \"grpo\"")
    if recipe.data.eval_source:
        problems.append("`data.eval_source` is for SFT: GRPO judges the rows it holds out of data.source "
                        "(data.eval_rows); leave it empty")
    if t.eval_steps:
        problems.append("`train.eval_steps` has no GRPO meaning: the held-out rows (data.eval_rows) are judged at the "
                        "end, before and after; set it to 0")
    return problems


def preference_problems(recipe: Recipe) -> list[str]:
    """The [pref] section against the method (its keys matter only with a preference method)."""
    method, p = recipe.train.method, recipe.pref
    if method not in PREFERENCE_METHODS:
        return []
    problems = []
    if p.loss_type != "auto" and p.loss_type not in LOSS_TYPES[method]:
        choices = LOSS_TYPES[method]
        problems.append(f"`pref.loss_type` must be auto or one of {', '.join(choices)} for train.method = "
                        f"\"{method}\", got {p.loss_type!r}{did_you_mean(p.loss_type, choices)}")
    if method == "orpo" and p.precompute_ref_log_probs:
        problems.append("`pref.precompute_ref_log_probs` has no ORPO meaning: ORPO uses no reference model")
    if method == "orpo" and recipe.model.adapter:
        problems.append("`model.adapter` with train.method = \"orpo\": ORPO trains the SFT part itself, from the "
                        "base; start DPO or KTO from an SFT run instead")
    if recipe.distributed.fsdp:
        problems.append(f"`distributed.fsdp` is not supported with train.method = \"{method}\": use one GPU")
    if recipe.memory.offload_activations and method == "orpo":
        problems.append("`memory.offload_activations`: TRL's ORPOTrainer has no activation offloading; turn it off")
    if recipe.data.eval_source:
        problems.append("`data.eval_source` is for SFT: preference runs hold out pairs of data.source "
                        "(data.eval_rows); leave it empty")
    if p.extra:
        from qlora_kit.recipe.trainer_arguments import preference_table_problems

        problems += preference_table_problems(method, p.extra)
    return problems


def is_reward_file(name: str) -> bool:
    """`path/to/file.py:function`: a reward of your own, from that file."""
    path, sep, function = name.rpartition(":")
    return bool(sep) and path.endswith(".py") and function.isidentifier()


def template_problems(template: str) -> list[str]:
    """What is wrong with a custom format template (empty list when it is usable)."""
    named = sorted({p for p in _placeholders(template) if p not in ("question", "cot", "response")})
    if named:
        return [f"has the unknown placeholder(s) {', '.join('{' + p + '}' for p in named)}; the placeholders are "
                "{question}, {cot} and {response}, whatever your columns are called (map the columns with "
                "data.question_column / data.cot_column / data.response_column)"]
    if "{question}" not in template:
        return ["must be `chat`, `plain`, or a template containing {question}, {cot} and/or {response}"]
    if "{cot}" not in template and "{response}" not in template:
        return ["template needs {cot} or {response}: the part the model learns to write"]
    try:
        template.format(question="", cot="", response="")
    except (KeyError, IndexError, ValueError) as e:
        return [f"template has an unknown or broken placeholder ({e}); write literal braces as {{{{ and }}}}"]
    positions = [template.find(p) for p in ("{question}", "{cot}", "{response}") if p in template]
    if positions != sorted(positions):
        return ["template must put {question} before {cot} before {response}"]
    return []


def _placeholders(template: str) -> list[str]:
    import string

    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError:
        return []  # a broken brace: template_problems' format() check says so


def recipe_changes(recipe: Recipe) -> list[str]:
    """`section.key = value` for every setting that differs from the defaults: the recipe at a glance."""
    import tomli_w

    ours, defaults = recipe_to_dict(recipe), recipe_to_dict(Recipe())
    lines = []
    for section, values in ours.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if defaults.get(section, {}).get(key, object()) != value:
                # A list on one line (tomli_w spreads arrays over several), e.g. ["tensorboard", "wandb"].
                shown = json.dumps(value, ensure_ascii=False) if isinstance(value, list) else \
                    tomli_w.dumps({"v": value})[4:].strip()
                lines.append(f"{section}.{key} = {shown}")
    return lines


def _get(recipe: Recipe, full: str) -> Any:
    section, key = full.split(".")
    return getattr(getattr(recipe, section), key)


def _resolve_local_paths(recipe: Recipe, base_dir: Path) -> None:
    # Saved next to the adapter, the recipe must still point at the same files from anywhere else.
    for section, key in (("model", "name"), ("model", "tokenizer"), ("data", "source"), ("data", "eval_source")):
        value = getattr(getattr(recipe, section), key)
        if value and is_local_reference(value, base_dir):
            setattr(getattr(recipe, section), key, str((base_dir / Path(value).expanduser()).resolve()))
    if recipe.model.adapter:
        # A run directory is named like output.dir (from where the command runs); the recipe's folder is tried first.
        here = base_dir / Path(recipe.model.adapter).expanduser()
        recipe.model.adapter = str((here if here.exists() else Path(recipe.model.adapter).expanduser()).resolve())
    # Your own reward files: read from the recipe's folder, kept absolute so the saved recipe finds them too.
    recipe.grpo.rewards = {(_absolute_reward(name, base_dir) if is_reward_file(name) else name): weight
                           for name, weight in recipe.grpo.rewards.items()}


def _absolute_reward(name: str, base_dir: Path) -> str:
    path, _, function = name.rpartition(":")
    return f"{(base_dir / Path(path).expanduser()).resolve()}:{function}"


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    data = dataclasses.asdict(recipe)
    data.pop("source_path")
    if not data["sft"]:
        data.pop("sft")
    return data


def recipe_to_toml(recipe: Recipe) -> str:
    import tomli_w

    header = "# Resolved recipe: every setting as used by this run (defaults included).\n"
    return header + tomli_w.dumps(recipe_to_dict(recipe))


def normalize_gguf_reference(model: ModelSection, recipe_dir: Path) -> None:
    """Recipe loading: `model.name = "x.gguf"` or a folder + `model.gguf_file` become one absolute
    `model.gguf_file` (a hub id + gguf_file stays as is: it is downloaded when used). No file is read."""
    if model.name.lower().endswith(".gguf") and not model.gguf_file:
        path = (recipe_dir / Path(model.name).expanduser()).resolve()
        model.gguf_file = str(path)
        model.name = str(path.parent)
    elif model.gguf_file and not Path(model.gguf_file).is_absolute():
        folder = Path(model.name).expanduser()
        folder = folder if folder.is_absolute() else recipe_dir / folder
        if folder.is_dir():
            model.gguf_file = str((folder / model.gguf_file).resolve())
