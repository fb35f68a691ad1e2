"""The layers of docs/architecture.md, enforced: no import runs up a layer or between packages of one layer, lazy
imports included; no import loop between modules; every module imports on its own."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "gavel"

# bottom up; a package may import its own modules and those of lower layers, never a package of its own layer
LAYERS = [
    ["gavel.errors"],
    ["gavel.artifacts", "gavel.io", "gavel.identifiers", "gavel.packs"],
    ["gavel.base"],
    ["gavel.models"],
    ["gavel.plugins"],
    ["gavel.rules", "gavel.probes", "gavel.steering", "gavel.decon"],   # independent of one another
    ["gavel.finetune"],
    ["gavel.runtime"],
    ["gavel.audit", "gavel.serve"],
    ["gavel.organism"],
    ["gavel.cli"],
]
# pairs a lower layer still may not use: rules are read and linted without a model
FORBIDDEN = {("gavel.rules", "gavel.models")}


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path], *, typing: bool = True) -> list[tuple[str, int]]:
    """Every gavel module `name` imports, anywhere in the file (in functions too; in `if TYPE_CHECKING:` blocks
    unless `typing` is False: those never run, so they make no loop)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    skipped = set() if typing else {id(n) for block in ast.walk(tree) if _type_checking(block)
                                    for stmt in block.body for n in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "gavel"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base.split(".")[0] != "gavel":
                continue
            for alias in node.names:   # `from gavel.rules import compile` imports a module, not a name
                if (base, alias.name) == ("gavel", "__version__"):
                    continue               # the version, which every gavel module may report
                full = f"{base}.{alias.name}"
                out.append((full if full in known else base, node.lineno))
    return out


def _type_checking(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def unit(name: str) -> tuple[int, str] | None:
    for level, packages in enumerate(LAYERS):
        for package in packages:
            if name == package or name.startswith(package + "."):
                return level, package
    return None


def test_every_package_has_a_layer():
    assert [m for m in modules() if m != "gavel" and unit(m) is None] == []


def test_no_import_runs_up_a_layer_or_across_one():
    known = modules()
    wrong = []
    for name, path in known.items():
        if name == "gavel":      # the public API re-exports from every layer, lazily
            continue
        level, package = unit(name)
        for target, line in imports(name, path, known):
            if target == "gavel":
                wrong.append(f"{path}:{line}: {name} imports the public API module gavel")
                continue
            to_level, to_package = unit(target)
            if to_package == package:
                continue
            if to_level >= level or (package, to_package) in FORBIDDEN:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line}: {name} -> {target} "
                             f"({package} may not import {to_package})")
    assert wrong == []


def test_no_import_loops():
    """Between modules (a package's __init__ counts only for what it imports itself)."""
    known = modules()
    graph = {name: {t for t, _ in imports(name, path, known, typing=False) if t in known and t != name}
             for name, path in known.items()}
    loops, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                loops.append(" -> ".join([*stack[stack.index(nxt):], node, nxt]) if nxt in stack else f"{node}->{nxt}")
            elif nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert loops == []


# the edges issue 15 found, each as a lazy import from the module that had it
WRONG_EDGES = [
    ("steering/evaluate.py", "gavel.runtime.monitor", "gavel.steering may not import gavel.runtime"),
    ("steering/activations.py", "gavel.audit.local", "gavel.steering may not import gavel.audit"),
    ("steering/plane.py", "gavel.probes.linear", "gavel.steering may not import gavel.probes"),
    ("steering/rule_actions.py", "gavel.decon.train", "gavel.steering may not import gavel.decon"),
    ("rules/testing/run.py", "gavel.runtime.monitor", "gavel.rules may not import gavel.runtime"),
    ("rules/testing/cases.py", "gavel.models.chat", "gavel.rules may not import gavel.models"),
    ("probes/data/spans.py", "gavel.rules.parser", "gavel.probes may not import gavel.rules"),
    ("plugins/registry.py", "gavel.rules.ast", "gavel.plugins may not import gavel.rules"),
    ("io/yamlsource.py", "gavel.rules.parser", "gavel.io may not import gavel.rules"),
    ("decon/data.py", "gavel.organism.corpus", "gavel.decon may not import gavel.organism"),
    ("finetune/few_neurons.py", "gavel.organism.train", "gavel.finetune may not import gavel.organism"),
]


@pytest.mark.parametrize("where,target,message", WRONG_EDGES, ids=[e[0] for e in WRONG_EDGES])
def test_the_layer_check_catches_the_edges_that_ran_the_wrong_way(where, target, message, tmp_path, monkeypatch):
    """The check itself, on a tree holding just that edge (a lazy import, the kind that hid them)."""
    root = tmp_path / "gavel"
    for name in (where, target.removeprefix("gavel.").replace(".", "/") + ".py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    module, _, name = target.rpartition(".")
    (root / where).write_text(f"def later():\n    from {module} import {name}\n    return {name}\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", root)
    with pytest.raises(AssertionError, match=message):
        test_no_import_runs_up_a_layer_or_across_one()


def test_every_module_imports_on_its_own():
    """Each module first in a fresh set of gavel modules (third-party packages stay loaded), as a user who imports
    only it would: a module that only works after another one was imported fails here."""
    names = sorted(m for m in modules())
    code = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'gavel' or m.startswith('gavel.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=-3))\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_public_api_is_typed_lazy_and_complete():
    """`gavel.X` for every exported name resolves to the object its module defines; the TYPE_CHECKING imports a type
    checker reads name exactly those modules; `import gavel` alone loads neither torch nor any submodule."""
    import gavel

    tree = ast.parse((ROOT / "__init__.py").read_text())
    typed = {alias.asname or alias.name: node.module for block in ast.walk(tree) if _type_checking(block)
             for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert typed == gavel._EXPORTS
    assert set(gavel.__all__) <= set(dir(gavel))
    for name, module in gavel._EXPORTS.items():
        assert getattr(gavel, name) is getattr(__import__(module, fromlist=[name]), name)
    code = "import sys, gavel; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('gavel.')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
