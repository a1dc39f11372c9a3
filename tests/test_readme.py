"""The READMEs: the Chinese one keeps in step with the English one, command for command."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commands(markdown: str) -> set[str]:
    """Every command line of the ```bash blocks, without its trailing comment."""
    found = set()
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                found.add(line)
    return found


def test_every_command_of_one_readme_is_in_the_other():
    english = commands((REPO / "README.md").read_text(encoding="utf-8"))
    chinese = commands((REPO / "README.zh-CN.md").read_text(encoding="utf-8"))
    assert len(english) > 20
    assert not english - chinese, f"in README.md but not in README.zh-CN.md: {sorted(english - chinese)}"
    assert not chinese - english, f"in README.zh-CN.md but not in README.md: {sorted(chinese - english)}"


def test_the_readme_opens_with_the_two_commands():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    first_block = lines.index("```bash")
    assert first_block < 6, "the two commands a newcomer needs come first"
    assert lines[first_block + 1].startswith("pip install -e . && python -m qlora_kit.run recipes/demo.toml")
    assert lines[first_block + 2].startswith('pip install -e ".[test]" && python -m pytest')
