"""The house rules (docs/design.md, "The house"): parts depend one way, pure parts need no torch,
no private name crosses a module, one concept per file."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tspipe_fx"
HARD_LIMIT = 400  # lines per module; about 300 is the aim


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, names, line)`` of every tspipe_fx import in the file, at any depth (imports
    inside functions count too; those under ``if TYPE_CHECKING`` do not)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for block in ast.walk(tree) if _type_checking_block(block) for n in ast.walk(block)}
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("tspipe_fx")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            if module.startswith("tspipe_fx"):
                out.append((module, [a.name for a in node.names], node.lineno))
    return out


def _edges() -> dict[str, set[str]]:
    """Module -> the tspipe_fx modules it imports (a name that is a submodule counts as it)."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = set()
        for module, names, _ in _imports(path):
            subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            targets.update(subs or [module])
            if subs and len(subs) < len(names):
                targets.add(module)
        graph[name] = {t for t in targets if t in MODULES and t != name}
    return graph


def test_no_import_cycles() -> None:
    graph = _edges()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = [*path[path.index(t):], t]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


PLANNING = ("tspipe_fx.tracing", "tspipe_fx.passes", "tspipe_fx.cost", "tspipe_fx.partition",
            "tspipe_fx.compiler", "tspipe_fx.api", "tspipe_fx.pipeline", "tspipe_fx.cli")  # fmt: skip
DATA = ("tspipe_fx.plan", "tspipe_fx.stage", "tspipe_fx.schedule", "tspipe_fx.errors", "tspipe_fx.files")


def _within(module: str, parts: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in parts)


def test_dependencies_run_one_way() -> None:
    """Data imports no planning and no runtime; the runtime no planning; report reads data."""
    graph = _edges()
    wrong = []
    for m, targets in graph.items():
        if _within(m, DATA):
            wrong += [(m, t) for t in targets if _within(t, (*PLANNING, "tspipe_fx.runtime", "tspipe_fx.report"))]
        if _within(m, ("tspipe_fx.runtime",)):
            wrong += [(m, t) for t in targets if _within(t, (*PLANNING, "tspipe_fx.report"))]
        if _within(m, ("tspipe_fx.report",)):
            allowed = (*DATA, "tspipe_fx.report", "tspipe_fx.cost.profile", "tspipe_fx.passes.meta")
            wrong += [(m, t) for t in targets if not _within(t, allowed)]
        if _within(m, ("tspipe_fx.schedule", "tspipe_fx.partition")):
            wrong += [(m, t) for t in targets if not _within(t, ("tspipe_fx.schedule", "tspipe_fx.partition",
                                                                 "tspipe_fx.errors"))]  # fmt: skip
    assert not wrong, "\n".join(f"{m} imports {t}" for m, t in sorted(wrong))


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_runtime_loads_no_planning_part() -> None:
    loaded = _run(
        "import sys\n"
        "import tspipe_fx.runtime, tspipe_fx.runtime.dist.runtime, tspipe_fx.runtime.checkpoint\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('tspipe_fx'))))\n"
    ).split()
    assert "tspipe_fx.runtime.trainer" in loaded and "tspipe_fx.runtime.dist.runtime" in loaded
    assert not [m for m in loaded if _within(m, PLANNING)]


def test_pure_parts_import_without_torch_sympy_or_tabulate() -> None:
    """Schedules and the partitioner work in an interpreter where torch cannot be imported."""
    out = _run(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'sympy', 'tabulate'):\n"
        "            raise ImportError(f'{name} is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from tspipe_fx.schedule import make_schedule, simulate, validate\n"
        "from tspipe_fx.partition import Chain, Device, Problem, solve\n"
        "s = make_schedule('tspipe', 3, 2, views=2, mode='momentum', n_batches=4)\n"
        "validate(s)\n"
        "chain = Chain.uniform([1.0] * 8)\n"
        "part = solve(Problem(chain, chain, (Device(),) * 2))\n"
        "print(simulate(s).period, part.period_ms)\n"
    )
    period, load = map(float, out.split())
    assert period > 0 and load == 8.0  # 16 units of work over 2 devices


def test_no_private_name_crosses_a_module() -> None:
    wrong = []
    for name, path in MODULES.items():
        for module, names, line in _imports(path):
            wrong += [f"{name}:{line} imports {module}.{n}" for n in names if n.startswith("_")]
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                   if a.name.startswith("tspipe_fx")}  # fmt: skip
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):  # fmt: skip
                wrong.append(f"{name}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_small_and_says_what_it_holds(name: str) -> None:
    path = MODULES[name]
    lines = len(path.read_text().splitlines())
    assert lines <= HARD_LIMIT, f"{path.relative_to(ROOT)} has {lines} lines (limit {HARD_LIMIT}): split its concepts"
    assert ast.get_docstring(ast.parse(path.read_text())), f"{path.relative_to(ROOT)} has no module docstring"


def test_nothing_points_outside_the_repository() -> None:
    """Code, tests and docs cite docs/design.md, not design notes that live elsewhere."""
    texts = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "docs").glob("*.md"),
             *(ROOT / "benchmarks").rglob("*.py"), *(ROOT / "examples").glob("*.py"),
             ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "Makefile", ROOT / "benchmarks" / "README.md"]  # fmt: skip
    me = Path(__file__).resolve()
    wrong = [
        f"{p.relative_to(ROOT)} mentions {word}"
        for p in texts
        if p.resolve() != me
        for word in ("DESIGN.md", "DEVELOPERS.md", "../shared")
        if word in p.read_text()
    ]
    assert not wrong, "\n".join(wrong)
    assert (ROOT / "docs" / "design.md").is_file()


def test_no_package_name_hides_one_of_its_modules() -> None:
    """A package exporting a name that is also one of its submodules (``cost.profile``) hands
    out whichever was bound last: the function or the module, depending on import order."""
    wrong = []
    for name, path in MODULES.items():
        if path.name != "__init__.py":
            continue
        exported = {a.asname or a.name for n in ast.walk(ast.parse(path.read_text()))
                    if isinstance(n, ast.ImportFrom) for a in n.names}  # fmt: skip
        wrong += [f"{name}.{e}" for e in exported if f"{name}.{e}" in MODULES and not _is_module_import(path, e)]
    assert not wrong, f"exported names that are also modules: {wrong}"


def _is_module_import(path: Path, name: str) -> bool:
    """Whether ``__init__`` binds ``name`` to the submodule itself (``from pkg import sub``)."""
    me = _module_name(path)
    return any(module == me and name in names for module, names, _ in _imports(path))


def test_no_module_is_ignored_by_git() -> None:
    """A ``.gitignore`` pattern such as ``dist/`` once hid ``tspipe_fx/runtime/dist/`` from git
    (and from ruff): a clean clone lacked the distributed runtime."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = [str(p.relative_to(ROOT)) for p in MODULES.values()]
    done = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.split() == [], f"git ignores {done.stdout.split()}"
