"""The house's layering, checked from the source (no module is imported): every import among lalora's own
modules, at the top of a file or inside a function (a lazy import is still a dependency), forms an acyclic
graph that only points down the groups of ``GROUPS``; the core imports no backend library and no backend; no
module is longer than ~300 lines and no function than ~60 (``LONG_MODULES``, ``LONG_FUNCTIONS``: the exceptions,
each with its reason).

The groups, bottom to top (a module imports modules of its own group or of lower ones only):

0. foundations: ``errors``, ``version``, ``blocks.*`` (the terms of a precision), ``adapters``, ``losses``,
   ``data``, ``capture``, ``coverage``, ``anchor_check``, ``reference``, ``batch``, ``sampling``, ``atomic_file``,
   ``checkpoint``, ``textdata``, ``local_model``, ``allocator``, ``option_types``, ``options`` (the backend option
   declarations), ``sharding`` (LoRA weights under FSDP2 / DeepSpeed ZeRO-3);
1. the precision: ``fileformat`` (the file layout), ``validation`` (a precision against a model), ``backend``
   (the interface and the registry), then ``precision``, which builds on them (none of them imports it);
2. what uses a precision: ``penalty`` (with ``penalty_groups``), ``compression``, ``fit``, ``regularizer``, ``continual``, ``training``,
   ``integrations.*``;
3. ``lalora.backends.*`` (the folder ``backends/``): plugins over the core, which reaches them through the
   registry only;
4. the tools: ``estimate``, ``backend_info``, ``comparison.*``, ``bench.*``, ``evaluation.*`` (lm-evaluation-harness),
   ``surrogate.*`` (source data the base model generates), ``sweep`` (choosing the strength), ``cli.*`` (the command line, over everything);
5. ``lalora/__init__.py``: the users' facade, imported by no module of the package.

``python tests/test_layering.py`` prints the modules by depth in the graph.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the source folders and the package each is installed as (pyproject: ``package-dir``)
PACKAGES = {ROOT / "lalora": "lalora", ROOT / "backends": "lalora.backends"}
BACKEND_LIBRARIES = ("curvlinops", "backpack", "laplace")
MAX_LINES = 300
MAX_FUNCTION_LINES = 60
#: functions allowed past MAX_FUNCTION_LINES, each with its reason (the check fails once one is short again)
LONG_FUNCTIONS: dict[str, str] = {}
#: (group, module names or package prefixes), bottom to top; a module is in the group of its longest prefix
GROUPS = [
    ("foundations", ["lalora.errors", "lalora.version", "lalora.blocks", "lalora.adapters", "lalora.losses", "lalora.logit_rows",
                     "lalora.data", "lalora.capture", "lalora.capture_embedding", "lalora.quantized", "lalora.coverage", "lalora.anchor_check", "lalora.reference",
                     "lalora.batch", "lalora.sampling", "lalora.atomic_file", "lalora.checkpoint", "lalora.textdata",
                     "lalora.local_model", "lalora.allocator", "lalora.option_types", "lalora.options",
                     "lalora.sharding", "lalora.others", "lalora.pergrad"]),
    ("precision", ["lalora.fileformat", "lalora.shards", "lalora.validation", "lalora.backend", "lalora.precision"]),
    ("uses a precision", ["lalora.penalty", "lalora.penalty_groups", "lalora.compression", "lalora.fit", "lalora.fit_metadata", "lalora.regularizer",
                          "lalora.continual", "lalora.training", "lalora.integrations"]),
    ("backends", ["lalora.backends"]),
    ("tools", ["lalora.estimate", "lalora.estimate_config", "lalora.estimate_memory", "lalora.backend_info", "lalora.comparison", "lalora.compare_plot", "lalora.bench",
               "lalora.evaluation", "lalora.surrogate", "lalora.sweep", "lalora.cli"]),
    ("facade", ["lalora"]),
]
#: modules allowed past MAX_LINES, each with its reason (the check below fails once one is short again)
LONG_MODULES: dict[str, str] = {
    # 340 lines: the registry, FitContext (with its variant and coverage flags) and the 0.1 option shims (default_options/option_help dicts, options
    # as keyword arguments) that go with the next release
    "lalora.backend": "carries lalora 0.1's option shims until they are removed (CHANGELOG, Unreleased)",
}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``)."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            out[".".join([package, *parts])] = (path, is_package)
    return out


MODULES = _modules()


def _imported_names(tree: ast.AST, module: str, is_package: bool):
    """Every module name an ``import`` / ``from ... import`` / ``importlib.import_module("...")`` /
    ``__import__("...")`` anywhere in ``tree`` names, absolute, with the line it is on."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # ``from pkg import sub`` imports the submodule ``pkg.sub``
                sub = f"{source}.{alias.name}"
                yield (sub if sub in MODULES else source), node.lineno
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                target = node.args[0].value
                if target.startswith("."):  # import_module(".x", __name__ or __package__)
                    target = (module if is_package else package) + target
                yield target, node.lineno


def _own(name: str) -> str | None:
    """The lalora module ``name`` is, or lies in (``lalora.blocks.base.Block`` -> ``lalora.blocks.base``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported lalora module: first line}."""
    graph = {}
    for module, (path, is_package) in MODULES.items():
        edges: dict[str, int] = {}
        for name, line in _imported_names(ast.parse(path.read_text(), str(path)), module, is_package):
            target = _own(name) if name.split(".")[0] == "lalora" else None
            if target and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


GRAPH = _graph()


