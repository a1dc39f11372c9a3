"""The house keeps its shape: ARCHITECTURE.md's stage table is the law, read from the file itself.

Every import in qlora_kit/ (module level, inside functions, under `if TYPE_CHECKING:`: a type-only import is a
dependency too) is read with `ast`. Three rules:
  1. every package and top-level module of qlora_kit/ is in the table, and everything the table names exists;
  2. one way only: a module imports its own package, the shared pieces, and the stages *before* its own;
     nothing imports the spine;
  3. no import circles between modules, inside a package or across packages.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "qlora_kit"
ARCHITECTURE = REPO / "ARCHITECTURE.md"

# A table row: | 3 | `model/` | its job | may import |   (the order column: "shared", a number, or "spine")
ROW = re.compile(r"^\|\s*(?P<order>shared|spine|\d+)\s*\|\s*(?P<names>[^|]+?)\s*\|", re.M)


def stage_table() -> dict[str, int | str]:
    """Package or top-level module name -> its order: "shared", "spine", or the stage number."""
    table = {}
    for match in ROW.finditer(ARCHITECTURE.read_text(encoding="utf-8")):
        order = match["order"]
        for name in re.findall(r"`([a-z_0-9]+)(?:/|\.py)`", match["names"]):
            table[name] = order if order in ("shared", "spine") else int(order)
    return table


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The qlora_kit modules `name` imports, anywhere in the file (`from qlora_kit import x` counts as x)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name and target.startswith("qlora_kit"):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def top(name: str) -> str:
    """qlora_kit.train.fit -> train; qlora_kit.run -> run; qlora_kit -> the package itself."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_table_names_every_package_and_nothing_else():
    table = stage_table()
    assert {"recipe", "data", "model", "train", "run"} <= set(table), "ARCHITECTURE.md's stage table is unreadable"
    on_disk = {path.stem if path.is_file() else path.name for path in PACKAGE.iterdir()
               if (path.is_dir() and any(path.glob("*.py"))) or (path.suffix == ".py" and path.stem != "__init__")}
    assert on_disk - set(table) == set(), "in qlora_kit/ but not in ARCHITECTURE.md's table"
    assert set(table) - on_disk == set(), "in ARCHITECTURE.md's table but not in qlora_kit/"


def test_imports_go_one_way():
    table = stage_table()
    wrong = []
    for name, targets in import_graph().items():
        here = table.get(top(name))
        for target in targets:
            there = table.get(top(target))
            if top(name) in ("", top(target)):
                continue  # the package's own __init__, or a module of the same package
            if there == "spine":
                wrong.append(f"{name} imports the spine {target}")
            elif here == "shared" and there != "shared":
                wrong.append(f"shared {name} imports the stage {target}")
            elif isinstance(here, int) and isinstance(there, int) and there > here:
                wrong.append(f"{name} (stage {here}) imports a later stage: {target} (stage {there})")
    assert not wrong, "\n".join(wrong)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    graph = import_graph()
    # A package's __init__ importing its own modules is how `python -m qlora_kit.merge` finds main; not a circle.
    for name in graph:
        if modules()[name].name == "__init__.py":
            graph[name] = set()
    assert cycles(graph) == []


def test_the_checks_catch_a_circle_and_an_upward_import():
    """The rules above can fail: a made-up graph with both faults is caught."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    table = stage_table()
    assert table["data"] < table["train"], "the table must order data before train"


@pytest.mark.parametrize("fault", ["upward", "circle"])
def test_a_planted_fault_is_reported(tmp_path, monkeypatch, fault):
    """Copy the package, plant one bad import, and the real checks above report it."""
    import shutil

    copy = tmp_path / "qlora_kit"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "demo"))
    victim = copy / "data" / "rows.py"
    planted = {"upward": "from qlora_kit.train.fit import fit\n",
               "circle": "from qlora_kit.data.report import show_data\n"}[fault]
    victim.write_text(victim.read_text(encoding="utf-8") + "\n\ndef _planted():\n    " + planted, encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", copy)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    check = test_imports_go_one_way if fault == "upward" else test_no_import_circles
    with pytest.raises(AssertionError):
        check()


def test_gguf_advice_sizes_what_the_export_writes():
    """plan/ sizes GGUF files without importing the export (a later stage): the two lists must agree."""
    from qlora_kit.gguf.model_config import ARCHITECTURES
    from qlora_kit.plan.gguf_sizes import SIZED_ARCHITECTURES

    assert set(SIZED_ARCHITECTURES) == set(ARCHITECTURES)


def test_architecture_md_stays_a_one_page_map():
    assert len(ARCHITECTURE.read_text(encoding="utf-8").splitlines()) <= 150
