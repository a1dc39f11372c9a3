"""The settings form, generated from the recipe's own dataclasses: keys <-> form values <-> TOML.

Every field of recipe/schema.py becomes one form field (kind -> widget in app.py), in the schema's order, so a new
key appears in the page without UI code. Values travel as a flat list in `KEYS` order (Gradio passes component
values positionally), plus the free `[sft]` table as TOML text. The TOML the form writes holds only what differs
from the defaults, like a hand-written recipe, and loads back equal through recipe.loading.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from qlora_kit.errors import UserError
from qlora_kit.recipe.field_docs import Key, recipe_keys
from qlora_kit.recipe.schema import Recipe

KEYS: list[Key] = recipe_keys()
BY_NAME = {k.full: k for k in KEYS}

SCREEN_KEYS = ("model.name", "data.source")
"""Shown on the Model & data screen rather than in the settings form."""
COMMON = ("output.dir", "train.method", "data.max_length", "train.max_steps", "train.epochs", "train.batch_size",
          "train.grad_accum", "train.learning_rate", "lora.r", "lora.alpha", "data.eval_rows", "data.limit",
          "quant.load_in_4bit", "train.gradient_checkpointing", "memory.offload_activations",
          "memory.embeddings_on_cpu", "memory.tiled_mlp")
"""Up front in the form; every other key sits under "advanced", by section. Names absent from the schema are
skipped, so renaming a key never breaks the page."""
FIT_KEYS = ("data.max_length", "lora.r", "train.batch_size", "train.grad_accum", "quant.load_in_4bit",
            "train.gradient_checkpointing", "memory.offload_activations", "memory.embeddings_on_cpu",
            "memory.tiled_mlp", "model.name", "train.method", "pref.precompute_ref_log_probs")
"""Keys whose change re-runs the planner."""


def common_keys() -> list[Key]:
    return [BY_NAME[name] for name in COMMON if name in BY_NAME]


def advanced_keys() -> dict[str, list[Key]]:
    """Section -> its keys not shown up front (nor on the Model & data screen), in schema order."""
    shown = set(COMMON) | set(SCREEN_KEYS)
    sections: dict[str, list[Key]] = {}
    for key in KEYS:
        if key.full not in shown:
            sections.setdefault(key.section, []).append(key)
    return sections


def to_widget_value(key: Key, value: Any) -> Any:
    """A recipe value as its widget holds it: lists as comma-separated text, tables as TOML lines."""
    if key.kind == "list":
        return ", ".join(value)
    if key.kind == "table":
        import tomli_w

        return tomli_w.dumps(value or {})
    return value


def from_widget_value(key: Key, value: Any) -> Any:
    """A widget's value as the recipe holds it. A number box gives floats; an int key gets an int when the number is
    whole (a fraction is passed on as it is, so that loading names the key and the wrong type)."""
    if key.kind == "list":
        return [part.strip() for part in str(value or "").split(",") if part.strip()]
    if key.kind == "table":
        try:
            return tomllib.loads(str(value or ""))
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"`{key.full}` is not valid TOML:", [str(e)],
                            hint="Write one `name = value` per line, e.g. format = 0.5") from None
    if key.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if key.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if key.kind == "str" and value is None:
        return ""
    return value


def defaults() -> list[Any]:
    return [to_widget_value(k, k.default) for k in KEYS]


def recipe_values(recipe: Recipe) -> list[Any]:
    """The form's values for a recipe, in KEYS order."""
    return [to_widget_value(k, getattr(getattr(recipe, k.section), k.name)) for k in KEYS]


def sft_text(recipe: Recipe) -> str:
    import tomli_w

    return tomli_w.dumps(recipe.sft) if recipe.sft else ""


