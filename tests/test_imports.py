"""The layers of the package, read from every module's imports with ast."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "consistency"

# subpackage -> the subpackages its modules may import (each may import itself).
LAYERS = {
    "core": set(),  # pure math on callables: schedules ... losses, samplers, editing
    "models": set(),  # generators: networks that know nothing of sigma or config
    "io": set(),  # data, checkpoints, sharding, preemption, image files, the .pt reader
    "measure": {"io"},  # FID/IS math, Inception, LPIPS/VGG, digits classifier
    "convert": {"models", "io"},  # official checkpoints -> our params
    "experiment": {"core", "models", "io", "measure", "convert"},  # config -> specs -> runs
}
# Third-party packages only the experiment layer may import: it alone reads config.
CONFIG_PACKAGES = ("ml_collections",)


def _modules():
    """(layer, path) of every module; entry points (__main__) are above the layers."""
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if len(rel.parts) > 1 and path.name != "__main__.py":
            yield rel.parts[0], path


def _imports(path: pathlib.Path) -> set[str]:
    """Every absolute module name the file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "consistency" and len(parts) > 1 else None


def test_every_subpackage_is_in_the_table():
    found = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert found == set(LAYERS)
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert top == {"__init__.py"}, f"modules outside the subpackages: {sorted(top)}"


def test_imports_go_down_the_layers():
    problems = []
    for layer, path in _modules():
        for name in _imports(path):
            target = _layer(name)
            if target and target != layer and target not in LAYERS[layer]:
                problems.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not problems, "\n".join(problems)


def test_only_the_experiment_layer_reads_config():
    problems = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for layer, path in _modules()
        for name in _imports(path)
        if layer != "experiment" and name.split(".")[0] in CONFIG_PACKAGES
    ]
    assert not problems, "\n".join(problems)
    # And nothing below it takes a parameter named `config` (a ConfigDict by convention here).
    for layer, path in _modules():
        if layer == "experiment":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                args = [a.arg for a in node.args.args + node.args.kwonlyargs]
                assert "config" not in args, f"{path.relative_to(PACKAGE)}:{node.name} takes config"
