"""Every recipe key with its type, default, allowed values and documentation, read from the schema itself.

The text under each field in recipe/schema.py is the key's documentation. This module reads it (with `ast`: Python
keeps no attribute docstrings at run time) so that the recipe reference page and the studio's form are generated
from the dataclasses and cannot drift from them: a new key appears in both without further code.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

from qlora_kit.recipe import schema


@dataclass(frozen=True)
class Key:
    section: str
    name: str
    kind: str
    """`bool`, `int`, `float`, `str`, `list` (of strings) or `table`."""
    default: Any
    doc: str
    choices: tuple[str, ...] = ()
    """The allowed values, for keys that take one of a fixed set (recipe.loading.CHOICES)."""

    @property
    def full(self) -> str:
        return f"{self.section}.{self.name}"


KINDS = {bool: "bool", int: "int", float: "float", str: "str"}


def kind_of(annotation) -> str:
    if annotation in KINDS:
        return KINDS[annotation]
    origin = typing.get_origin(annotation)
    return "list" if origin is list else "table" if origin is dict else "str"


@cache
def field_texts(cls: type) -> dict[str, str]:
    """name -> the string literal written right under the field `name: type = default` in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    texts = {}
    for node, after in zip(body, body[1:] + [None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            texts[node.target.id] = inspect.cleandoc(after.value.value)
    return texts


def section_classes() -> dict[str, type]:
    """TOML section name -> its dataclass, in the recipe's order ([sft] is a free table, not a class)."""
    hints = typing.get_type_hints(schema.Recipe)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema.Recipe) if dataclasses.is_dataclass(hints[f.name])}


def recipe_keys() -> list[Key]:
    """Every key of every section, in the order of the schema."""
    from qlora_kit.recipe.loading import CHOICES

    keys = []
    for section, cls in section_classes().items():
        hints, texts, defaults = typing.get_type_hints(cls), field_texts(cls), cls()
        for f in dataclasses.fields(cls):
            full = f"{section}.{f.name}"
            keys.append(Key(section, f.name, kind_of(hints[f.name]), getattr(defaults, f.name), texts.get(f.name, ""),
                            tuple(CHOICES.get(full, ()))))
    return keys


def section_docs() -> dict[str, str]:
    """Section name -> the class docstring, when the class has one of its own."""
    return {name: inspect.cleandoc(cls.__doc__) for name, cls in section_classes().items()
            if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(")}
