"""What the page shows, made from what the commands wrote: the dry run's highlighted rows, the status line, the
results, the evaluation table, the GGUF advice, and the error box. Plain functions of files, so the tests can read
them without a browser.
"""

from __future__ import annotations

import html
import json
from functools import lru_cache
from pathlib import Path

from qlora_kit.errors import UserError
from qlora_kit.studio import runs
from qlora_kit.studio.form import SCREEN_KEYS
from qlora_kit.studio.i18n import t


def error_box(error: UserError | str) -> str:
    text = error.render() if isinstance(error, UserError) else error
    return f"<pre class='studio-error'>{html.escape(text)}</pre>"


def elsewhere(errors: dict[str, str], here) -> dict[str, str]:
    """The errors of fields not on the screen the user is on (those on it are marked where they are)."""
    return {name: message for name, message in errors.items() if name not in here}


def pointer(errors: dict[str, str], lang: str = "en") -> str:
    """The box beside a button: which fields to fix and on which screen (the messages are at the fields)."""
    if not errors:
        return ""
    where = [f"`{name}` ({t('tab_model' if name in SCREEN_KEYS else 'tab_settings', lang)})" for name in errors]
    return error_box(t("fix_fields", lang) + " " + ", ".join(where))


def preview_html(scratch: Path, lang: str = "en") -> str:
    """The dry run's preview.jsonl: each row's tokens, the untrained prompt dim and the trained ones green; a
    preference run's pairs with the chosen side green and the rejected red (pair_preview_html)."""
    path = scratch / "preview.jsonl"
    if not path.is_file():
        return error_box("The dry run wrote no preview.jsonl.")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if rows and "input_ids" not in rows[0]:
        return pair_preview_html(rows, lang)
    decode = token_decoder(scratch / "recipe.toml")
    blocks = []
    for row in rows[:3]:
        ids, labels = row["input_ids"], row["labels"]
        spans, start = [], 0
        for i in range(1, len(ids) + 1):  # runs of tokens that are all trained or all not
            if i == len(ids) or (labels[i] == -100) != (labels[start] == -100):
                cls = "tok-prompt" if labels[start] == -100 else "tok-trained"
                spans.append(f"<span class='{cls}'>{html.escape(decode(ids[start:i]))}</span>")
                start = i
        trained = sum(label != -100 for label in labels)
        blocks.append(f"<div class='preview-row'><b>row {row.get('row', '?')}: {len(ids)} tokens, {trained} "
                      f"trained</b>\n{''.join(spans)}</div>")
    return "".join(blocks)


def pair_preview_html(rows: list[dict], lang: str = "en") -> str:
    """A preference dry run's rows (data/pairs.write_pair_preview: the texts as decoded from the very ids trained
    on): the prompt dim, then the chosen side green and the rejected side red, each with its token count; a KTO row
    has one completion, green when desirable and red when not."""
    blocks = [f"<p class='pair-legend'>{html.escape(t('pair_help', lang))}</p>"]
    for row in rows[:3]:
        prompt = f"<span class='tok-prompt'>{html.escape(row['prompt'])}</span>"
        if "chosen" in row:
            sides = [("tok-chosen", "chosen", row["chosen"], row["chosen_ids"]),
                     ("tok-rejected", "rejected", row["rejected"], row["rejected_ids"])]
        else:
            good = bool(row.get("label"))
            sides = [("tok-chosen" if good else "tok-rejected", "desirable" if good else "undesirable",
                      row["completion"], row["completion_ids"])]
        parts = "".join(f"<div class='pair-side'><b>{name}: {len(ids)} tokens</b>\n{prompt}"
                        f"<span class='{cls}'>{html.escape(text)}</span></div>" for cls, name, text, ids in sides)
        blocks.append(f"<div class='preview-row pair-row'><b>row {row.get('row', '?')}: prompt "
                      f"{len(row['prompt_ids'])} tokens</b>\n{parts}</div>")
    return "".join(blocks)


def token_decoder(recipe_file: Path):
    """ids -> text with the run's tokenizer: its tokenizer.json through the small `tokenizers` library when the
    folder has one (no transformers import in the page), else transformers."""
    from qlora_kit.recipe.loading import load_recipe

    recipe = load_recipe(recipe_file)
    folder = Path(recipe.model.tokenizer or recipe.model.name)
    if recipe.model.gguf_file or recipe.model.name.lower().endswith(".gguf"):
        from qlora_kit.model.gguf_base import prepare_gguf_base

        prepare_gguf_base(recipe.model, weights=False)
        folder = Path(recipe.model.name)
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return lambda ids: tok.decode(ids, skip_special_tokens=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), revision=recipe.model.revision)
    return lambda ids: tok.decode(ids)


