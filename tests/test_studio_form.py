"""The studio without a browser: the form <-> recipe round trip, the launcher's safety checks, path confinement,
the run-directory reading. Real recipes, real files, the real CLI's loader; Gradio is not needed here."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_kit.errors import UserError
from qlora_kit.recipe.field_docs import recipe_keys
from qlora_kit.recipe.loading import load_recipe, recipe_from_dict, recipe_to_dict
from qlora_kit.studio import form
from qlora_kit.studio.cli import check_options, is_loopback, parse_args
from qlora_kit.studio.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]


def test_every_recipe_key_is_a_form_field_once():
    keys = [k.full for k in recipe_keys()]
    assert [k.full for k in form.KEYS] == keys
    placed = set(form.SCREEN_KEYS) | {k.full for k in form.common_keys()}
    placed |= {k.full for section in form.advanced_keys().values() for k in section}
    assert placed == set(keys)
    shown = [k.full for k in form.common_keys()] + [k.full for s in form.advanced_keys().values() for k in s]
    assert len(shown) == len(set(shown)), "a key is shown twice"


def test_defaults_write_a_minimal_toml_that_loads_back_to_the_default_recipe(tmp_path):
    raw = form.form_to_raw(form.defaults())
    assert set(raw) == {"model", "data", "output"}  # only what a recipe is about; the rest is default
    path = tmp_path / "r.toml"
    path.write_text(form.raw_to_toml(raw), encoding="utf-8")
    assert recipe_to_dict(load_recipe(path)) == recipe_to_dict(recipe_from_dict({}))


@pytest.mark.parametrize("recipe_file", sorted((REPO / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_round_trips_through_the_form(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file)
    values = form.recipe_values(recipe)
    raw = form.form_to_raw(values, form.sft_text(recipe))
    written = tmp_path / "from_form.toml"
    written.write_text(form.raw_to_toml(raw), encoding="utf-8")
    again = load_recipe(written)
    assert recipe_to_dict(again) == recipe_to_dict(recipe)
    assert recipe_to_dict(form.form_recipe(values, form.sft_text(recipe))) == recipe_to_dict(recipe)


def test_form_values_reach_the_recipe_one_key_at_a_time():
    """Every key alone, set through its widget value: the loaded recipe holds it (or the loader names that key)."""
    for i, key in enumerate(form.KEYS):
        if key.kind == "bool":
            new = not key.default
        elif key.kind == "int":
            new = float(key.default + 16)  # a number box gives floats
        elif key.kind == "float":
            new = 0.5 if key.default != 0.5 else 0.25
        elif key.kind == "list":
            new = "tensorboard" if key.full == "output.report_to" else "q_proj, v_proj"
        elif key.kind == "table":
            new = "".join(f"{name} = {value * 2}\n" for name, value in key.default.items()) or "x = 1\n"
        elif key.choices:
            new = next(c for c in key.choices if c != key.default)
        else:
            continue  # free text (paths, templates): covered by the shipped recipes' round trip
        values = form.defaults()
        values[i] = new
        try:
            recipe = form.form_recipe(values)
        except UserError as error:
            assert key.full in error.render(), (key.full, error.render())
            continue
        assert getattr(getattr(recipe, key.section), key.name) == form.from_widget_value(key, new), key.full


def test_the_sft_table_reaches_the_recipe():
    assert form.form_recipe(form.defaults(), "neftune_noise_alpha = 5\n").sft == {"neftune_noise_alpha": 5}


def test_a_typo_in_the_form_gets_the_loaders_message_naming_the_key():
    values = form.defaults()
    values[form.KEYS.index(form.BY_NAME["lora.r"])] = 0.0
    values[form.KEYS.index(form.BY_NAME["train.learning_rate"])] = 3.0
    with pytest.raises(UserError) as caught:
        form.form_recipe(values)
    text = caught.value.render()
    assert "lora.r" in text and "train.learning_rate" in text and "2 problems" in text


def test_bad_sft_toml_is_a_user_error():
    with pytest.raises(UserError, match=r"\[sft\] table is not valid TOML"):
        form.form_to_raw(form.defaults(), "neftune = = 5")


# ------------------------------------------------------------------------------------------------ launcher safety


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_hosts(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.org"])
def test_other_hosts_need_auth(host, tmp_path):
    with pytest.raises(UserError, match="without a login"):
        check_options(parse_args(["--host", host, "--root", str(tmp_path)]))
    assert check_options(parse_args(["--host", host, "--auth", "me:secret", "--root", str(tmp_path)])) == \
        ("me", "secret")


@pytest.mark.parametrize("auth", ["nopassword", ":pw", "user:"])
def test_malformed_auth_is_refused(auth, tmp_path):
    with pytest.raises(UserError, match="USER:PASSWORD"):
        check_options(parse_args(["--auth", auth, "--root", str(tmp_path)]))


def test_missing_root_is_refused(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        check_options(parse_args(["--root", str(tmp_path / "nope")]))


def test_the_command_refuses_an_open_host_before_importing_gradio(tmp_path):
    """`qlora-kit studio --host 0.0.0.0` exits 2 with the reason, at once, and serves nothing."""
    done = subprocess.run([sys.executable, "-m", "qlora_kit", "studio", "--host", "0.0.0.0", "--no-browser",
                           "--root", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "without a login" in done.stderr and "--auth USER:PASSWORD" in done.stderr
    assert "Traceback" not in done.stderr


def test_studio_help_lists_the_safety_options():
    done = subprocess.run([sys.executable, "-m", "qlora_kit", "studio", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    for option in ("--host", "--auth", "--root", "--no-browser", "--max-upload-mb"):
        assert option in done.stdout


# ------------------------------------------------------------------------------------------------ workspace


def test_paths_are_confined_to_the_workspace(tmp_path):
    ws = Workspace(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text("{}\n")
    assert ws.resolve("data/rows.jsonl") == tmp_path.resolve() / "data" / "rows.jsonl"
    for outside in ("../elsewhere.jsonl", "/etc/passwd", "data/../../x.jsonl"):
        with pytest.raises(UserError, match="outside the studio's workspace"):
            ws.resolve(outside)
    link = tmp_path / "escape"
    link.symlink_to("/etc")
    with pytest.raises(UserError, match="outside"):
        ws.resolve("escape/passwd")


def test_hub_ids_pass_paths_are_resolved(tmp_path):
    ws = Workspace(tmp_path)
    assert ws.reference("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "model") == \
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert ws.reference("rows.jsonl", "data") == str(tmp_path.resolve() / "rows.jsonl")
    with pytest.raises(UserError):
        ws.reference("../../secret.gguf", "model")


def test_the_demo_assets_are_allowed(tmp_path):
    from qlora_kit.studio.workspace import demo_dir

    assert Workspace(tmp_path).resolve(str(demo_dir() / "data.jsonl")).is_file()


def test_uploads_go_under_the_root_within_the_limit(tmp_path):
    ws = Workspace(tmp_path / "root", upload_limit_mb=1)
    ws.root.mkdir()
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    small.write_text('{"Question": "q"}\n')
    big.write_bytes(b"x" * (1024 * 1024 + 1))
    assert ws.save_upload(str(small), "../../small.jsonl") == ws.root / "data" / "small.jsonl"
    with pytest.raises(UserError, match="up to 1 MB"):
        ws.save_upload(str(big), "big.jsonl")


# ------------------------------------------------------------------------------------------------ run directories


def test_chat_output_splits_into_reasoning_and_answer():
    from qlora_kit.studio.chat import split_reply

    text = "loading\n" + "─" * 10 + " thinking " + "─" * 10 + "\nstep one\n" + "─" * 10 + " answer " + "─" * 10 + \
        "\nIt is normal.\n"
    assert split_reply(text) == ("step one", "It is normal.")
    assert split_reply("just an answer") == ("", "just an answer")


def test_a_training_that_dies_is_failed_with_its_last_lines(tmp_path):
    """A real `qlora-kit run` child on a recipe with a typo: the run directory reads as failed, exit 2, and the
    page's text holds the CLI's message and no traceback."""
    from qlora_kit.studio import runs

    recipe = tmp_path / "bad.toml"
    run_dir = tmp_path / "runs" / "bad"
    recipe.write_text(f'[train]\nmax_stepz = 3\n[output]\ndir = "{run_dir}"\n', encoding="utf-8")
    runs.start_run(run_dir, recipe, tmp_path)
    assert runs.wait_for(run_dir, 120) == 2
    deadline = time.monotonic() + 10
    while runs.exit_code(run_dir) is None and time.monotonic() < deadline:  # written by the studio's waiter thread
        time.sleep(0.05)
    state = runs.run_status(run_dir)
    assert state.status == "failed" and state.exit_code == 2
    text = runs.failure_text(runs.log_tail(run_dir), state.exit_code, "The training")
    assert "the input needs a fix" in text and "train.max_steps" in text and "Traceback" not in text
    assert runs.list_runs(tmp_path / "runs") == [str(run_dir)]
    assert runs.running_pid(run_dir) is None and not runs.stop_run(run_dir)


def test_each_problem_of_a_refused_form_goes_under_the_key_it_names():
    from qlora_kit.studio.form import SFT_FIELD, problems_by_field

    values = form.defaults()
    values[form.KEYS.index(form.BY_NAME["data.source"])] = "data.jsonl"
    values[form.KEYS.index(form.BY_NAME["lora.r"])] = 0
    values[form.KEYS.index(form.BY_NAME["train.batch_size"])] = 0
    with pytest.raises(UserError) as refused:
        form.form_recipe(values, "neftune_noise_alpha = 5\nno_such_argument = 1\n")
    fields = problems_by_field(refused.value, fallback="output.dir")
    assert set(fields) == {"lora.r", "train.batch_size", SFT_FIELD}
    assert "`lora.r`" in fields["lora.r"] and "batch_size" not in fields["lora.r"]
    assert "no_such_argument" in fields[SFT_FIELD]
    assert "Fix the keys above" not in "".join(fields.values())


@pytest.mark.parametrize(("line", "field"), [
    ("`grpo.rewards.choice` must be a number (the reward's weight), got 'x'", "grpo.rewards"),
    ("data.eval_rows = 16 leaves no rows to train on (5 usable rows).", "data.eval_rows"),
    ("model.name = 'x/y' (model) is not in the local cache", "model.name"),
    ("/w/data/bad.jsonl, line 6: not valid JSON", None),
    ("runs/data.max_length is a folder name, not a key", None),
])
def test_the_field_a_line_names(line, field):
    assert form.field_of(line) == field


def test_a_commands_error_is_read_from_its_output():
    from qlora_kit.studio.runs import cli_error

    output = ("recipe ...\n  data.source = 'x'\n"
              "error: /w/bad.jsonl, line 2: not valid JSON.\n\nFix or delete that line.\n")
    assert cli_error(output) == "/w/bad.jsonl, line 2: not valid JSON.\n\nFix or delete that line."
    assert cli_error("all fine\n") == ""


def test_a_mistyped_file_in_a_workspace_folder_is_a_path_and_a_hub_id_is_not(tmp_path):
    from qlora_kit.studio.workspace import Workspace

    (tmp_path / "data").mkdir()
    ws = Workspace(tmp_path)
    assert ws.is_path("data/rows.jsnl")
    assert not ws.is_path("FreedomIntelligence/medical-o1-reasoning-SFT")


def test_gradios_queue_polls_calmly_and_still_reads_the_attributes_set():
    import inspect

    import gradio as gr

    from qlora_kit.studio.cli import QUEUE_IDLE_POLL_S, QUEUE_PROGRESS_POLL_S, calm_queue

    with gr.Blocks() as page:
        gr.Textbox()
    calm_queue(page.queue())
    queue = page._queue
    assert (queue.sleep_when_free, queue.progress_update_sleep_when_free) == (QUEUE_IDLE_POLL_S, QUEUE_PROGRESS_POLL_S)
    # The loops read them on every turn: a Gradio that renamed them would make calm_queue a silent no-op.
    assert "self.sleep_when_free" in inspect.getsource(type(queue).start_processing)
    assert "self.progress_update_sleep_when_free" in inspect.getsource(type(queue).start_progress_updates)


def test_a_gguf_file_chosen_as_the_model_is_read_as_loading_a_recipe_reads_it(tmp_path):
    """The model list offers .gguf files: the form's recipe must be the folder + the file, as load_recipe makes it
    (the planner and the chat read it so; a bare .gguf name made the fit gauge fail)."""
    gguf = tmp_path / "models" / "tiny.Q4_1.gguf"
    values = form.defaults()
    values[form.KEYS.index(form.BY_NAME["model.name"])] = str(gguf)
    values[form.KEYS.index(form.BY_NAME["data.source"])] = "data.jsonl"
    recipe = form.form_recipe(values)
    assert (recipe.model.name, recipe.model.gguf_file) == (str(gguf.parent), str(gguf))
