"""Rules that keep the layout as designed, read from the source with `ast` (nothing is imported).

Layers, lowest first; a module imports only its own package and lower layers:

    0  twotower      the library: data, towers, training, the ranking function, on-disk contracts
    1  serving       index reader, filters, GPU search, tower clients (no web framework)
    1  localtriton   starts and stops the Triton binary
    2  export        trained run -> Triton repository + index versions; catalogue updates
    3  evaluation    offline quality, from the exported artifacts
    3  retriever     the KServe adapter, the recommendation service, the shop API, the wiring
    4  benchmarks, examples, tools
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "twotower": 0,
    "serving": 1,
    "localtriton": 1,
    "export": 2,
    "evaluation": 3,
    "retriever": 3,
    "benchmarks": 4,
    "examples": 4,
    "tools": 4,
}
WEB_FRAMEWORKS = {"kserve", "fastapi", "starlette", "pydantic", "uvicorn"}
# The request path's own modules in retriever/ (transport, the KServe adapter and the wiring may use the frameworks).
PLAIN_RETRIEVER = {
    "retriever.service",
    "retriever.index_slot",
    "retriever.queries",
    "retriever.errors",
    "retriever.cache",
    "retriever.purchases",
    "retriever.metrics",
}
SKIP = {"localtriton/backends"}  # runs inside Triton's python stub, not in this project's processes


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if not any(str(path.relative_to(ROOT)).startswith(skip) for skip in SKIP):
                modules[module_name(path)] = path
    return modules


def imports(path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int, bool]]:
    """(imported name, line, at module level) for each import; `from a import b` names a.b when that is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                yield (full if full in modules else node.module), node.lineno, id(node) in top


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    modules = project_modules()
    return {name: list(imports(path, modules)) for name, path in modules.items()}


def test_imports_flow_from_the_library_up_to_the_wiring() -> None:
    wrong = []
    for module, found in graph().items():
        package = module.split(".")[0]
        for name, line, _ in found:
            target = name.split(".")[0]
            if target in LAYERS and target != package and LAYERS[target] >= LAYERS[package]:
                wrong.append(f"{module}:{line} imports {name} (layer {LAYERS[target]} >= {LAYERS[package]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    modules = graph()
    # A package's __init__ importing its own submodules is how packages re-export: not a cycle to forbid.
    edges = {
        module: {name for name, _, _ in found if name in modules and not name.startswith(module + ".")}
        for module, found in modules.items()
    }
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for name in sorted(edges.get(module, ())):
            if state.get(name) == 1:
                cycles.append(" -> ".join(path[path.index(name) :] + [name]) if name in path else f"{module} -> {name}")
            elif name not in state:
                visit(name, path + [name])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_the_library_and_the_service_use_no_web_framework() -> None:
    wrong = []
    for module, found in graph().items():
        if LAYERS[module.split(".")[0]] <= 2 or module in PLAIN_RETRIEVER or module.startswith("evaluation"):
            wrong += [
                f"{module}:{line} imports {name}" for name, line, _ in found if name.split(".")[0] in WEB_FRAMEWORKS
            ]
    assert not wrong, "\n".join(wrong)


def test_the_retriever_process_loads_no_torch_at_import() -> None:
    """torch costs ~1 GB and seconds per KServe worker: the request path imports it only for local towers."""
    modules = graph()
    seen, stack, wrong = set(), ["retriever.server"], []
    while stack:
        module = stack.pop()
        if module in seen:
            continue
        seen.add(module)
        for name, line, at_top in modules.get(module, []):
            if not at_top:
                continue
            if name.split(".")[0] == "torch":
                wrong.append(f"{module}:{line}")
            if name in modules:
                stack.append(name)
            elif name.rsplit(".", 1)[0] in modules:  # `from package import name` where name is not a module
                stack.append(name.rsplit(".", 1)[0])
    assert not wrong, "torch imported at module level on the retriever's path: " + ", ".join(wrong)


def test_every_top_level_part_is_visible_in_a_clone() -> None:
    """model_repository/ holds only generated versions once exported: its README keeps it in a fresh clone."""
    assert (ROOT / "model_repository" / "README.md").is_file()
    assert all((ROOT / package / "__init__.py").is_file() for package in LAYERS if package not in ("examples", "tools"))
