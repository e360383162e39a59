"""lab/ reads top-down along the data flow, and no import runs back up a layer.

    foundation -> config -> artifacts -> onhost -> hosts -> guests -> session -> verdicts -> measure -> top

A module may import from its own layer and the ones before it, never from a
later one (lazy imports inside functions included): the data flows one way,
and so do the dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

LAB = Path(__file__).resolve().parents[2] / "lab"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("lab.errors", "lab.paths", "lab.proc", "lab.events", "lab.tomlcheck")),
    ("config", ("lab.config",)),
    ("artifacts", ("lab.artifacts",)),
    ("onhost", ("lab.onhost",)),
    ("hosts", ("lab.hosts",)),
    ("guests", ("lab.guests",)),
    ("session", ("lab.session",)),
    ("verdicts", ("lab.verdicts",)),
    ("measure", ("lab.measure",)),
    ("top", ("lab.lifecycle", "lab.configview", "lab.doctor", "lab.cli")),
]


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def module_name(path: Path) -> str:
    rel = path.relative_to(LAB.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("lab.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lab":
                out += [(node.lineno, f"lab.{a.name}") for a in node.names]
            elif node.module.startswith("lab."):
                out.append((node.lineno, node.module))
    return out


def test_every_module_has_a_layer_and_imports_only_downwards() -> None:
    offenders = []
    files = sorted(p for p in LAB.rglob("*.py") if p.name != "__init__.py" or p.parent != LAB)
    assert len(files) > 20
    for path in files:
        me = module_name(path)
        mine = layer_of(me)
        for line, target in imports(path):
            theirs = layer_of(target)
            if theirs > mine:
                offenders.append(f"{path.relative_to(LAB.parent)}:{line}: {me} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert offenders == [], "\n".join(offenders)


def test_the_folders_follow_the_data_flow() -> None:
    folders = {p.name for p in LAB.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == {"artifacts", "onhost", "hosts", "verdicts", "measure"}
    top = {p.stem for p in LAB.glob("*.py")} - {"__init__"}
    assert top == {"errors", "paths", "proc", "events", "tomlcheck", "config", "guests", "session", "lifecycle", "configview",
                   "doctor", "cli"}


def test_one_way_to_run_a_process() -> None:
    """Only lab/proc.py starts processes (subprocess); everything else goes through it."""
    users = sorted(str(p.relative_to(LAB.parent)) for p in LAB.rglob("*.py") if "subprocess" in p.read_text() and p.name != "proc.py")
    assert users == [], users
