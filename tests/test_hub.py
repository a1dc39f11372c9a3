"""Reaching the hub: one short check, the cache used offline, one screen when something is missing; ModelScope."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

from qlora_kit.data.hub import HubItem, hub_items, is_cached, settle_hub_access
from qlora_kit.errors import UserError
from qlora_kit.recipe.loading import recipe_from_dict
from qlora_kit.recipe.schema import Recipe

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An unreachable hub and an empty cache, without the suite's HF_HUB_OFFLINE."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", CLOSED)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_what_a_recipe_would_fetch():
    assert [(i.kind, i.repo_id, i.recipe_key) for i in hub_items(Recipe())] == [
        ("model", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "model.name"),
        ("dataset", "FreedomIntelligence/medical-o1-reasoning-SFT", "data.source")]
    from_modelscope = recipe_from_dict({"model": {"hub": "modelscope"}, "data": {"source": "/x/rows.jsonl"}})
    assert hub_items(from_modelscope) == []


def test_unreachable_hub_and_nothing_cached_is_one_screen(no_hub):
    with pytest.raises(UserError) as caught:
        settle_hub_access(Recipe())
    text = caught.value.render()
    assert "did not answer within 4 s" in text and CLOSED in text
    assert "model.name = 'deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B' (model) is not in the local cache" in text
    for way in ("HF_ENDPOINT=", "model.hub=modelscope", "hf download deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
                "set model.name=models/DeepSeek-R1-Distill-Qwen-1.5B"):
        assert way in text, way
    assert len(text.splitlines()) <= 40


def test_unreachable_hub_with_everything_cached_goes_offline(no_hub, monkeypatch):
    for kind, repo in (("models", "deepseek-ai--DeepSeek-R1-Distill-Qwen-1.5B"),
                       ("datasets", "FreedomIntelligence--medical-o1-reasoning-SFT")):
        snapshot = no_hub / f"{kind}--{repo}" / "snapshots" / "abc123"
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text("{}")
    assert is_cached(HubItem("model", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "model.name"))
    said = []
    assert settle_hub_access(Recipe(), say=said.append) == "offline"
    assert os.environ["HF_HUB_OFFLINE"] == "1" and "using the copies in the local cache" in said[0]


def test_a_dry_run_against_an_unreachable_hub_answers_in_seconds(no_hub, tmp_path):
    """It used to print a dozen "Retrying in Ns" lines for about a minute."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "qlora_kit.run", str(REPO / "recipes" / "medical.toml"),
                             "--dry-run", f"output.dir={tmp_path / 'out'}"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and "did not answer within" in result.stderr, result.stderr[-2000:]
    assert "Retrying" not in result.stderr + result.stdout and "Traceback" not in result.stderr
    assert len((result.stdout + result.stderr).splitlines()) <= 40
    assert time.monotonic() - started < 30  # the probe is 4 s at most; the rest is Python starting
    assert not (tmp_path / "out").exists()


def test_modelscope_without_its_package_says_how_to_install(monkeypatch):
    from qlora_kit.data.hub import fetch_from_modelscope
    from qlora_kit.data.rows import load_rows

    if "modelscope" in sys.modules or __import__("importlib").util.find_spec("modelscope"):
        pytest.skip("modelscope is installed here: this checks the message when it is not")
    recipe = recipe_from_dict({"model": {"hub": "modelscope"}, "data": {"hub": "modelscope"}})
    with pytest.raises(UserError, match=r'pip install "qlora_kit\[modelscope\]"'):
        fetch_from_modelscope(recipe, weights=False)
    with pytest.raises(UserError, match=r'pip install "qlora_kit\[modelscope\]"'):
        load_rows(recipe.data)


def test_a_mistyped_local_path_is_named_with_the_file_meant_and_the_hub_never_asked(no_hub, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "medical_zh.jsonl").write_text("{}\n")
    recipe = recipe_from_dict({"data": {"source": "data/medical_zh.jsnl"}})
    recipe.source_path = str(tmp_path / "recipe.toml")
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        settle_hub_access(recipe)
    text = caught.value.render()
    assert "data.source = 'data/medical_zh.jsnl': no such file or folder (did you mean `data/medical_zh.jsonl`?)" \
        in text
    assert "did not answer" not in text and time.monotonic() - started < 2  # not the hub's 4 s probe
    # An org/name hub id with no such local folder is left to the hub.
    with pytest.raises(UserError, match="did not answer"):
        settle_hub_access(recipe_from_dict({"data": {"source": "FreedomIntelligence/medical-o1-reasoning-SFT"}}))


def test_a_missing_data_file_names_the_close_one_and_is_not_asked_of_the_hub(tmp_path):
    from qlora_kit.data.rows import read_source_records
    from qlora_kit.recipe.schema import DataSection

    (tmp_path / "medical_zh.jsonl").write_text("{}\n")
    for typo in ("medical_zh.jsnl", "medical_zh.jsonl.txt", "medicl_zh.jsonl"):
        with pytest.raises(UserError) as caught:
            read_source_records(DataSection(source=str(tmp_path / typo)))
        assert "Data file not found" in caught.value.title, typo
        assert f"(did you mean `{tmp_path}/medical_zh.jsonl`?)" in caught.value.title, typo


def test_a_bare_missing_file_name_says_where_it_looked_and_names_the_file_beside_it(tmp_path, monkeypatch):
    from qlora_kit.data.rows import read_source_records
    from qlora_kit.recipe.schema import DataSection

    (tmp_path / "medical_o1_en.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as caught:
        read_source_records(DataSection(source="medical_o1_en.json"))
    assert caught.value.title == (f"Data file not found: medical_o1_en.json (looked for {tmp_path}/medical_o1_en.json)"
                                  " (did you mean `medical_o1_en.jsonl`?)")
