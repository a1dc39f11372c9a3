"""The documentation: short READMEs, every page reachable, every relative link and #anchor resolving, and the recipe
reference equal to what tools/recipe_reference.py generates from the schema."""

from __future__ import annotations

import importlib.util
import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_README_LINES = 200


def checked_files() -> list[Path]:
    """The Markdown files whose links must resolve."""
    files = [REPO / name for name in ("README.md", "README.zh-CN.md", "ARCHITECTURE.md", "bench/README.md")]
    return [f for f in files if f.exists()] + sorted((REPO / "docs").rglob("*.md"))


# --- reading Markdown -------------------------------------------------------------------------------------------


def prose_lines(text: str):
    """(line number, line) of the lines outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        opener = re.match(r"(`{3,}|~{3,})", stripped)
        if opener:
            if fence is None:
                fence = opener.group(1)
            elif stripped.startswith(fence) and not stripped[len(fence):].strip():
                fence = None
            continue
        if fence is None:
            yield number, line


def without_code_spans(line: str) -> str:
    """The line with every `code span` replaced by a placeholder, so that brackets in code are not links."""
    return re.sub(r"(`+)(.+?)\1", "code", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lower-cased, every character but letters (CJK included),
    marks, digits, `_`, `-` and spaces dropped, each space a `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"(`+)(.+?)\1", r"\2", text)  # code counts by its content
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    kept = "".join(ch for ch in text if ch in " -" or unicodedata.category(ch)[0] in "LMN"
                   or unicodedata.category(ch) == "Pc")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a Markdown file defines: its headings' slugs (a repeated one numbered -1, -2, ... as GitHub
    does) and explicit id= / name= attributes."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(text):
        heading = re.match(r" {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        found.update(re.findall(r"""<[^>]+\b(?:id|name)=["']([^"']+)["']""", line))
    return found


def links(text: str):
    """(line number, target) of every inline link and image outside code."""
    for number, line in prose_lines(text):
        for target in re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", without_code_spans(line)):
            yield number, target


def is_external(target: str) -> bool:
    return bool(re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def broken_links(path: Path) -> list[str]:
    """What is wrong with the relative links of one file: a target that does not exist, an anchor no heading of the
    target defines."""
    problems = []
    text = path.read_text(encoding="utf-8")
    for number, target in links(text):
        if is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path.name}:{number}: {target}"
        if not destination.exists():
            problems.append(f"{where} (no such file)")
            continue
        if anchor:
            if destination.is_dir() or destination.suffix.lower() != ".md":
                problems.append(f"{where} (an anchor into a file that is not Markdown)")
            elif anchor not in anchors(destination.read_text(encoding="utf-8")):
                problems.append(f"{where} (no heading with the anchor #{anchor} in {destination.name})")
    return problems


# --- the checker itself ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("heading", "expected"), [
    ("Will it fit? The VRAM plan", "will-it-fit-the-vram-plan"),
    ("Eval loss, before → after", "eval-loss-before--after"),
    ("`[model]`", "model"),
    ("The `tiled_mlp` switch", "the-tiled_mlp-switch"),
    ("A real small demo: SmolLM2-135M fine-tuned on medical-o1, on a CPU",
     "a-real-small-demo-smollm2-135m-fine-tuned-on-medical-o1-on-a-cpu"),
    ("1. 安装", "1-安装"),
    ("连不上 Hugging Face：镜像、ModelScope，或拷贝文件", "连不上-hugging-face镜像modelscope或拷贝文件"),
    ("[Merge](merge.md) and **more**", "merge-and-more"),
])
def test_slugs_follow_githubs_rules(heading, expected):
    assert slug(heading) == expected


def test_the_link_checker_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## 显存估算\n\n## Twice\n\n## Twice\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md) [fine](other.md#other-page) [fine](other.md#显存估算) [fine](other.md#twice-1)\n"
        "[fine](#page) [fine](https://example.org/missing.md) `[not a link](missing.md)`\n"
        "```\n[not a link either](missing.md)\n```\n"
        "[no file](missing.md) [no anchor](other.md#nowhere) [no anchor here](#elsewhere)\n",
        encoding="utf-8")
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert "missing.md (no such file)" in problems[0]
    assert "#nowhere" in problems[1] and "#elsewhere" in problems[2]


def test_fenced_code_is_not_prose():
    text = "a\n```bash\n# not a heading\n[x](nowhere.md)\n```\n## Real\n"
    assert anchors(text) == {"real"}
    assert list(links(text)) == []


# --- the documentation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["README.md", "README.zh-CN.md"])
def test_the_readme_is_short(name):
    lines = len((REPO / name).read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, f"{name} has {lines} lines; the details belong in docs/"


@pytest.mark.parametrize("path", checked_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path):
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def reachable_from(start: Path) -> set[Path]:
    """Every Markdown file a reader can reach from `start` by following relative links."""
    reached, todo = set(), [start.resolve()]
    while todo:
        page = todo.pop()
        if page in reached or not page.exists():
            continue
        reached.add(page)
        for _, target in links(page.read_text(encoding="utf-8")):
            file_part = target.partition("#")[0]
            if file_part and not is_external(target) and file_part.endswith(".md"):
                todo.append((page.parent / file_part).resolve())
    return reached


def test_reachability_follows_links_only(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("[a](docs/a.md#x)\n", encoding="utf-8")
    (tmp_path / "docs" / "a.md").write_text("# X\n\n[b](b.md) `[c](c.md)`\n", encoding="utf-8")
    for name in ("b", "c"):
        (tmp_path / "docs" / f"{name}.md").write_text("# Page\n", encoding="utf-8")
    reached = {p.name for p in reachable_from(tmp_path / "README.md")}
    assert reached == {"README.md", "a.md", "b.md"}


def test_every_page_is_reachable_from_the_readme():
    reached = reachable_from(REPO / "README.md")
    unreached = [str(p.relative_to(REPO)) for p in sorted((REPO / "docs").rglob("*.md")) if p.resolve() not in reached]
    assert not unreached, f"no link leads from README.md to: {unreached} (add it to the README's table of contents)"


TASK_PAGES = ("data", "fit", "training", "results", "merge", "gguf", "windows-and-hubs", "troubleshooting")
"""The user path's pages, in English and Chinese; with the reference pages they open with the line that says what
they answer (feature pages such as docs/grpo.md and docs/studio.md keep their own openings)."""
OPENING_CHECKED = [REPO / "docs" / f"{name}.md" for name in (*TASK_PAGES, "recipe", "benchmarks", "tests")] + \
                  [REPO / "docs" / "zh-CN" / f"{name}.md" for name in TASK_PAGES]


@pytest.mark.parametrize("page", OPENING_CHECKED, ids=lambda p: str(p.relative_to(REPO / "docs")))
def test_every_page_says_first_what_it_answers(page):
    lines = page.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# "), f"{page.name} does not open with its title"
    assert len(lines) > 3 and not lines[1] and lines[2] and not lines[3], \
        f"{page.name}: the title is followed by one line that says what the page answers, then a blank line"
    assert not lines[2].startswith(("#", "|", "```", "- ", "<", "中文", "English")), lines[2]


def load_tool():
    spec = importlib.util.spec_from_file_location("recipe_reference", REPO / "tools" / "recipe_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_recipe_reference_is_generated_from_the_schema():
    tool = load_tool()
    assert tool.PAGE.read_text(encoding="utf-8") == tool.page(), (
        "docs/recipe.md differs from the recipe schema (qlora_kit/recipe/schema.py): "
        "run `python tools/recipe_reference.py --write` and commit docs/recipe.md")


def test_the_recipe_reference_lists_every_key():
    from qlora_kit.recipe.field_docs import recipe_keys

    tool = load_tool()
    text = tool.page()
    for key in recipe_keys():
        assert f"| `{key.name}` |" in text, key.full
    assert "## `[sft]`" in text


def test_the_check_fails_on_a_stale_page(tmp_path, monkeypatch, capsys):
    tool = load_tool()
    stale = tmp_path / "recipe.md"
    stale.write_text(tool.page().replace("| `max_length` |", "| `max_len` |"), encoding="utf-8")
    monkeypatch.setattr(tool, "PAGE", stale)
    assert tool.main(["--check"]) == 1
    assert "python tools/recipe_reference.py --write" in capsys.readouterr().err
    monkeypatch.setattr(tool, "PAGE", tmp_path / "fresh.md")
    assert tool.main(["--write"]) == 0
    assert tool.main(["--check"]) == 0
