"""The package's layering, read from the source (no imports run).

The import graph of fastlayers: every ``import`` and ``from ... import`` anywhere in a module
(inside functions too), relative imports resolved. It must have no cycle, and no module may import
one of a higher layer. The source must not point outside the repository (at the tracker or at
files next to the checkout).
"""
import ast
import re
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "fastlayers"

# Layers, lowest first: a module may import its own layer and the ones below. A name covers the
# module and everything under it (the longest listed name wins), except "fastlayers" itself: the
# package __init__ (the public API) alone is the top, so a new module must be placed here.
LAYERS: List[List[str]] = [
    # the activation table, error types, the compute dtype rule, the compiled C++ extensions (built
    # from csrc/, csrc/torch/)
    ["fastlayers._errors", "fastlayers.activations", "fastlayers._dtypes", "fastlayers._C", "fastlayers._fastpath"],
    # backends and the Triton kernels they launch: they know the table, not the dispatch around them
    ["fastlayers.backends", "fastlayers.kernels"],
    # choosing a backend for the inputs; autocast casting rules
    ["fastlayers._dispatch", "fastlayers._autocast"],
    # the ops (one file each: checks, Function, route, torch.library ops, modules) and their re-export
    ["fastlayers.functional", "fastlayers.ops"],
    # modules
    ["fastlayers.nn"],
    # rewriting a user's model to use the modules
    ["fastlayers.swap"],
    # Hugging Face's kernels mechanism: a mapping to fastlayers' ops (kernels / transformers imported lazily)
    ["fastlayers.hf"],
    ["fastlayers"],
]
# Compiled modules (no source to read): they import nothing from the package.
EXTENSIONS = {"fastlayers._C", "fastlayers._fastpath"}


def _modules() -> Dict[str, Path]:
    """Dotted name -> source file of every module of the package (a package is its __init__)."""
    mods = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The package's modules that module `name` (source at `path`) imports, anywhere in it."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from P import x`: the submodule P.x when there is one, else a name defined in P.
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in known else origin
                       for a in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` imports a.b.c (and its parents, which every module has anyway).
            if target in known and target != name:
                found.add(target)
    return found


def import_graph() -> Dict[str, Set[str]]:
    mods = _modules()
    known = set(mods) | EXTENSIONS
    graph = {name: _imports(name, path, known) for name, path in mods.items()}
    graph.update({ext: set() for ext in EXTENSIONS})
    return graph


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for level, names in enumerate(LAYERS):
        for n in names:
            covers = module == n or (n != PACKAGE and module.startswith(n + "."))
            if covers and len(n) > best_len:
                best, best_len = level, len(n)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best


def _cycle(graph: Dict[str, Set[str]]):
    """One import cycle as a list of modules (first == last), or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    stack: List[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_import_graph_is_read():
    """The graph sees what it must (guards the parser): relative, nested and extension imports."""
    graph = import_graph()
    assert "fastlayers.kernels.gemm" in graph["fastlayers.backends.triton.gemm"]  # from ...kernels
    assert "fastlayers.backends.triton.device" in graph["fastlayers.backends.triton"]  # from . import
    assert "fastlayers._C" in graph["fastlayers.backends.cpu._ext"]  # from ... import _C, in a try block
    assert "fastlayers.backends.cpu.gemm" in graph["fastlayers.backends.cpu"]  # from . import gemm
    assert "fastlayers._fastpath" in graph["fastlayers._dispatch"]  # from . import _fastpath
    assert "fastlayers.activations" in graph["fastlayers.kernels.activations"]  # from ..activations
    assert "fastlayers.nn" in graph["fastlayers"]


def test_no_import_cycle():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_from_a_higher_layer():
    graph = import_graph()
    for m in graph:
        layer_of(m)  # every module has a place
    bad = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
           for m, deps in sorted(graph.items()) for d in sorted(deps)
           if layer_of(d) > layer_of(m)]
    assert not bad, "\n".join(bad)


# Text that points outside the repository: a tracker issue by number, or a path into the folder
# next to the checkout. ([/] keeps this file from matching itself.)
OUTSIDE = re.compile(r"\bissue\s*#?\s*\d+|\bshared[/]", re.IGNORECASE)
SOURCE_DIRS = ("fastlayers", "csrc", "tests", "bench", "scripts")
SOURCE_SUFFIXES = {".py", ".c", ".cc", ".cpp", ".cu", ".h", ".hpp", ".md", ".sh", ".txt"}


def test_source_points_nowhere_outside_the_repo():
    hits = []
    for d in SOURCE_DIRS:
        for path in sorted((ROOT / d).rglob("*")):
            if path.suffix not in SOURCE_SUFFIXES or not path.is_file():
                continue
            for no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if OUTSIDE.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_every_package_is_shipped():
    """pyproject.toml lists packages explicitly: a new subpackage missing there installs without
    its files (`pip install .` then fails at import)."""
    import tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / PACKAGE).rglob("__init__.py")}
    assert found == listed, f"pyproject.toml packages: missing {sorted(found - listed)}, stale {sorted(listed - found)}"
