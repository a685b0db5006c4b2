"""The layout shows the architecture, and this test keeps it so (it reads the imports, it runs nothing).

- no import cycle among the project's modules (imports inside functions count too);
- ``workers/`` (one process, one device) imports nothing from ``cluster/`` (the fleet);
- the pure logic (compatibility, routing, ledger, manifest, inventory) reaches no Ray,
  not even through the project's own modules;
- no module over 450 lines and no function over 80.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("workers", "cluster", "benchmarks")
PURE = ("workers.targets", "workers.ledger", "workers.manifest", "workers.tensors", "workers.messages",
        "workers.devices", "cluster.router", "cluster.inventory", "cluster.frontdoor.routes", "cluster.controller.views",
        "cluster.controller.head", "workers.gpu_health", "workers.warmup", "cluster.triton.mapping",
        "cluster.rollout", "cluster.runtime_policy", "workers.trust", "cluster.upgrade", "cluster.batch_report",
        "cluster.tensor_columns")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(project modules, outside top-level packages) that ``name`` imports."""
    tree = ast.parse(path.read_text())
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    inside, outside = set(), set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            resolved = _resolve(target)
            if resolved and resolved != name:
                inside.add(resolved)
            elif not resolved:
                outside.add(target.split(".")[0])
    return inside, outside


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_project_has_the_packages_it_should():
    assert {"workers.runner", "workers.kserve.handler", "cluster.controller", "cluster.inventory"} <= MODULES.keys()


def test_no_import_cycle():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v][0]:
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
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert cycles == []


def test_workers_never_import_the_fleet():
    upward = sorted(f"{m} -> {t}" for m, (inside, _) in GRAPH.items() if m.startswith("workers")
                    for t in inside if not t.startswith("workers"))
    assert upward == []


def test_pure_logic_reaches_no_ray():
    for module in PURE:
        seen, todo = set(), [module]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            inside, outside = GRAPH[current]
            assert "ray" not in outside, f"{module} reaches Ray through {current}"
            todo.extend(inside)


def test_modules_and_functions_stay_short():
    long_modules, long_functions = [], []
    for name, path in MODULES.items():
        text = path.read_text()
        if text.count("\n") + 1 > MAX_MODULE_LINES:
            long_modules.append(name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}:{node.lineno} {node.name}")
    assert long_modules == [] and long_functions == []
