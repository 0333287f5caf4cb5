"""The package's layout rules, checked on its source: the one-way flow and no import circle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "embedsvc"


def imports() -> dict[str, set[str]]:
    """module -> the embedsvc modules it imports (at the top or inside functions)."""
    out: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("embedsvc"):
                deps.add(str(node.module))
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("embedsvc")}
        out[name] = deps
    return out


def test_no_import_circles() -> None:
    graph = imports()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep == goal:
                    return True
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return False

    circles = sorted(
        {
            tuple(sorted((a, b)))
            for a, deps in graph.items()
            for b in deps
            if b != a and b in graph and reaches(b, a)
        }
    )
    assert circles == []


def test_the_flow_goes_one_way() -> None:
    """http/ below api/, engine/ free of the web stack, backends/ below engine/."""
    graph = imports()
    for module, deps in graph.items():
        if module.startswith("embedsvc.http"):
            assert not any(d.startswith("embedsvc.api") for d in deps), module
        if module.startswith(("embedsvc.engine", "embedsvc.backends")):
            assert not any(d.startswith(("embedsvc.api", "embedsvc.http")) for d in deps), module
        if module.startswith("embedsvc.backends"):
            assert not any(d.startswith("embedsvc.engine") for d in deps), module
    for path in (PACKAGE / "engine").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import fastapi" not in text and "from fastapi" not in text, path
        assert "pydantic" not in text, path
