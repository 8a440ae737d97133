"""The package's layers import downward only, and no module imports itself back through a circle:
patch / engine -> modules -> ops -> backends -> the Triton kernels (fastlm.kernels). Leaf modules that
import nothing of fastlm (errors, _checks) serve every layer. Read off the source with ast (imports
inside functions count too: a lazy import upward is still a dependency upward)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# layer rank: a module may import only modules of a rank <= its own (equal: within its layer)
RANKS = {"fastlm.kernels": 0, "fastlm.backends": 1, "fastlm.ops": 2, "fastlm.modules": 3, "fastlm.families": 3,
         "fastlm.patching": 4, "fastlm.engine": 5}
LEAVES = {"fastlm.errors", "fastlm._checks", "fastlm._build_config", "fastlm._C"}


def _modules():
    found = {}
    for base, package in ((ROOT / "fastlm", "fastlm"), (ROOT / "kernels", "fastlm.kernels")):
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "fastlm" and parts[:1] == ["kernels"]:
                continue
            found[name] = (path, path.name == "__init__.py")
    return found


def _imports(name, path, is_package, known):
    tree = ast.parse(path.read_text())
    package = name if is_package else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _rank(module):
    best = None
    for prefix, rank in RANKS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, rank)
    return None if best is None else best[1]


GRAPH = None


def graph():
    global GRAPH
    if GRAPH is None:
        mods = _modules()
        GRAPH = {name: _imports(name, path, pkg, mods) for name, (path, pkg) in mods.items()}
    return GRAPH


def test_nothing_imports_upward():
    bad = []
    for name, deps in graph().items():
        rank = _rank(name)
        if rank is None:
            continue
        for dep in deps:
            dep_rank = _rank(dep)
            if dep in LEAVES or dep_rank is None:
                continue
            if dep_rank > rank:
                bad.append(f"{name} -> {dep}")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_no_import_circle():
    """No strongly connected set of modules (an edge: an explicit import; a package's own import of its
    submodules counts, the implicit import of a parent package by its submodules does not)."""
    g = graph()
    index, low, on_stack, stack, circles = {}, {}, set(), [], []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in list(g):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_no_op_module_shares_a_public_name():
    """``fastlm.ops.<file>`` is the module, never a function of the same name exported over it."""
    import importlib
    import pkgutil
    import types

    import fastlm.ops

    for info in pkgutil.iter_modules(fastlm.ops.__path__):
        module = importlib.import_module(f"fastlm.ops.{info.name}")
        assert getattr(fastlm.ops, info.name) is module, info.name
        assert isinstance(module, types.ModuleType)
        assert info.name not in fastlm.ops.__all__, info.name


def test_fused_module_state_is_private_to_fastlm_modules():
    """The fused modules keep their state in ``_fastlm_*`` attributes (fastlm.modules._swap); every other
    package reads it through their typed entry points (fused_spec(), epilogue(), add_forward(), ...).
    patching.py's own record on the base model (``_fastlm_patch``) is the one other such name."""
    import re

    owned = {"fastlm/patching.py": {"_fastlm_patch"}}
    bad = []
    for path in sorted((ROOT / "fastlm").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("fastlm/modules/"):
            continue
        names = set(re.findall(r"_fastlm_\w+", path.read_text())) - owned.get(rel, set())
        bad += [f"{rel}: {n}" for n in sorted(names)]
    assert not bad, "fused-module state read outside fastlm/modules:\n" + "\n".join(bad)
