"""The shape of the code: short modules and functions, no import cycles, no private helper used
across modules, and files that speak of the code rather than of how it was made."""
import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kcd_fast"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
LONG_BY_DESIGN = {"get_args_parser"}  # one add_argument per option: long, and flat


def modules() -> dict[str, Path]:
    """Every module of kcd_fast by its dotted name (a package by its own name, from __init__.py)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """The kcd_fast modules that module ``name`` imports (``from a import b``: a.b if it is a module)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def test_modules_are_short_and_functions_fit_a_screen():
    long_modules, long_functions = [], []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in LONG_BY_DESIGN:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {length} lines")
    assert long_modules == [] and long_functions == []


def test_main_reads_in_one_screen():
    from kcd_fast.train import main

    tree = ast.parse(Path(main.__file__).read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert fn.end_lineno - fn.lineno + 1 <= 40


def test_the_import_graph_has_no_cycles():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_module_uses_another_modules_private_names():
    """``from kcd_fast.x import _y`` and ``x._y`` (x another kcd_fast module) are private helpers used
    across modules: what two modules share is public in one of them."""
    known = modules()
    found = []
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kcd_fast"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    if alias.name.startswith("_") and alias.name != "_C":  # _C: the compiled extension itself
                        found.append(f"{name} imports {target}")
                    if target in known:
                        aliases[alias.asname or alias.name] = target
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in known and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    assert found == []


# Words that tell how the work went rather than what the code does, built from parts so that this
# file does not match itself.
HISTORY = re.compile(r"\b(" + "sess" + r"ions?|" + "le" + r"nt)\b|\b(first|second|last) " + "ca" + r"ll\b", re.I)


def test_no_file_speaks_of_the_history_of_its_making():
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "README.md", "docs", "kcd_fast", "kernels", "csrc", "benchmarks",
                              "tests"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    hits = []
    for rel in tracked.stdout.split():
        path = ROOT / rel
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:  # binary data: checkpoints, images
            continue
        hits += [f"{rel}:{i}: {line.strip()[:100]}" for i, line in enumerate(text.splitlines(), 1)
                 if HISTORY.search(line)]
    assert hits == []
