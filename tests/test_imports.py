"""The import rules of docs/architecture.md, checked from the code's own imports.

Every ``import`` and ``from ... import`` of the three packages is read with `ast`, wherever it
stands: at the top, inside a function, under ``if TYPE_CHECKING``. The graph of our modules
must have no circle (imports that only type checkers run, under ``if TYPE_CHECKING``, run
nowhere and close no circle; imports inside functions do), and no module may import a layer
above its own (type-only imports included). Also checked here: the light faces (``import
loader_client.contract.errors`` loads no pyzmq), no class of the client over 250 lines, and no
``isinstance`` switch on a stream class.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("loader_client", "loader_server", "loader_bench")

#: The layers, lowest first (docs/architecture.md). A module belongs to the first layer one of
#: whose prefixes names it or a package above it; it may import its own layer and those below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("contract", ("loader_client.contract",)),
    ("client", ("loader_client",)),
    ("settings", ("loader_server.config", "loader_server.options", "loader_server.logs", "loader_server.metrics",
                  "loader_server.redaction")),
    ("data", ("loader_server.data",)),
    ("pipeline", ("loader_server.pipeline",)),
    ("runtime", ("loader_server.runtime",)),
    ("server", ("loader_server.server",)),
    ("commands", ("loader_server",)),
    ("benchmark", ("loader_bench",)),
]
SERVER_CORE = ("settings", "data", "pipeline", "runtime", "server")
#: The documented public paths of moved modules: kept for users, imported by none of ours.
COMPAT_PATHS = ("loader_client.errors", "loader_client.protocol")
#: Imported only by the trainer's code, on request.
ADAPTERS = ("loader_client.keras", "loader_client.torch")
MAX_CLIENT_CLASS_LINES = 250


@cache
def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the packages: dotted name -> (file, is a package's __init__)."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def ours(name: str) -> str | None:
    """The module of ours that importing `name` runs last (the longest known prefix), or None."""
    known = modules()
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _type_only(tree: ast.Module) -> set[int]:
    """The ids of the import statements under ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
                (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
                or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")):
            found.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return found


@cache
def imports(*, runtime_only: bool = False) -> dict[str, frozenset[tuple[str, int]]]:
    """module -> {(module of ours it imports, line)}, from every import statement in it
    (`runtime_only`: leaving out those under ``if TYPE_CHECKING``)."""
    graph: dict[str, frozenset[tuple[str, int]]] = {}
    for name, (path, is_package) in modules().items():
        package = name if is_package else name.rpartition(".")[0]
        found: set[tuple[str, int]] = set()
        tree = ast.parse(path.read_text(), str(path))
        type_only = _type_only(tree) if runtime_only else set()
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                # `from package import module` imports that module; `from module import name`, the module
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules() else source for a in node.names]
            else:
                continue
            for target in targets:
                module = ours(target)
                if module is not None and module != name:
                    found.add((module, node.lineno))
        graph[name] = frozenset(found)
    return graph


