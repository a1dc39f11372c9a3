"""The installed package as a user meets it: imports that do not depend on the current directory."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest


def test_a_folder_named_qlora_kit_in_the_current_directory_does_not_shadow_the_package(tmp_path):
    """The parent of a clone named qlora_kit, with a data/ folder in it: Python used to take that folder for the
    package (a namespace package) and its data/ for qlora_kit.data."""
    try:
        importlib.metadata.distribution("qlora_kit")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("qlora_kit is not installed (pip install -e .): the shadowing is about the installed package")
    (tmp_path / "qlora_kit" / "data").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", "from qlora_kit.data.rows import Row; import qlora_kit.run"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def qlora_kit_command(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`qlora-kit ARGS` as installed (the console script beside this Python), else `python -m qlora_kit ARGS`."""
    from pathlib import Path

    script = Path(sys.executable).with_name("qlora-kit")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "qlora_kit"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "120"})


def test_one_command_lists_every_tool():
    result = qlora_kit_command("--help")
    assert result.returncode == 0
    for name in ("run", "plan", "chat", "merge", "export", "eval", "bench"):
        assert f"\n  {name} " in result.stdout, name
    wrong = qlora_kit_command("merg")
    assert wrong.returncode == 2 and "did you mean `merge`" in wrong.stderr


@pytest.mark.parametrize("name", ["run", "plan", "chat", "merge", "export", "eval", "bench"])
def test_each_command_names_itself_as_typed(name):
    result = qlora_kit_command(name, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"usage: qlora-kit {name} " in result.stdout, result.stdout[:500]


@pytest.mark.parametrize("text, message", [
    ("[train]\nmax_step = 5\n", "did you mean `train.max_steps`"),
    ('[sft]\nreport_to = "tensorboard"\n', "use `output.report_to` instead"),
])
def test_a_recipe_mistake_is_answered_before_the_libraries_load(tmp_path, text, message):
    """Validation runs before torch and transformers are imported (they take seconds): the answer comes at once."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    probe = ("import sys, runpy; sys.argv = ['qlora-kit', 'run', sys.argv[1]]\n"
             "from qlora_kit.cli import main\ncode = main(sys.argv[1:])\n"
             "print('heavy:', sorted(m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules))\n"
             "sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", probe, str(recipe)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr
    assert "heavy: []" in result.stdout


def test_merge_help_shows_the_default_dtype():
    result = qlora_kit_command("merge", "--help")
    assert result.returncode == 0 and "default: float16" in " ".join(result.stdout.split())
