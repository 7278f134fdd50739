"""labutils' import graph, read from the source with ``ast`` (nothing is imported): no cycles, no module
importing labutils.scripts, ``ops`` a leaf, the kernels free of model code. See README §Layout."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "labutils"


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package at ``root``, by dotted name (a package by its ``__init__.py``)."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def resolve(name: str, known: set[str]) -> str | None:
    """The longest known module ``name`` starts with (``labutils.gemv.Config`` -> ``labutils.gemv``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(mod: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``mod`` imports, at any depth of its code (lazy imports in functions count):
    ``import labutils.x``, ``from labutils.x import y``, ``from . import x, y`` (each a submodule, else a name
    of the package), ``from .x import y``, ``from .. import x``."""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            hits = [resolve(a.name, known) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                if not up:
                    raise ValueError(f"{path}: relative import above the top of the package")
                base = ".".join(up + ([node.module] if node.module else []))
            hits = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else resolve(base, known) for a in node.names]
        else:
            continue
        out |= {h for h in hits if h and h != mod}
    return out


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the package's modules it imports."""
    mods = modules(root)
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_graph_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "labutils"
    (pkg / "sub").mkdir(parents=True)
    files = {"__init__.py": "", "a.py": "from . import b, c\n", "b.py": "from .c import thing\n",
             "c.py": "def f():\n    import labutils.d\n", "d.py": "from labutils.sub.e import x\n",
             "sub/__init__.py": "", "sub/e.py": "from .. import a\n"}
    for name, text in files.items():
        (pkg / name).write_text(text)
    g = graph(pkg)
    assert g["labutils.a"] == {"labutils.b", "labutils.c"} and g["labutils.b"] == {"labutils.c"}
    assert g["labutils.c"] == {"labutils.d"} and g["labutils.d"] == {"labutils.sub.e"}
    assert g["labutils.sub.e"] == {"labutils.a"}
    assert find_cycle(g) == ["labutils.a", "labutils.b", "labutils.c", "labutils.d", "labutils.sub.e", "labutils.a"]
    g["labutils.sub.e"] = set()
    assert find_cycle(g) is None


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each group of modules that reach one another (a strongly connected component)."""
    reach = {}
    for n in g:
        seen, todo = set(), list(g[n])
        while todo:
            d = todo.pop()
            if d not in seen:
                seen.add(d)
                todo += g.get(d, ())
        reach[n] = seen
    out, done = [], set()
    for n in sorted(g):
        group = {m for m in reach[n] if n in reach[m]}
        if n in reach[n] and n not in done:
            done |= group
            out.append(find_cycle({m: g[m] & group for m in group}))
    return out


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles in labutils: " + "; ".join(" -> ".join(c) for c in found)


def test_no_module_imports_the_scripts():
    bad = {m: sorted(d for d in deps if d.startswith("labutils.scripts")) for m, deps in graph().items()
           if not m.startswith("labutils.scripts")}
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"labutils modules import scripts (move the library code into labutils): {bad}"


def test_ops_is_a_leaf():
    g = graph()
    assert "labutils.ops" in g, "labutils/ops.py (the shared decoder maths) is missing"
    assert g["labutils.ops"] == set(), f"labutils.ops must import no labutils module: {sorted(g['labutils.ops'])}"


@pytest.mark.parametrize("model", ["labutils.lean", "labutils.quant", "labutils.decode"])
def test_kernels_never_import_model_code(model):
    g = graph()
    kernels = [m for m in g if m.startswith("labutils.kernels")]
    assert kernels, "labutils/kernels/ is missing"
    bad = [k for k in kernels if model in g[k]]
    assert not bad, f"{bad} import {model}: kernels may not depend on model code (model code imports kernels)"