def layer(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to docs/architecture.md")


def layer_name(module: str) -> str:
    return LAYERS[layer(module)][0]


def is_server_leaf(module: str) -> bool:
    """Imports nothing of loader_server (the contract at most)."""
    return not any(target.startswith("loader_server") for target, _ in imports()[module])


def test_the_parser_sees_imports_inside_functions_and_type_checking_blocks() -> None:
    graph = {m: {t for t, _ in targets} for m, targets in imports().items()}
    assert "loader_client.contract.errors" in graph["loader_server.data.datasets"]  # at the top
    assert "loader_server.data.subset" in graph["loader_server.data.datasets"]  # inside load_dataset()
    assert "loader_server.config" in graph["loader_server.data.datasets"]  # under TYPE_CHECKING and in a function
    assert "loader_client.contract.protocol" in graph["loader_client.wire"]  # `from .contract import protocol`
    assert "loader_client.client" in graph["loader_client.env"]  # inside from_env()
    runtime = {m: {t for t, _ in targets} for m, targets in imports(runtime_only=True).items()}
    assert "loader_server.data.subset" in runtime["loader_server.data.datasets"]  # the import inside a function stays
    assert "loader_server.config" not in runtime["loader_server.data.datasets"]  # under TYPE_CHECKING only
    assert "loader_server.simulation.ranks" not in runtime["loader_server.simulation.hosts"]  # type-only


def test_no_import_circle() -> None:
    graph = {m: {t for t, _ in targets} for m, targets in imports(runtime_only=True).items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles (imports inside functions count too): {circles}"


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = []
    for module, targets in sorted(imports().items()):
        for target, line in sorted(targets):
            if layer(target) <= layer(module):
                continue
            # The settings validate with a step's own parser (--augment, --transform), which depends
            # on nothing of the server.
            if layer_name(module) == "settings" and layer_name(target) == "pipeline" and is_server_leaf(target):
                continue
            upward.append(f"{modules()[module][0].relative_to(ROOT)}:{line}: {module} ({layer_name(module)}) imports "
                          f"{target} ({layer_name(target)})")
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_the_server_core_speaks_only_the_contract_and_nobody_imports_the_benchmark() -> None:
    wrong = []
    for module, targets in sorted(imports().items()):
        for target, line in sorted(targets):
            where = f"{module}:{line} imports {target}"
            if layer_name(module) in SERVER_CORE and layer_name(target) == "client":
                wrong.append(f"{where}: the server's core uses loader_client.contract only")
            if target in COMPAT_PATHS:
                wrong.append(f"{where}: a public alias kept for users; import loader_client.contract instead")
            if target in ADAPTERS and not module.startswith("loader_bench"):
                wrong.append(f"{where}: the framework adapters are imported by the trainer only")
            if target.startswith("loader_bench") and not module.startswith("loader_bench"):
                wrong.append(f"{where}: the product never imports its benchmark")
    assert not wrong, "\n".join(wrong)


def test_every_module_has_a_layer_and_the_layers_are_in_the_architecture_page() -> None:
    for module in modules():
        layer(module)
    page = (ROOT / "docs" / "architecture.md").read_text()
    for name, prefixes in LAYERS:
        assert f"**{name}**" in page, f"layer {name} is not described in docs/architecture.md"
        for prefix in prefixes:
            assert f"`{prefix}" in page, f"{prefix} is not named in docs/architecture.md"


def test_readme_layout_lists_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = [str(path.relative_to(ROOT)) for path, _ in modules().values()
               if path.name not in ("__init__.py", "__main__.py")
               and not re.search(rf"(?<![\w.]){re.escape(path.name)}", layout)]
    assert not missing, f"README's Layout section does not list: {missing}"


@pytest.mark.parametrize("statement", ["import loader_client.contract.errors", "import loader_client.errors",
                                       "import loader_client.contract.messages", "import loader_client",
                                       "import loader_server.config"])
def test_light_imports_load_no_pyzmq_and_no_client(statement: str) -> None:
    code = (f"import sys\n{statement}\n"
            "print(sorted(m for m in sys.modules if m == 'zmq' or m.startswith(('loader_client.client', "
            "'loader_client.server_stream', 'loader_server.server', 'cv2'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"{statement} loaded {result.stdout.strip()}"


def test_the_faces_load_their_names_on_first_use() -> None:
    code = ("import sys, loader_client, loader_server\n"
            "from loader_client import LoaderClient, BadSampleError, ClientOptions, PROTOCOL_VERSION\n"
            "from loader_server import ServerConfig\n"
            "print('zmq' in sys.modules, LoaderClient.__module__, BadSampleError.__module__, "
            "ServerConfig.__module__, 'loader_server.server' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            check=False)
    assert result.stdout.split() == ["True", "loader_client.client", "loader_client.contract.errors",
                                     "loader_server.config", "False"], result.stdout + result.stderr
    import loader_client

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        loader_client.Nope  # noqa: B018
    assert set(loader_client.__all__) <= set(dir(loader_client))


def test_no_client_class_over_250_lines_and_no_switch_on_a_stream_class() -> None:
    stream_classes = set()
    long_classes = []
    trees = {name: ast.parse(path.read_text()) for name, (path, _) in modules().items()}
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
                if {"take", "state_dict", "stats", "close"} <= methods:
                    stream_classes.add(node.name)
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if name.startswith("loader_client") and lines > MAX_CLIENT_CLASS_LINES:
                    long_classes.append(f"{name}.{node.name}: {lines} lines")
    assert {"ServerStream", "HostsStream"} <= stream_classes
    assert not long_classes, long_classes
    switches = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("isinstance", "issubclass") and len(node.args) == 2:
                named = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                if named & stream_classes:
                    switches.append(f"{name}:{node.lineno}")
    assert not switches, f"behaviour chosen by stream type (use the Stream protocol): {switches}"
