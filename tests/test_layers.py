"""Imports point one way: commands on top, the library below them, ``errors``, ``io``,
``config``, ``persona`` and ``patches`` at the bottom. Read from every module's source
(imports inside functions included), so nothing has to be imported to check."""

import ast
from pathlib import Path

import pytest

import personatune

ROOT = Path(personatune.__file__).parent

#: Modules that do one command's work; only the CLI may import them.
COMMANDS = {
    "personatune.cli",
    "personatune.evaluate.run",
    "personatune.evaluate.heldout",
    "personatune.evaluate.compare",
}
CLI = {"personatune.cli", "personatune.__main__"}
#: The bottom layer and what each of its modules may import of personatune.
BOTTOM = {
    "personatune.errors": set(),
    "personatune.patches": set(),
    "personatune.io": {"personatune.errors"},
    "personatune.config": {"personatune.errors", "personatune.io"},
    "personatune.persona": {"personatune.config", "personatune.errors", "personatune.io"},
}
#: Package prefix -> packages it must not import (lower layers never import higher ones).
NOT_BELOW = {
    "personatune.data.": ("personatune.train", "personatune.serve"),
    "personatune.evaluate.": ("personatune.train", "personatune.serve"),
    "personatune.engine.": ("personatune.train", "personatune.serve", "personatune.evaluate"),
    "personatune.serve.": ("personatune.train",),
}


def _name(path: Path) -> str:
    parts = ("personatune", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every personatune module ``path`` imports: ``import a.b``, ``from a import b``
    (``a.b`` when it is a module, else ``a``) and relative imports, at any depth."""
    me = _name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in MODULES else base)
    return {m for m in out if m == "personatune" or m.startswith("personatune.")} - {me}


MODULES = {_name(p): p for p in ROOT.rglob("*.py")}
IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def test_the_import_reader_sees_function_level_imports():
    """Guards against the checks below passing because the reader misses imports: the
    CLI imports the eval command inside a function, and the reader sees it."""
    assert "personatune.evaluate.run" in IMPORTS["personatune.cli"]
    assert "personatune.evaluate.suite" in IMPORTS["personatune.train.guard"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_cli_imports_a_command(module):
    """Guards against library code importing a command's orchestrator (the guard used to
    import ten names from the eval command's module)."""
    if module in CLI:
        return
    assert not IMPORTS[module] & COMMANDS, f"{module} imports {IMPORTS[module] & COMMANDS}"


@pytest.mark.parametrize("module", sorted(BOTTOM))
def test_bottom_modules_import_only_the_bottom(module):
    """Guards against the file I/O, error, config, persona-layout and patch modules
    growing dependencies on the layers above them."""
    assert IMPORTS[module] <= BOTTOM[module], IMPORTS[module] - BOTTOM[module]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_lower_layers_never_import_higher_ones(module):
    """Guards against data, evaluation, the engine or serving depending on training (or
    the engine on evaluation), and against generic I/O through train.output."""
    bad = {
        imp
        for prefix, banned in NOT_BELOW.items()
        if module.startswith(prefix)
        for imp in IMPORTS[module]
        if imp.startswith(banned)
    }
    if "personatune.train.output" in IMPORTS[module] and not module.startswith(
        "personatune.train."
    ):
        bad.add("personatune.train.output")
    assert not bad, f"{module} imports {bad}"