def form_to_raw(values: list[Any], sft: str = "") -> dict[str, dict[str, Any]]:
    """The form as a recipe's TOML tables, holding what differs from the defaults. An empty number box means the
    default. model.name, data.source and output.dir are always written: they say what the recipe is about."""
    if len(values) != len(KEYS):
        raise ValueError(f"form has {len(values)} values for {len(KEYS)} keys")
    raw: dict[str, dict[str, Any]] = {}
    for key, widget in zip(KEYS, values, strict=True):
        if widget is None and key.kind in ("int", "float"):
            continue
        value = from_widget_value(key, widget)
        if value != key.default or key.full in (*SCREEN_KEYS, "output.dir"):
            raw.setdefault(key.section, {})[key.name] = value
    if sft.strip():
        try:
            raw["sft"] = tomllib.loads(sft)
        except tomllib.TOMLDecodeError as e:
            raise UserError("The [sft] table is not valid TOML:", [str(e)],
                            hint="Write one `name = value` per line, e.g. neftune_noise_alpha = 5") from None
    return raw


def raw_to_toml(raw: dict[str, Any]) -> str:
    import tomli_w

    return "# Written by qlora_kit studio: `qlora-kit run THIS_FILE` trains the same run.\n" + tomli_w.dumps(raw)


def form_recipe(values: list[Any], sft: str = "") -> Recipe:
    """The form as a validated Recipe (the CLI's loader, so the page shows the CLI's messages)."""
    from pathlib import Path

    from qlora_kit.recipe.loading import normalize_gguf_reference, recipe_from_dict

    recipe = recipe_from_dict(form_to_raw(values, sft), where="the form")
    # As loading a recipe file does: a .gguf model is its folder + the file (the planner and the chat read it so).
    normalize_gguf_reference(recipe.model, Path.cwd())
    return recipe


def changed(recipe: Recipe, **sections: dict[str, Any]) -> Recipe:
    """A copy of `recipe` with some keys replaced: changed(r, train={"max_steps": 5})."""
    return dataclasses.replace(recipe, **{name: dataclasses.replace(getattr(recipe, name), **values)
                                          for name, values in sections.items()})


SFT_FIELD = "sft"
"""The free [sft] table's box: where problems about `sft.NAME` and [sft] are shown."""
_KEY_NAME = re.compile(r"(?<![\w./-])([a-z_]+\.[a-z_0-9]+)(?![\w/-])")


def field_of(text: str) -> str | None:
    """The form field a line of an error concerns: the first recipe key it names (`grpo.rewards.format` is
    grpo.rewards, `sft.NAME` the [sft] box), else None. A file name such as data.jsonl is not a key."""
    for match in _KEY_NAME.finditer(text):
        name = match.group(1)
        if name in BY_NAME:
            return name
        if name.startswith("sft."):
            return SFT_FIELD
    if "[sft]" in text:
        return SFT_FIELD
    return None


def problems_by_field(error: UserError, fallback: str) -> dict[str, str]:
    """A recipe error as messages under the fields they concern: each problem line under the key it names, the
    hint with each; an error naming no key goes whole to `fallback`. The CLI's loader writes every problem as
    "`section.key` ...", so in practice each line finds its field."""
    lines = error.problems or [error.title]
    fields: dict[str, list[str]] = {}
    for line in lines:
        fields.setdefault(field_of(line) or field_of(error.title) or fallback, []).append(line)
    # The loader's "fix the keys above" says where to look in a terminal; under the field it is said already.
    hint = f"\n\n{error.hint}" if error.hint and not error.hint.startswith("Fix the keys above") else ""
    return {name: "\n".join(found) + hint for name, found in fields.items()}


def failure_fields(message: str, recipe: Recipe | None) -> dict[str, str]:
    """A failed command's error message (runs.cli_error) under the field it concerns: the recipe key it names, else
    the data or model field when it names that file or id (a bad row's file and line, a hub id out of reach)."""
    if not message:
        return {}
    name = field_of(message)
    if name is None and recipe is not None:
        if recipe.data.source and recipe.data.source in message:
            name = "data.source"
        elif recipe.model.name and recipe.model.name in message:
            name = "model.name"
    return {name: message} if name else {}
