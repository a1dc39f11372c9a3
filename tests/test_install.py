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
    result = subprocess.run([sys.executable, "-c", "from qlora_kit.data import Row; import qlora_kit.run"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
