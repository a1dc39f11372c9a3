"""The page: Gradio Blocks, one tab per step of the beginner's path, every action a `qlora-kit` child process.

(Make data from documents ->) Model & data -> Settings & fit -> Train -> Results -> Chat -> Export; the first screen
is make_data_screen.py's. The settings form is generated from the recipe's keys (form.py); the charts (charts.py),
results and files are read from the run directory (runs.py, views.py). Element ids (`elem_id`) name what a user
clicks and reads; the browser tests find the page by them too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gradio as gr

from qlora_kit.errors import UserError
from qlora_kit.recipe.run_files import REWARD_CURVE_FILE
from qlora_kit.studio import charts, chat, fit, form, make_data_screen, runs
from qlora_kit.studio.i18n import LANGUAGES, t
from qlora_kit.studio.make_data_screen import MakeDataScreen
from qlora_kit.studio.views import (
    elsewhere,
    error_box,
    eval_markdown,
    gguf_advice,
    pointer,
    preview_html,
    results_markdown,
    status_markdown,
)
from qlora_kit.studio.workspace import Workspace, demo_dir, toolkit_cache

R1_MODELS = ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
             "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "HuggingFaceTB/SmolLM2-135M-Instruct")
DEMO_PRESET = "demo: tiny model + embedded rows (a minute on a CPU)"
DEMO_DPO_PRESET = "demo DPO: tiny model + embedded preference pairs (a minute on a CPU)"
EXPORT_TYPES = ("q8_0", "q4_k_m", "q5_k_m", "q6_k", "q3_k_m", "f16")
MAKE_TAB, TRAIN_TAB = 0, 3
"""The Make data and Train screens' places among the tabs: the page polls their jobs only while they are shown."""
CHART_EVERY_S = 1.0
"""While a run goes on, the charts are redrawn at most this often (the page polls every second)."""

CSS = """
.tok-prompt { color: #888; }
.tok-trained { background: #d7f5dc; color: #14532d; }
.tok-chosen { background: #d7f5dc; color: #14532d; }
.tok-rejected { background: #fde0e0; color: #7f1d1d; }
.pair-side { margin-top: 4px; }
.toml-text textarea { font-family: monospace; font-size: 0.85em; }
.preview-row { font-family: monospace; white-space: pre-wrap; border: 1px solid #ddd; padding: 6px;
               margin-bottom: 6px; border-radius: 4px; font-size: 0.85em; }
#log textarea, #preview-log textarea, #export-log textarea, #eval-log textarea, #gguf-advice textarea {
    font-family: monospace; font-size: 0.8em; }
/* The once-a-second refresh must not flash a progress timer over the status line, the log and the charts. */
#status [data-testid='status-tracker'], #log [data-testid='status-tracker'],
#charts [data-testid='status-tracker'] { display: none !important; }
/* A field's error (Gradio's validation message): the CLI's lines as it wrote them. */
.validation-error { white-space: pre-wrap; font-weight: normal !important; font-size: 0.9em; }
/* A dropdown shows its message in the status overlay, over what the user typed: put it in the flow, above the field,
   as a text box shows its own. */
.block > .wrap:has(.validation-error:not(:empty)) { position: static !important; display: block !important;
    background: none !important; border: none !important; padding: 0 0 4px 0 !important; min-height: 0 !important;
    text-align: left !important; }
.wrap .validation-error:not(:empty) { position: static !important; transform: none !important; display: block;
    text-align: left; background: none !important; border: none !important; padding: 0 !important;
    margin: 0 !important; box-shadow: none !important; }
.block > .wrap:has(.validation-error:not(:empty)) button { display: none !important; }
.studio-error { color: #b71c1c; background: #fff4f4; border: 1px solid #f2b8b8; padding: 8px; white-space: pre-wrap;
                border-radius: 4px; }
""" + charts.CSS + make_data_screen.CSS


def chart_titles(lang: str) -> dict[str, str]:
    return {name: t(f"{name}_chart", lang) for name in ("loss", "memory", "speed", "lr", "rewards", "accuracy",
                                                               "empty", "step")}


