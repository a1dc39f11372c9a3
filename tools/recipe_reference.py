"""`python tools/recipe_reference.py [--write | --check]`: docs/recipe.md, generated from the recipe's dataclasses.

Every key's row comes from the field and the text under it in qlora_kit/recipe/schema.py (read by
qlora_kit.recipe.field_docs), so the page cannot drift from the code. The hand-written parts (the intro, and the
notes that follow a section's table) are the constants below.

    python tools/recipe_reference.py            # print the page
    python tools/recipe_reference.py --write    # write docs/recipe.md
    python tools/recipe_reference.py --check    # exit 1 when docs/recipe.md differs from what would be written
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qlora_kit.recipe.field_docs import Key, recipe_keys, section_docs  # noqa: E402 - needs the checkout first

PAGE = REPO / "docs" / "recipe.md"
COMMAND = "python tools/recipe_reference.py --write"

HEADER = f"""\
# Recipe reference

What every recipe key does, its type and its default.

<!-- Generated from qlora_kit/recipe/schema.py by `{COMMAND}`: edit the schema, not this page. -->

A recipe is TOML with the sections below; every key is optional (the default is shown). Any key
can be overridden on the command line as `section.key=value`, where the value is a TOML literal
(`train.learning_rate=1e-4`, `lora.use_dora=true`, `lora.target_modules=["q_proj","v_proj"]`; a
bare word is taken as a string: `data.source=my_rows.jsonl`). Unknown keys, wrong types and
impossible values are all reported at once. Relative paths in the recipe are read from the
recipe's folder; `output.dir` is relative to where you run the command.

Sections: {{sections}}.
"""

NOTES = {
    "data": """\
Rows with an empty or missing question/answer, or a field that is not text, are left out and
reported with their row numbers (data rows, counted from 1; for a CSV the header is not a row);
rows with an empty reasoning are kept and counted; a malformed `.jsonl` line stops the run naming
the line. Held-out eval rows are drawn from the rows that fit `max_length` (never truncated: a loss on cut
rows would not be theirs); when too few fit, the report says how many were evaluated.
On the command line, `\\n` in `data.format` or `data.system_prompt` means a new line, as in the
recipe file: `python -m qlora_kit.run R.toml 'data.format=Q: {question}\\nA: {cot}\\n### {response}'`.
The layouts, with examples: [Your data](data.md).""",
    "memory": """\
All three are off by default until `tools/bench.py` has measured them on a GPU; the planner already
accounts for them (the tiled MLP's effect on the peak is measured at tensor level on CPU:
`tools/calibrate_plan.py`, see [Will it fit?](fit.md)). The tiled MLP is `qlora_kit/model/tiled_mlp.py`: the same losses
and adapter as untiled (tested; with LoRA dropout the masks are drawn per slice and the backward reuses them,
checked against finite differences), its extra matmul work counted but not yet timed on a GPU; it works under data
parallelism, is refused with FSDP, and changes nothing on sequences up to 1,024 tokens. Paged
8-bit AdamW (`train.optim = "auto"` on CUDA), dynamic padding with length grouping, and TRL's chunked loss (never
the full `tokens × vocab` logits in fp32) are always on.""",
    "eval": """\
Off by default; needs `pip install -e ".[eval]"`. The same evaluation as `python -m qlora_kit.eval`, run on the
finished run: [Did it work?](results.md#accuracy-on-questions-with-known-answers).""",
    "grpo": """\
Read only when `train.method = "grpo"`.""",
}

SFT = """\
## `[sft]`

A pass-through table for rare `trl.SFTConfig` arguments (`neftune_noise_alpha = 5`, ...). Keys
are checked against the installed TRL; keys the recipe already owns (learning rate, batch size,
`report_to`, `eval_strategy`, ...) are refused, naming the recipe key to use instead, so the two never disagree.
"""


def toml_value(value) -> str:
    """A default as it would be written in the recipe."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def cell(text: str) -> str:
    """One table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def row(key: Key) -> str:
    meaning = key.doc or "(undocumented)"
    if key.choices:
        meaning += " One of: " + ", ".join(f"`{c}`" for c in key.choices) + "."
    return f"| `{key.name}` | {key.kind} | `{cell(toml_value(key.default))}` | {cell(meaning)} |"


def page() -> str:
    keys = recipe_keys()
    sections: dict[str, list[Key]] = {}
    for key in keys:
        sections.setdefault(key.section, []).append(key)
    docs = section_docs()
    names = [*sections, "sft"]
    parts = [HEADER.format(sections=", ".join(f"[`[{n}]`](#{n})" for n in names))]
    for name, section_keys in sections.items():
        lines = [f"## `[{name}]`", ""]
        if name in docs:
            lines += [docs[name], ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        lines += [row(k) for k in section_keys]
        if name in NOTES:
            lines += ["", NOTES[name]]
        parts.append("\n".join(lines) + "\n")
    parts.append(SFT)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--write", action="store_true", help="write docs/recipe.md")
    what.add_argument("--check", action="store_true", help="exit 1 when docs/recipe.md is not what would be written")
    args = parser.parse_args(argv)
    text = page()
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        if current != text:
            print(f"docs/recipe.md is out of date with qlora_kit/recipe/schema.py: run `{COMMAND}`", file=sys.stderr)
            return 1
        print("docs/recipe.md is up to date")
        return 0
    if args.write:
        PAGE.parent.mkdir(parents=True, exist_ok=True)
        PAGE.write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {PAGE} ({len(recipe_keys())} keys)")
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
