"""qlora_kit.recipe.field_docs: every recipe key, read from the schema, with the text written under it."""

from __future__ import annotations

import dataclasses

from qlora_kit.recipe.field_docs import field_texts, recipe_keys
from qlora_kit.recipe.loading import CHOICES, recipe_from_dict, recipe_to_dict
from qlora_kit.recipe.schema import Recipe


def test_every_key_is_listed_once_and_documented():
    keys = recipe_keys()
    names = [key.full for key in keys]
    assert len(names) == len(set(names))
    expected = {f"{section}.{key}" for section, values in recipe_to_dict(Recipe()).items() for key in values}
    assert set(names) == expected
    undocumented = [key.full for key in keys if len(key.doc) < 10]
    assert not undocumented, f"write a docstring under these fields in recipe/schema.py: {undocumented}"


def test_kinds_defaults_and_choices_come_from_the_schema():
    keys = {key.full: key for key in recipe_keys()}
    assert keys["lora.r"].kind == "int" and keys["lora.r"].default == Recipe().lora.r
    assert keys["quant.load_in_4bit"].kind == "bool"
    assert keys["train.learning_rate"].kind == "float"
    assert keys["lora.target_modules"].kind == "list"
    assert keys["data.over_length"].choices == CHOICES["data.over_length"]


def test_the_defaults_load_back_as_a_recipe():
    """What a form fills in from these keys is a valid recipe: the defaults, section by section."""
    raw = {}
    for key in recipe_keys():
        raw.setdefault(key.section, {})[key.name] = key.default
    raw["data"]["source"] = "rows.jsonl"
    recipe = recipe_from_dict(raw)
    assert dataclasses.asdict(recipe.lora) == dataclasses.asdict(Recipe().lora)


def test_the_text_under_a_field_is_its_doc_and_nothing_else():
    @dataclasses.dataclass
    class Section:
        documented: int = 1
        """Under the field."""
        bare: str = ""
        after_bare: bool = False
        """Belongs to after_bare, not to bare."""

    texts = field_texts(Section)
    assert texts == {"documented": "Under the field.", "after_bare": "Belongs to after_bare, not to bare."}
