"""The README.md model card of a merged model: what it is made of, how it was trained, how the merge was checked.

Everything comes from the run directory (recipe.toml, summary.json, the adapter config) and from the merge
itself, so the card is true for this folder and needs no editing to be honest.
"""

from __future__ import annotations

from pathlib import Path

from qlora_kit.recipe.loading import recipe_to_toml
from qlora_kit.recipe.schema import is_local_reference


def write_model_card(path: Path, *, run, base, adapter, plan, dtype_name: str, verification) -> None:
    path.write_text(render_model_card(run=run, base=base, adapter=adapter, plan=plan, dtype_name=dtype_name,
                                      verification=verification), encoding="utf-8")


def render_model_card(*, run, base, adapter, plan, dtype_name: str, verification) -> str:
    recipe = run.recipe
    sections = [
        front_matter(recipe, base),
        f"# {Path(recipe.output.dir).name or 'merged model'} (merged with qlora_kit)\n",
        random_warning(base),
        "## Base model\n\n" + base_section(recipe, base),
        "## Training data\n\n" + data_section(recipe),
        "## Merge\n\n" + merge_section(adapter, plan, dtype_name),
        "## Training metrics\n\n" + metrics_section(run.summary),
        "## Verification\n\n" + verification_section(verification),
        "## Use\n\n" + usage_section(),
        "## Recipe\n\nThe resolved recipe of the run (every setting, defaults included):\n\n"
        f"```toml\n{recipe_to_toml(recipe).rstrip()}\n```\n",
    ]
    return "\n".join(s for s in sections if s)


def front_matter(recipe, base) -> str:
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [qlora_kit, lora, qlora, merged]"]
    if not base.random_init and not is_local_reference(recipe.model.name, Path.cwd()):
        lines.append(f"base_model: {recipe.model.name}")
    if not is_local_reference(recipe.data.source, Path.cwd()):
        lines.append(f"datasets: [{recipe.data.source}]")
    return "\n".join([*lines, "---", ""])


def random_warning(base) -> str:
    if not base.random_init:
        return ""
    return ("> **Demo model.** The base has seeded RANDOM weights (`model.init = \"random\"`): this folder shows "
            "that training and merging work end to end; it does not generate useful text.\n")


def base_section(recipe, base) -> str:
    if recipe.model.gguf_file:
        return (f"- model: the GGUF file `{Path(recipe.model.gguf_file).name}`, dequantized by transformers' GGUF "
                "reader. Its weights were already rounded by that file's quantization: there is no other 16-bit base, "
                "so this merge starts from those rounded values.\n"
                f"- weights merged into: {base.origin}\n"
                f"- architecture: {', '.join(base.config.get('architectures') or [base.config.get('model_type')])}\n")
    revision = f" (revision `{recipe.model.revision}`)" if not is_local_reference(recipe.model.name, Path.cwd()) else ""
    return (f"- model: `{recipe.model.name}`{revision}\n"
            f"- weights merged into: {base.origin}\n"
            f"- architecture: {', '.join(base.config.get('architectures') or [base.config.get('model_type', '?')])}\n")


def data_section(recipe) -> str:
    d = recipe.data
    config = f", config `{d.config}`, split `{d.split}`" if not is_local_reference(d.source, Path.cwd()) else ""
    return (f"- source: `{d.source}`{config}\n"
            f"- columns: question `{d.question_column}`, reasoning `{d.cot_column}`, answer `{d.response_column}`\n"
            f"- format: {shown_format(d.format)}, max_length {d.max_length} tokens (longer rows: {d.over_length})\n"
            + (f"\n```text\n{d.format}\n```\n" if "\n" in d.format else ""))


def shown_format(template: str) -> str:
    """One-line formats inline; a multi-line custom template goes in the block below (backticks would break)."""
    return "custom template (below)" if "\n" in template else f"`{template}`"


def merge_section(adapter, plan, dtype_name: str) -> str:
    return (f"- mode: {plan.describe()}\n"
            f"- adapter: {adapter.describe()}\n"
            f"- target layers: {', '.join(sorted({n.rsplit('.', 1)[-1] for n in adapter.modules}))}\n"
            f"- weights: {dtype_name} safetensors; tokenizer files and chat template copied byte for byte from the "
            "base\n")


def metrics_section(summary: dict) -> str:
    if not summary:
        return "No summary.json in the run directory.\n"
    rows = "\n".join(f"| {key} | {value} |" for key, value in summary.items())
    return f"From the run's summary.json:\n\n| metric | value |\n| --- | --- |\n{rows}\n"


def verification_section(verification) -> str:
    if verification is None:
        return "Skipped (`--no-verify`, or not enough free memory to load a whole model).\n"
    v = verification
    return (f"Sample prompts were run through the reference ({v.reference}, unmerged adapter) and through this "
            f"folder loaded with plain `AutoModelForCausalLM.from_pretrained`, both in {v.dtype} on {v.device}.\n\n"
            "| figure | value |\n| --- | --- |\n"
            f"| prompts / token positions | {v.prompts} / {v.positions} |\n"
            f"| max \\|logit difference\\| | {v.max_abs_diff:.4g} |\n"
            f"| tolerance (relative x largest logit) | {v.tolerance:.4g} |\n"
            f"| largest \\|logit\\| | {v.max_abs_logit:.4g} |\n"
            f"| top-1 token agreement | {100 * v.top1_agreement:.1f}% |\n"
            f"| adapter effect (max \\|logit change\\| vs base alone) | {v.adapter_effect:.4g} |\n"
            f"| result | **{'PASS' if v.passed else 'FAIL'}** |\n"
            f"| against the trained model (NF4 base + adapter) | {v.describe_trained()} |\n"
            + "".join(f"| eval loss, {name} ({v.eval_rows} held-out rows) | {loss:.4f} |\n"
                      for name, loss in v.eval_losses.items()))


def usage_section() -> str:
    return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\", dtype=\"auto\")\n"
            "tokenizer = AutoTokenizer.from_pretrained(\"path/to/this/folder\")\n```\n")