def _cycle(graph) -> list[str] | None:
    """One import cycle of ``graph`` (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _layers(graph) -> list[list[str]]:
    """Modules by depth: layer 0 imports no lalora module, layer k only modules of layers < k."""
    depth: dict[str, int] = {}

    def level(node):
        if node not in depth:
            depth[node] = 1 + max((level(n) for n in graph[node]), default=-1)
        return depth[node]

    for node in graph:
        level(node)
    return [sorted(n for n, d in depth.items() if d == k) for k in range(max(depth.values()) + 1)]


def _group(module: str) -> int | None:
    """The rank (index in ``GROUPS``) of ``module``: that of its longest listed prefix; None if unlisted."""
    best = None
    for rank, (_, prefixes) in enumerate(GROUPS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), rank)
    return None if best is None else best[1]


def _where(module: str, line: int) -> str:
    return f"{MODULES[module][0].relative_to(ROOT)}:{line}"


def test_the_parser_sees_the_imports():
    """The checks below are only as good as the edges: known imports of every kind are found (a top-level
    import, a lazy one inside a function, ``from . import submodule``, a relative import two levels up)."""
    assert "lalora.precision" in GRAPH["lalora.fit"]  # top level
    assert "lalora.checkpoint" in GRAPH["lalora.fit"]  # inside a function
    assert "lalora.blocks.dense" in GRAPH["lalora.blocks"]  # ``from .dense import DenseBlock`` in __init__
    assert "lalora.errors" in GRAPH["lalora.comparison.api"]  # ``from ..errors import ...``
    assert "lalora.backend" in GRAPH["lalora.backends.kfac"]  # a backend, installed from backends/
    assert _cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 1}}) is None
    assert _group("lalora.blocks.kronecker") == 0 and _group("lalora.backends.kfac") == 3 and _group("lalora") == 5


def test_no_import_cycle():
    """Including imports inside functions: a lazy import that closes a circle still ties the two modules
    together (neither can change or be understood without the other)."""
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(
        f"{a} ({_where(a, GRAPH[a][b])})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_imports_point_down_the_groups():
    """Every module has a group, and imports only modules of its own or lower groups (module docstring)."""
    unplaced = sorted(m for m in MODULES if _group(m) is None)
    assert not unplaced, f"place these modules in GROUPS: {unplaced}"
    upward = [f"{_where(m, line)}: {m} ({GROUPS[_group(m)][0]}) imports {t} ({GROUPS[_group(t)][0]})"
              for m, edges in GRAPH.items() for t, line in edges.items() if _group(t) > _group(m)]
    assert not upward, upward


def test_no_module_imports_the_facade():
    """``lalora/__init__.py`` re-exports for users; a module of the package that imported it would depend on
    everything the facade imports (and close a circle through any of them)."""
    offenders = [_where(m, edges["lalora"]) for m, edges in GRAPH.items() if "lalora" in edges]
    assert not offenders, f"import the defining module instead of the package 'lalora': {offenders}"


def test_core_imports_no_backend():
    """The core (``lalora/`` outside ``lalora.backends``) imports neither a backend library nor a backend:
    backends plug in through the registry (``lalora.get_backend``)."""
    offenders = []
    for module, (path, is_package) in MODULES.items():
        if module.startswith("lalora.backends"):
            continue
        for name, line in _imported_names(ast.parse(path.read_text()), module, is_package):
            top = name.split(".")[0]
            if top in BACKEND_LIBRARIES or name == "lalora.backends" or name.startswith("lalora.backends."):
                offenders.append(f"{_where(module, line)} imports {name}")
    assert not offenders, offenders


def test_modules_are_short():
    too_long = {}
    for module, (path, _) in MODULES.items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and module not in LONG_MODULES:
            too_long[str(path.relative_to(ROOT))] = lines
    assert not too_long, f"split these modules (over {MAX_LINES} lines) or justify them in LONG_MODULES: {too_long}"
    stale = [m for m in LONG_MODULES if len(MODULES[m][0].read_text().splitlines()) <= MAX_LINES]
    assert not stale, f"no longer over {MAX_LINES} lines: remove from LONG_MODULES: {stale}"


def _functions():
    """(dotted name, lines, file:line) of every function and method, nested ones included."""
    for module, (path, _) in MODULES.items():
        tree = ast.parse(path.read_text())
        stack = [(node, module) for node in tree.body]
        while stack:
            node, prefix = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{node.name}"
                if not isinstance(node, ast.ClassDef):
                    yield name, node.end_lineno - node.lineno + 1, _where(module, node.lineno)
                stack.extend((child, name) for child in node.body)


def test_functions_are_short():
    """No function over ~60 lines (signature and docstring included) without its reason in LONG_FUNCTIONS."""
    lengths = {name: (lines, where) for name, lines, where in _functions()}
    too_long = {f"{name} ({where})": lines for name, (lines, where) in lengths.items()
                if lines > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS}
    assert not too_long, f"split these functions or justify them in LONG_FUNCTIONS: {too_long}"
    stale = [n for n in LONG_FUNCTIONS if n not in lengths or lengths[n][0] <= MAX_FUNCTION_LINES]
    assert not stale, f"no longer over {MAX_FUNCTION_LINES} lines (or gone): remove from LONG_FUNCTIONS: {stale}"


if __name__ == "__main__":  # python tests/test_layering.py: the layers as the graph has them
    for k, layer in enumerate(_layers(GRAPH)):
        print(f"layer {k}: {' '.join(layer)}")