def planned_steps(recipe_file: Path) -> int:
    """train.max_steps of a run's recipe.toml (0 when unreadable): read again only when the file changes, since the
    status line asks every second."""
    try:
        return _planned_steps(str(recipe_file), recipe_file.stat().st_mtime_ns)
    except OSError:
        return 0


@lru_cache(maxsize=64)
def _planned_steps(recipe_file: str, _mtime_ns: int) -> int:
    from qlora_kit.recipe.loading import load_recipe

    try:
        return load_recipe(Path(recipe_file)).train.max_steps
    except (UserError, OSError):
        return 0


def status_markdown(path: Path, state: runs.RunState, records: list[dict], lang: str) -> str:
    words = t(f"status_{state.status}", lang)
    steps = [r for r in records if "loss" in r]
    if not records:
        return f"**{path.name}**: {words}"
    last = records[-1]
    step = last.get("step", 0)
    total = planned_steps(path / "recipe.toml")
    eta = ""
    if total and step and state.status == "running" and last.get("time_s"):
        eta = f" · ETA {max(total - step, 0) * last['time_s'] / step:.0f} s"
    loss = f" · loss {steps[-1]['loss']:.4f}" if steps else ""
    of = f" / {total}" if total else ""
    return f"**{path.name}**: {words} · step {step}{of}{loss} · {len(steps)} points logged{eta}"


def results_markdown(summary: dict) -> str:
    lines = [f"### {summary.get('steps', '?')} steps, {summary.get('wall_time_s', 0):.0f} s"]
    if summary.get("final_eval_loss") is not None:
        # The same lines as the terminal's: counted from the 16-bit base, the NF4 base beside it.
        from qlora_kit.train.summary import outcome_lines

        first, *rest = [line for line in outcome_lines(summary) if line.startswith(("eval", "  "))]
        lines.append(f"**{first}**" + "".join(f"  \n{line.strip()}" for line in rest))
    if "format_base" in summary:
        lines.append(f"format compliance (reasoning closed, an answer, EOS): base {summary['format_base']}, "
                     f"fine-tuned {summary.get('format_fine_tuned', '?')}")
    if "pref_judged_rows" in summary:  # a preference run: the same before -> after lines as the terminal's
        from qlora_kit.results.preference_judge import PreferenceJudgement

        first, *rest = PreferenceJudgement(summary["pref_judged_rows"], summary.get("pref_judged_from", "rows"),
                                           summary).lines()
        lines.append(f"**{summary.get('method', 'preference').upper()} {first}**" +
                     "".join(f"  \n{line}" for line in rest))
    lines.append(f"tokens/s {summary.get('tokens_per_s', 0):.0f} · weights: {summary.get('model_weights', '')}")
    return "\n\n".join(lines)


def eval_markdown(record: dict) -> str:
    """eval.json as the table report.md gets: accuracy per task, base vs fine-tuned, with the 95 % interval."""
    if not record:
        return ""
    from qlora_kit.eval.results import report_section

    return report_section(record)


def gguf_advice(run_dir: Path) -> str:
    """Each GGUF type's file and the card it fits, from the merged model's config.json or, before the merge, the
    base model's (the merge keeps the shapes): the advice is there when the user chooses the type."""
    from qlora_kit.plan.gguf_sizes import advice_lines

    merged = run_dir / "merged" / "config.json"
    try:
        if merged.is_file():
            config = json.loads(merged.read_text(encoding="utf-8"))
        else:
            from qlora_kit.model.gguf_base import prepare_gguf_base
            from qlora_kit.plan.estimate import read_config
            from qlora_kit.recipe.loading import load_recipe

            model = load_recipe(run_dir / "recipe.toml").model
            if model.gguf_file or model.name.lower().endswith(".gguf"):
                prepare_gguf_base(model, weights=False)  # its config.json, no weights
            config = read_config(model)
    except UserError as error:
        return error.render()
    except (OSError, ValueError) as error:
        return f"The sizes per GGUF type could not be computed: {error}"
    lines = advice_lines(config, str(run_dir / "merged"), command=False)
    return "\n".join(lines) or ("The export writes Qwen2 and Llama models; this model is neither, so there is no "
                                "size advice (the export will say what it cannot write).")
