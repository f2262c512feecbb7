"""The package's shape: every internal import resolves, no import cycles, stages depend one way only.

Imports inside functions count (the package imports heavy libraries lazily, so most of its edges
live there): the graph is read from the source, not from what happens to be imported at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "peft_pipeline"  # tests/ sits beside the package

# Lower layers never import higher ones. Within a layer, modules may import each other (acyclically).
LAYERS = [
    ["errors", "console"],
    ["paths"],
    ["config"],
    ["rundir", "report"],
    ["data"],
    ["model"],
    ["evaluate"],
    ["train"],
    ["merge"],
    ["export"],
    ["tasks"],
    ["tools"],
    ["cli", "__main__", "__init__"],
]


def modules() -> dict[str, Path]:
    """Dotted module name (without the package) -> file."""
    out = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def top_level_names(f: Path) -> set[str]:
    names = set()
    for node in ast.parse(f.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def edges() -> dict[str, list[tuple[str, int, str]]]:
    """module -> [(imported module, line, imported name or '')], every peft_pipeline import in the file."""
    mods = modules()
    out: dict[str, list[tuple[str, int, str]]] = {m: [] for m in mods}
    for mod, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "peft_pipeline":
                base = node.module[len("peft_pipeline."):] if node.module != "peft_pipeline" else ""
                for a in node.names:
                    sub = f"{base}.{a.name}".strip(".")
                    if sub in mods:  # `from peft_pipeline.x import submodule`
                        out[mod].append((sub, node.lineno, ""))
                    else:
                        out[mod].append((base, node.lineno, a.name))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "peft_pipeline":
                        out[mod].append((a.name[len("peft_pipeline."):], node.lineno, ""))
    return out


def layer(mod: str) -> int:
    head = mod.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if head in names)


def test_every_module_has_a_layer():
    for mod in modules():
        assert any(mod.split(".")[0] in names for names in LAYERS), f"{mod}: add it to LAYERS"


def test_every_internal_import_resolves():
    mods = modules()
    broken = []
    for mod, targets in edges().items():
        for target, line, name in targets:
            if target not in mods:
                broken.append(f"{mod}:{line}: no module peft_pipeline.{target}")
            elif name and name not in top_level_names(mods[target]):
                broken.append(f"{mod}:{line}: peft_pipeline.{target} has no {name}")
    assert not broken, "\n".join(broken)


def test_no_import_cycles():
    graph = {m: sorted({t for t, _, _ in ts if t != m and t in modules()}) for m, ts in edges().items()}
    # A package's __init__ is imported with any of its modules; it imports nothing here, so no edges to add.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_stages_import_only_lower_layers():
    wrong = [f"{mod}:{line}: imports {target} (layer {layer(target)} > {layer(mod)})"
             for mod, targets in edges().items() for target, line, _ in targets
             if target in modules() and layer(target) > layer(mod)]
    assert not wrong, "a stage imports a later one (move the shared piece down):\n" + "\n".join(wrong)


@pytest.mark.parametrize("mod", sorted(m for m in modules() if m != "__main__"))
def test_every_module_says_what_it_owns(mod):
    doc = ast.get_docstring(ast.parse(modules()[mod].read_text()))
    assert doc and len(doc.split()) >= 5, f"{mod}: needs a module docstring saying what it owns"


def test_functions_fit_a_screen_or_say_why():
    long = []
    for mod, f in modules().items():
        lines = f.read_text().splitlines()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50:
                start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                if "Over 50 lines by choice" not in "\n".join(lines[max(0, start - 4):start - 1]):
                    long.append(f"{mod}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "split these, or write the reason above them ('Over 50 lines by choice: ...'):\n" + "\n".join(long)
