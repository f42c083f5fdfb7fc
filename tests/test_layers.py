"""The package reads top-down: no module imports a layer above its own (in-function imports included)."""

import ast
from pathlib import Path

import fullvq

PACKAGE = Path(fullvq.__file__).parent

# Bottom to top; a module may import its own layer and those below it.
LAYERS = [
    {"config", "data", "images", "io", "distributed", "cards", "precision"},  # base
    {"tokenizer"},  # models: stage one
    {"generator"},  # models: stage two
    {"pipelines"},
    {"eval"},  # metrics
    {"jobs"},  # what users run
    {"commands", "cli"},  # the command line
]
LAYER_OF = {room: level for level, rooms in enumerate(LAYERS) for room in rooms}


def room_of(module: str) -> str | None:
    """``fullvq.jobs.loop`` -> ``jobs``; ``fullvq`` itself (the lazy facade) -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every fullvq import in the file, at any depth."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if target == "fullvq":  # names from the facade: judge them by the module that defines them
                found += [(node.lineno, fullvq._LAZY.get(alias.name, "fullvq")) for alias in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, module) for line, module in found if module == "fullvq" or module.startswith("fullvq.")]


def test_every_module_belongs_to_a_layer():
    rooms = {room_of(module_name(path)) for path in PACKAGE.rglob("*.py")} - {None}
    assert rooms <= set(LAYER_OF), f"rooms without a layer: {sorted(rooms - set(LAYER_OF))}; add them to LAYERS"


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = room_of(module_name(path))
        if importer is None:
            continue  # fullvq/__init__.py re-exports public names from every layer, lazily
        for line, module in imported_modules(path):
            target = room_of(module)
            if target is not None and LAYER_OF[target] > LAYER_OF[importer]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({importer}) imports {module} ({target})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_walk_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "fullvq" / "tokenizer" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from ..pipelines import load_pipeline\n    from fullvq import FullVQPipeline\n")
    global PACKAGE
    real, PACKAGE = PACKAGE, tmp_path / "fullvq"
    try:
        modules = [module for _, module in imported_modules(source)]
    finally:
        PACKAGE = real
    assert modules == ["fullvq.pipelines", "fullvq.pipelines.autoregressive"]
