"""The READMEs and the user pages: the Chinese ones keep in step with the English ones, command for command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

USER_PAGES = ("data", "fit", "training", "results", "merge", "gguf", "windows-and-hubs", "troubleshooting",
              "preference")
"""The pages of the user path, each with a Chinese translation under docs/zh-CN/ (not the benchmark log, the tests
page or the generated recipe reference)."""

PAIRS = [("README.md", "README.zh-CN.md")] + [(f"docs/{page}.md", f"docs/zh-CN/{page}.md") for page in USER_PAGES]


def commands(markdown: str) -> set[str]:
    """Every command line of the ```bash blocks, without its trailing comment."""
    found = set()
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                found.add(line)
    return found


def read(path: str) -> str:
    return (REPO / path).read_text(encoding="utf-8")


@pytest.mark.parametrize(("english", "chinese"), PAIRS, ids=[english for english, _ in PAIRS])
def test_every_command_of_one_page_is_in_its_translation(english, chinese):
    assert (REPO / chinese).exists(), f"{english} has no Chinese page {chinese}"
    en, zh = commands(read(english)), commands(read(chinese))
    assert not en - zh, f"in {english} but not in {chinese}: {sorted(en - zh)}"
    assert not zh - en, f"in {chinese} but not in {english}: {sorted(zh - en)}"


def test_the_user_pages_show_the_commands():
    """The pairs above compare something: the user path is documented with runnable commands."""
    everything = set().union(*(commands(read(english)) for english, _ in PAIRS))
    assert len(everything) > 20
    for english, _ in PAIRS:
        if english not in ("docs/troubleshooting.md",):
            assert commands(read(english)), f"{english} shows no command"


def test_commands_are_compared_without_their_comments():
    text = "```bash\npython -m qlora_kit.run r.toml   # train\n# a comment line\n\n```\n"
    assert commands(text) == {"python -m qlora_kit.run r.toml"}


def test_the_readme_opens_with_the_two_commands():
    lines = read("README.md").splitlines()
    first_block = lines.index("```bash")
    assert first_block < 6, "the two commands a newcomer needs come first"
    assert lines[first_block + 1].startswith("pip install -e . && python -m qlora_kit.run recipes/demo.toml")
    assert lines[first_block + 2].startswith('pip install -e ".[test]" && python -m pytest')