def demo_raw() -> dict[str, dict[str, Any]]:
    """recipes/demo.toml, pointing at the demo assets inside the installed package (a workspace may be empty)."""
    assets = demo_dir()
    return {"model": {"name": str(assets / "tiny-qwen2"), "init": "random"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "data": {"source": str(assets / "data.jsonl"), "max_length": 256, "eval_rows": 16},
            "train": {"max_steps": 200, "batch_size": 4, "grad_accum": 1, "learning_rate": 3e-3, "warmup": 0.05,
                      "logging_steps": 2, "eval_steps": 50},
            "output": {"dir": "runs/demo"},
            "samples": {"count": 3, "max_new_tokens": 160}}


def demo_dpo_raw() -> dict[str, dict[str, Any]]:
    """recipes/demo_dpo.toml, pointing at the demo assets inside the installed package."""
    assets = demo_dir()
    return {"model": {"name": str(assets / "tiny-qwen2"), "init": "random"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "data": {"source": str(assets / "pairs.jsonl"), "max_length": 256, "eval_rows": 16},
            "train": {"method": "dpo", "max_steps": 30, "batch_size": 4, "grad_accum": 1, "learning_rate": 5e-3,
                      "warmup": 0.1, "logging_steps": 2},
            "pref": {"beta": 0.1},
            "output": {"dir": "runs/demo_dpo"},
            "samples": {"count": 2, "max_new_tokens": 96}}


DEMOS = {DEMO_PRESET: demo_raw, DEMO_DPO_PRESET: demo_dpo_raw}
"""The embedded demos among the presets: recipes built here, since a fresh workspace has no recipes/ folder."""


def model_choices() -> list[str]:
    choices = [str(demo_dir() / "tiny-qwen2"), *R1_MODELS]
    choices += [str(p) for p in sorted((toolkit_cache() / "smollm2").glob("*.gguf"))]
    return choices


def build(ws: Workspace) -> gr.Blocks:
    # Run files (a GGUF of gigabytes, the pictures) are served from where they are, not copied into Gradio's cache.
    gr.set_static_paths([str(ws.runs_dir())])
    found = sorted((ws.root / "recipes").glob("*.toml"))
    presets = {**dict.fromkeys(DEMOS), **{str(p.relative_to(ws.root)): p for p in found}}
    texts: list[tuple[Any, str, str]] = []  # (component, attribute, text key): what the language switch re-sends

    def tr(component, key: str, attr: str = "label"):
        texts.append((component, attr, key))
        return component

    def recipe_path_for(recipe) -> Path:
        return ws.root / "recipes" / f"{Path(recipe.output.dir).name}.toml"

    def confined_recipe(values: list, sft: str):
        """The form as a Recipe whose paths are inside the workspace (the CLI's loader checks the rest)."""
        values = list(values)
        for name, what in (("model.name", "model"), ("data.source", "data"), ("data.eval_source", "eval data"),
                           ("model.tokenizer", "tokenizer"), ("model.gguf_file", "GGUF file"),
                           ("eval.file", "questions file"), ("output.dir", "output.dir")):
            i = form.KEYS.index(form.BY_NAME[name])
            if name == "output.dir":
                values[i] = values[i] or "runs/studio"
            if values[i]:
                try:
                    values[i] = str(ws.resolve(str(values[i]), what)) if name == "output.dir" \
                        else ws.reference(str(values[i]), what)
                except UserError as error:  # said under the field it concerns
                    raise UserError(error.title, [f"{name}: {line}" for line in error.problems or [error.title]],
                                    error.hint) from None
        return form.form_recipe(values, sft)

    with gr.Blocks(title="qlora_kit studio", analytics_enabled=False) as page:
        with gr.Row():
            tr(gr.Markdown(f"## {t('title')}\n{t('intro')}", elem_id="intro"), "intro", "value")
            lang = tr(gr.Radio(list(LANGUAGES), value="English", label=t("language"), elem_id="lang", scale=0,
                               min_width=200), "language")
        components: list[Any] = []
        by_key: dict[str, Any] = {}

        def widget(key) -> Any:
            label = f"{key.full}"
            info = key.doc.split("\n")[0][:300]
            default = form.to_widget_value(key, key.default)
            elem = "key-" + key.full.replace(".", "-")
            if key.kind == "bool":
                comp = gr.Checkbox(value=default, label=label, info=info, elem_id=elem)
            elif key.kind in ("int", "float"):
                comp = gr.Number(value=default, label=label, info=info, elem_id=elem,
                                 precision=0 if key.kind == "int" else None)
            elif key.choices:
                comp = gr.Dropdown(list(key.choices), value=default, label=label, info=info, elem_id=elem,
                                   allow_custom_value=True)
            elif key.kind == "table":
                comp = gr.Textbox(value=default, label=f"{label} (TOML: one name = value a line)", info=info,
                                  elem_id=elem, lines=3)
            else:
                comp = gr.Textbox(value=default, label=label, info=info, elem_id=elem)
            by_key[key.full] = comp
            return comp

        # The page opens on Model & data (the demo's first click); making data from documents is the step before.
        with gr.Tabs(elem_id="tabs", selected="model") as tabs:
            # ---------------------------------------------------------------- 0. make data from documents
            with tr(gr.Tab(t("tab_make"), id="make", elem_id="tab-make"), "tab_make"):
                make_screen = MakeDataScreen(ws, tr, model_choices(), form.BY_NAME["model.name"].default)
                make_screen.layout()

            # ---------------------------------------------------------------- 1. model and data
            with tr(gr.Tab(t("tab_model"), id="model", elem_id="tab-model"), "tab_model"):
                preset = tr(gr.Dropdown(list(presets), value=None, label=t("preset"), elem_id="preset"), "preset")
                model_box = tr(gr.Dropdown(model_choices(), value=form.BY_NAME["model.name"].default,
                                           label=t("model_name"), allow_custom_value=True, elem_id="key-model-name"),
                               "model_name")
                by_key["model.name"] = model_box
                with gr.Row():
                    data_box = tr(gr.Textbox(value=form.BY_NAME["data.source"].default, label=t("data_source"),
                                             elem_id="key-data-source", scale=3), "data_source")
                    by_key["data.source"] = data_box
                    upload = tr(gr.File(label=t("upload"), file_types=[".jsonl", ".json", ".csv", ".parquet"],
                                        elem_id="upload", scale=2), "upload")
                model_error = gr.HTML(elem_id="model-error")
                preview_btn = tr(gr.Button(t("preview_btn"), variant="primary", elem_id="preview-btn"), "preview_btn",
                                 "value")
                tr(gr.Markdown(t("preview_help")), "preview_help", "value")
                preview = gr.HTML(elem_id="preview")
                preview_log = gr.Textbox(label="qlora-kit run --dry-run", lines=12, max_lines=30, elem_id="preview-log",
                                         autoscroll=False)

            # ---------------------------------------------------------------- 2. settings and fit
            with tr(gr.Tab(t("tab_settings"), id="settings", elem_id="tab-settings"), "tab_settings"):
                form_error = gr.HTML(elem_id="form-error")  # the fields to fix, when one is on another screen
                with gr.Row():
                    with gr.Column(scale=3):
                        tr(gr.Markdown(f"### {t('common')}"), "common", "value")
                        for key in form.common_keys():
                            widget(key)
                        with tr(gr.Accordion(t("advanced"), open=False, elem_id="advanced"), "advanced"):
                            for section, keys in form.advanced_keys().items():
                                gr.Markdown(f"**[{section}]**")
                                for key in keys:
                                    widget(key)
                            # Text boxes, not gr.Code: its editor is 130 KB of script and a font the browser
                            # loads before the first screen is drawn, although these sit on the second one.
                            sft_box = gr.Textbox("", label="[sft] (trl.SFTConfig arguments, TOML)", lines=3,
                                                 elem_id="sft", elem_classes="toml-text")
                    with gr.Column(scale=2):
                        tr(gr.Markdown(f"### {t('fit_title')}"), "fit_title", "value")
                        card = tr(gr.Dropdown(fit.card_choices(), value=fit.card_choices()[0 if fit.detected_gpu()
                                                                                          else 1],
                                              label=t("card"), elem_id="card"), "card")
                        fit_box = gr.HTML(elem_id="fit")
                        toml_box = tr(gr.Textbox("", label=t("toml"), lines=14, max_lines=40, interactive=False,
                                                 elem_id="toml", elem_classes="toml-text"), "toml")
                        download = tr(gr.DownloadButton(t("download_recipe"), elem_id="download-recipe"),
                                      "download_recipe", "label")
                components = [by_key[k.full] for k in form.KEYS]

            # ---------------------------------------------------------------- 3. train
            with tr(gr.Tab(t("tab_train"), id="train", elem_id="tab-train"), "tab_train"):
                with gr.Row():
                    run_dir = tr(gr.Dropdown(runs.list_runs(ws.runs_dir()), value=None, label=t("run_pick"),
                                             allow_custom_value=True, elem_id="run-dir", scale=4), "run_pick")
                    refresh_btn = tr(gr.Button(t("refresh_runs"), elem_id="refresh-runs", scale=1), "refresh_runs",
                                     "value")
                with gr.Row():
                    start_btn = tr(gr.Button(t("start"), variant="primary", elem_id="start"), "start", "value")
                    stop_btn = tr(gr.Button(t("stop"), variant="stop", elem_id="stop"), "stop", "value")
                    resume_btn = tr(gr.Button(t("resume"), elem_id="resume"), "resume", "value")
                status = gr.Markdown(t("no_run"), elem_id="status")
                train_error = gr.HTML(elem_id="train-error")
                chart_box = gr.HTML(charts.run_charts([], chart_titles("en")), elem_id="charts")
                log_box = tr(gr.Textbox(label=t("log"), lines=10, max_lines=10, elem_id="log", autoscroll=True),
                             "log")
                seen = gr.State("")
                # Ticking only while this screen is shown: each tick is a round trip the browser handles even when
                # nothing changed (about 0.1 of a core in headless chromium on the 2-core machine).
                timer = gr.Timer(1.0, active=False)

            # ---------------------------------------------------------------- 4. results
            with tr(gr.Tab(t("tab_results"), id="results", elem_id="tab-results"), "tab_results") as results_tab:
                results_btn = tr(gr.Button(t("results_refresh"), elem_id="results-refresh"), "results_refresh",
                                 "value")
                results_md = gr.Markdown(elem_id="results-summary")
                with gr.Row():
                    curve_img = gr.Image(label="loss_curve.png", type="filepath", elem_id="loss-curve",
                                         interactive=False)
                    memory_img = gr.Image(label="memory_speed.png", type="filepath", elem_id="memory-speed",
                                          interactive=False)
                    # GRPO and preference runs: the reward (and preference accuracy) over the steps
                    reward_img = gr.Image(label=REWARD_CURVE_FILE, type="filepath", elem_id="reward-curve",
                                          interactive=False, visible=False)
                samples_md = gr.Markdown(elem_id="samples")
                with gr.Row():
                    eval_file = tr(gr.Textbox(label=t("eval_file"), elem_id="eval-file", scale=3), "eval_file")
                    eval_btn = tr(gr.Button(t("eval_btn"), elem_id="eval-btn", scale=1), "eval_btn", "value")
                eval_log = gr.Textbox(label="qlora-kit eval", lines=8, elem_id="eval-log")
                eval_table = gr.Markdown(elem_id="eval-table")

            # ---------------------------------------------------------------- 5. chat
            with tr(gr.Tab(t("tab_chat"), id="chat", elem_id="tab-chat"), "tab_chat"):
                question = tr(gr.Textbox(label=t("question"), elem_id="question"), "question")
                with gr.Row():
                    max_tokens = gr.Number(value=256, precision=0, label="max new tokens", elem_id="max-new-tokens")
                    ask_btn = tr(gr.Button(t("ask"), variant="primary", elem_id="ask"), "ask", "value")
                with gr.Row():
                    base_reply = gr.HTML(elem_id="reply-base")
                    tuned_reply = gr.HTML(elem_id="reply-tuned")

            # ---------------------------------------------------------------- 6. export
            with tr(gr.Tab(t("tab_export"), id="export", elem_id="tab-export"), "tab_export") as export_tab:
                with gr.Row():
                    gguf_type = tr(gr.Dropdown(list(EXPORT_TYPES), value="q8_0", label=t("gguf_type"),
                                               elem_id="gguf-type"), "gguf_type")
                    export_btn = tr(gr.Button(t("export_btn"), variant="primary", elem_id="export-btn"), "export_btn",
                                    "value")
                advice = gr.Textbox(label="GGUF advice", lines=8, elem_id="gguf-advice")
                export_log = gr.Textbox(label="qlora-kit merge / export", lines=10, max_lines=20, elem_id="export-log")
                export_files = tr(gr.File(label=t("export_files"), file_count="multiple", interactive=False,
                                          elem_id="export-files"), "export_files")

        # ==================================================================== events
        def on_lang(choice):
            code = LANGUAGES.get(choice, "en")
            updates = []
            for _component, attr, key in texts:
                text = t(key, code)
                if key == "intro":
                    text = f"## {t('title', code)}\n{text}"
                elif key in ("common", "fit_title"):
                    text = f"### {text}"
                updates.append(gr.update(**{attr: text}))
            return updates

        lang.change(on_lang, lang, [c for c, _, _ in texts])

        def on_preset(name):
            if name is None:
                return [gr.skip()] * (len(components) + 1)
            from qlora_kit.recipe.loading import load_recipe, recipe_from_dict

            try:
                recipe = recipe_from_dict(DEMOS[name](), where="the demo") if name in DEMOS \
                    else load_recipe(presets[name])
            except UserError as error:
                return [gr.skip()] * len(components) + [error_box(error)]
            values = form.recipe_values(recipe)
            at = {key.full: i for i, key in enumerate(form.KEYS)}
            if name not in DEMOS:  # a recipe's output.dir, relative to where the studio runs its commands
                values[at["output.dir"]] = recipe.output.dir
            if recipe.model.gguf_file:  # the .gguf file the recipe names, as one path (the loader splits it again)
                values[at["model.name"]] = str(Path(recipe.model.name) / recipe.model.gguf_file)
                values[at["model.gguf_file"]] = ""
            return [*values, ""]

        # select, not change: choosing the same preset again resets the form to it.
        preset.select(on_preset, preset, [*components, model_error])

        def on_upload(file):
            if not file:
                return gr.skip(), ""
            try:
                saved = ws.save_upload(file, Path(file).name)
            except UserError as error:
                return gr.skip(), error_box(error)
            return str(saved.relative_to(ws.root)), ""

        upload.upload(on_upload, upload, [data_box, model_error])

        # Errors go under the field they concern, as Gradio's own validation message: an action leaves its field
        # errors in this state, and its change runs `paint`, a validator (the function it guards does nothing) that
        # shows them at the fields and clears the others. (A validator on a `.then` step is not run by Gradio 6.31.)
        # The box beside the button says which fields, and on which screen.
        field_errors = gr.State({})
        form_fields = [*components, sft_box]
        field_names = [key.full for key in form.KEYS] + [form.SFT_FIELD]
        settings_fields = {name for name in field_names if name not in form.SCREEN_KEYS}

        def marks(errors: dict[str, str], values: list | None = None, form_errors: dict | None = None,
                  before: dict | None = None) -> dict[str, Any]:
            """An action's errors (`values`: the fields as it read them), or the form's own (`form_errors`, the
            action's kept from `before` for the fields that still hold what the action read: the form's update that
            typing started may finish after a dry run that fails in a second, and must not wipe its message).
            Stamped, so that the state changes after every action: Gradio clears a field's message when an event
            that reads the field starts, and an unchanged state would not paint it again."""
            if form_errors is None:
                action, read = errors, dict(zip(field_names, values or [], strict=False))
                form_errors = {}
            else:
                before = before or {}
                read = before.get("read", {})
                now = dict(zip(field_names, values or [], strict=False))
                action = {name: text for name, text in before.get("action", {}).items()
                          if name in read and read[name] == now.get(name)}
            return {"fields": {**action, **form_errors}, "action": action, "read": read, "at": time.monotonic_ns()}

        def paint(*values):
            errors = (values[-1] or {}).get("fields", {})
            return [gr.validate(name not in errors, errors.get(name, "")) for name in field_names] + \
                [gr.validate(True, "")]

        field_errors.change(lambda *values: None, [*form_fields, field_errors], None, validator=paint,
                            show_progress="hidden")

        def on_preview(*values):
            *values, sft, lang_choice = values
            code = LANGUAGES.get(lang_choice, "en")
            try:
                recipe = confined_recipe(values, sft)
            except UserError as error:
                errors = form.problems_by_field(error, "data.source")
                yield pointer(elsewhere(errors, form.SCREEN_KEYS), code), "", "", marks(errors, [*values, sft])
                return
            scratch = ws.studio_dir() / "preview"
            recipe = form.changed(recipe, output={"dir": str(scratch), "overwrite": True})
            recipe_file = ws.studio_dir() / "preview.toml"
            recipe_file.parent.mkdir(parents=True, exist_ok=True)
            from qlora_kit.recipe.loading import recipe_to_dict

            recipe_file.write_text(form.raw_to_toml(recipe_to_dict(recipe)), encoding="utf-8")
            (scratch / "preview.jsonl").unlink(missing_ok=True)
            yield "", "", "…", marks({}, [*values, sft])
            for text, status in runs.stream(runs.command("run", str(recipe_file), "--dry-run"), ws.root):
                if status is None:
                    yield gr.skip(), gr.skip(), text, gr.skip()
                elif status != 0:
                    errors = form.failure_fields(runs.cli_error(text), recipe)
                    box = pointer(elsewhere(errors, form.SCREEN_KEYS), code) if errors \
                        else error_box(runs.failure_text(text, status, "The dry run"))
                    yield box, "", text, marks(errors, [*values, sft])
                else:
                    yield "", preview_html(scratch, code), text, marks({}, [*values, sft])

        preview_btn.click(on_preview, [*form_fields, lang], [model_error, preview, preview_log, field_errors])

        def on_form(*values):
            *values, sft, card_choice, lang_choice, before = values
            try:
                recipe = confined_recipe(values, sft)
            except UserError as error:
                errors = form.problems_by_field(error, "output.dir")
                box = pointer(elsewhere(errors, settings_fields), LANGUAGES.get(lang_choice, "en"))
                return box, gr.skip(), gr.skip(), gr.skip(), marks({}, [*values, sft], errors, before)
            text = form.raw_to_toml(form.form_to_raw(form.recipe_values(recipe), sft))
            target = ws.studio_dir() / "recipe.toml"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            return "", text, fit.plan_html(recipe, card_choice), str(target), marks({}, [*values, sft], {}, before)

        gr.on([c.change for c in [*form_fields, card]], on_form, [*form_fields, card, lang, field_errors],
              [form_error, toml_box, fit_box, download, field_errors], trigger_mode="always_last", queue=True)
        page.load(on_form, [*form_fields, card, lang, field_errors],
                  [form_error, toml_box, fit_box, download, field_errors])

        def on_start(*values):
            *values, sft, lang_choice = values
            try:
                recipe = confined_recipe(values, sft)
            except UserError as error:
                errors = form.problems_by_field(error, "output.dir")
                return gr.skip(), pointer(errors, LANGUAGES.get(lang_choice, "en")), gr.skip(), \
                    marks(errors, [*values, sft])
            out = Path(recipe.output.dir)
            if runs.running_pid(out) is not None:
                return gr.skip(), error_box(f"{out} is already training: stop it first."), gr.skip(), \
                    marks({}, [*values, sft])
            recipe_file = recipe_path_for(recipe)
            recipe_file.parent.mkdir(parents=True, exist_ok=True)
            recipe_file.write_text(form.raw_to_toml(form.form_to_raw(form.recipe_values(recipe), sft)),
                                   encoding="utf-8")
            runs.start_run(out, recipe_file, ws.root)
            return gr.update(choices=runs.list_runs(ws.runs_dir()) or [str(out)], value=str(out)), "", "", \
                marks({}, [*values, sft])

        start_btn.click(on_start, [*form_fields, lang], [run_dir, train_error, seen, field_errors])

        def checked_run_dir(text) -> Path:
            if not text:
                raise UserError("No run chosen.", hint="Start a run, or pick one from the list.")
            return ws.resolve(str(text), "run directory")

        def on_stop(text):
            try:
                path = checked_run_dir(text)
            except UserError as error:
                return error_box(error)
            if not runs.stop_run(path):
                return error_box(f"{path} is not training.")
            return ""

        stop_btn.click(on_stop, run_dir, train_error)

        def on_resume(text):
            try:
                path = checked_run_dir(text)
            except UserError as error:
                return error_box(error), gr.skip()
            if runs.running_pid(path) is not None:
                return error_box(f"{path} is already training."), gr.skip()
            recipe_file = path / "recipe.toml"
            if not recipe_file.is_file():
                return error_box(f"{path} has no recipe.toml: it is not a run directory."), gr.skip()
            runs.start_run(path, recipe_file, ws.root, (f"output.dir={path}",))
            return "", ""

        resume_btn.click(on_resume, run_dir, [train_error, seen])
        refresh_btn.click(lambda: gr.update(choices=runs.list_runs(ws.runs_dir())), None, run_dir)

        def on_tick(text, lang_choice, last):
            """Every second: the status line and the log when they changed; the charts when metrics.jsonl grew, at
            most every CHART_EVERY_S seconds while the run goes on (redrawing four charts is the page's one real
            cost: on the demo, where a step is logged ten times a second, it would compete with the training)."""
            code = LANGUAGES.get(lang_choice, "en")
            if not text:
                return [gr.skip()] * 4 + [last]
            try:
                path = checked_run_dir(text)
            except UserError as error:
                return [gr.skip()] * 3 + [error_box(error), last]
            state = runs.run_status(path)
            metrics = path / "metrics.jsonl"
            log = path / runs.LOG_FILE
            size = metrics.stat().st_size if metrics.exists() else 0
            signature = f"{state.status}:{state.exit_code}:{size}:{log.stat().st_size if log.exists() else 0}:{code}"
            previous, _, chart_state = (last or "").partition("|")
            charted_size, _, charted_at = chart_state.partition("@")
            if signature == previous and charted_size == str(size):  # nothing new, no chart owed: no redraw
                return [gr.skip()] * 4 + [last]
            records = runs.read_metrics(path)
            tail = runs.log_tail(path)
            headline = status_markdown(path, state, records, code)
            problem = ""
            if state.status == "failed":
                problem = error_box(runs.failure_text(tail, state.exit_code, "The training") +
                                    "\n\nFix what the lines above say, then Start again (or Resume to continue "
                                    "from the last checkpoint).")
            now = time.monotonic()
            due = (str(size) != charted_size or code != previous.rpartition(":")[2]) and (
                state.status != "running" or not charted_at or now - float(charted_at) >= CHART_EVERY_S)
            if due:
                drawn = charts.run_charts(records, chart_titles(code))
                chart_state = f"{size}@{now}"
            else:
                drawn = gr.skip()
            return [headline, drawn, tail, problem, f"{signature}|{chart_state}"]

        def on_tab(event: gr.SelectData):
            return gr.Timer(active=event.index == TRAIN_TAB), gr.Timer(active=event.index == MAKE_TAB)

        tabs.select(on_tab, None, [timer, make_screen.timer], show_progress="hidden")
        timer.tick(on_tick, [run_dir, lang, seen], [status, chart_box, log_box, train_error, seen],
                   show_progress="hidden")

        def on_results(text):
            try:
                path = checked_run_dir(text)
            except UserError as error:
                return error_box(error), None, None, gr.update(value=None, visible=False), ""
            summary = runs.read_json(path / "summary.json")
            if not summary:
                return t("no_run") if not text else f"{path}: no summary.json yet (the run has not finished).", \
                    None, None, gr.update(value=None, visible=False), ""
            samples = (path / "samples.md").read_text(encoding="utf-8") if (path / "samples.md").is_file() else ""
            curve, memory, reward = (str(path / name) if (path / name).is_file() else None
                                     for name in ("loss_curve.png", "memory_speed.png", REWARD_CURVE_FILE))
            return results_markdown(summary), curve, memory, gr.update(value=reward, visible=reward is not None), \
                samples

        results_outputs = [results_md, curve_img, memory_img, reward_img, samples_md]
        results_btn.click(on_results, run_dir, results_outputs)
        results_tab.select(on_results, run_dir, results_outputs)
        # The screen follows the run chosen, not only the tab's click: a page reopened on the newest run, or a tab
        # clicked before the page's load event has chosen it, shows that run instead of "No run chosen".
        run_dir.change(on_results, run_dir, results_outputs, show_progress="hidden")

        def on_eval(text, questions):
            try:
                path = checked_run_dir(text)
                # Empty: the run's own [eval] section, as `qlora-kit eval RUN` reads it.
                extra = ["--file", str(ws.resolve(questions, "questions file"))] if questions.strip() else []
            except UserError as error:
                yield error_box(error).replace("<pre class='studio-error'>", "").replace("</pre>", ""), ""
                return
            for output, code in runs.stream(runs.command("eval", str(path), *extra), ws.root):
                if code is None:
                    yield output, ""
                elif code != 0:
                    yield runs.failure_text(output, code, "The evaluation"), ""
                else:
                    yield output, eval_markdown(runs.read_json(path / "eval.json"))

        eval_btn.click(on_eval, [run_dir, eval_file], [eval_log, eval_table])

        def on_ask(text, q, limit, lang_choice):
            code = LANGUAGES.get(lang_choice, "en")
            try:
                path = checked_run_dir(text)
            except UserError as error:
                yield error_box(error), ""
                return
            if not (q or "").strip():
                yield error_box("Type a question first."), ""
                return
            labels = (t("base_model", code), t("tuned_model", code))
            for base_text, tuned_text, base_code, tuned_code in chat.ask_both(path, q, ws.root, int(limit or 256)):
                sides = []
                for label, out, rc in ((labels[0], base_text, base_code), (labels[1], tuned_text, tuned_code)):
                    if rc > 0:
                        sides.append(error_box(runs.failure_text(out, rc, "The chat")))
                    else:
                        sides.append(chat.reply_html(out, label, t("reasoning", code), done=rc == 0))
                yield sides[0], sides[1]

        ask_btn.click(on_ask, [run_dir, question, max_tokens, lang], [base_reply, tuned_reply])

        def on_export_tab(text):
            try:
                path = checked_run_dir(text)
            except UserError as error:
                return error.render()
            return gguf_advice(path)

        export_tab.select(on_export_tab, run_dir, advice)
        run_dir.change(on_export_tab, run_dir, advice, show_progress="hidden")

        def on_export(text, kind):
            try:
                path = checked_run_dir(text)
            except UserError as error:
                yield error.render(), None
                return
            merged = path / "merged"
            log = ""
            steps = []
            if not (merged / "config.json").is_file():
                steps.append(("The merge", runs.command("merge", str(path))))
            target = path / f"merged-{kind}.gguf"
            steps.append(("The export", runs.command("export", str(merged), "--type", kind, "--out", str(target),
                                                     "--overwrite")))
            for what, argv in steps:
                log += f"$ qlora-kit {' '.join(argv[3:])}\n"
                for output, code in runs.stream(argv, ws.root):
                    if code is None:
                        yield log + output, gr.skip()
                    elif code != 0:
                        yield log + runs.failure_text(output, code, what), None
                        return
                    else:
                        log += output
            files = [str(p) for p in sorted(path.iterdir()) if p.is_file() and p.suffix in (".gguf", ".Modelfile")]
            yield log + "\ndone.", files

        export_btn.click(on_export, [run_dir, gguf_type], [export_log, export_files])
        make_screen.wire(page, lang, tabs, data_box, by_key["data.eval_source"], by_key["data.max_length"])

        def on_open():
            """A reopened page follows the run that is training (the newest one if several), as if never closed;
            with none training, the newest run (one made on the command line too), so that Results, Chat and Export
            show something at once. Nothing is chosen only in a workspace without runs."""
            found = runs.list_runs(ws.runs_dir())
            training = [run for run in found if runs.running_pid(Path(run)) is not None]
            return gr.update(choices=found, value=(training or found or [None])[0])

        page.load(on_open, None, run_dir)
    keep_events_private(page)
    return page


def keep_events_private(page: gr.Blocks) -> None:
    """Every event of the page "private": the page itself calls them as before, but Gradio no longer describes each
    one as a public API. That description (parameters, types, examples of all 37 events) was 290 KB of the page's
    516 KB of HTML, sent and parsed before the form was drawn, for an API nobody uses; and Gradio's client
    libraries refuse private endpoints, so a script cannot call on_start or on_export by name. (Gradio has this as
    a per-listener argument, `api_visibility`; set here once for all instead of on 37 listeners.)"""
    for function in page.fns.values():
        function.api_visibility = "private"
