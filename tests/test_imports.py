"""The import direction of STYLE.md, read from every module's imports with ast."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "consistency"
MATH = {"schedules", "parameterization", "ode", "distances", "losses", "samplers", "editing"}
INFRA = {"data", "checkpoints", "sharding", "optim", "train_state"}

# module (or "package.*") -> the consistency modules it may import.
ALLOWED = {
    "schedules": set(),
    "parameterization": set(),
    "ode": {"schedules", "parameterization"},
    "distances": set(),
    "losses": {"schedules", "parameterization", "ode", "distances"},
    "samplers": {"schedules", "parameterization", "ode"},
    "editing": {"schedules", "parameterization", "samplers"},
    # Networks stand apart; the torch-free .pt reader is a leaf IO utility they may load with.
    "models.*": {"models.*", "convert.torch_pt"},
    "convert.*": {"models.*", "convert.*"},
    "metrics": set(),
    **{name: INFRA for name in INFRA},
    # Only these turn config into functions: they meet math, models and infrastructure.
    "train": {"*"},
    "evaluate": {"*"},
    "builders": {"*"},
    "scoring": {"*"},  # --mode=eval: config -> samples, features and metrics of checkpoints
    # The digits FID's classifier: trained on the digits data, its network from models/.
    "classifier": {"data", "models.*"},
    "editor": {"*"},  # --mode=edit: config -> editing tasks on a checkpoint's model
    # The convert command: config -> network, an official checkpoint -> our checkpoint format.
    "convert.cli": {"*"},
}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _rule(name: str):
    if name in ALLOWED:
        return ALLOWED[name]
    for key, allowed in ALLOWED.items():
        if key.endswith(".*") and name.startswith(key[:-1]):
            return allowed
    return None


def _matches(target: str, patterns) -> bool:
    return any(
        p == "*" or p == target or (p.endswith(".*") and target.startswith(p[:-1]))
        for p in patterns
    )


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n.startswith("consistency."):
                found.add(n[len("consistency.") :])
    # "from consistency.models import adm" names both models and models.adm; keep modules only.
    return {n for n in found if (PACKAGE / n.replace(".", "/")).with_suffix(".py").exists()
            or (PACKAGE / n.replace(".", "/")).is_dir()}  # fmt: skip


def test_every_module_follows_the_dependency_table():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if not name or name.split(".")[-1] in ("__main__",) and name.count(".") == 0:
            continue
        if name in ("models", "convert") or name.endswith("__main__"):
            rule = _rule(name + ".*") if name in ("models", "convert") else {"*"}
        else:
            rule = _rule(name)
        if rule is None:
            problems.append(f"{name}: not in the dependency table of tests/test_imports.py")
            continue
        for target in _imports(path):
            if target != name and not _matches(target, rule):
                problems.append(f"{name} imports {target}")
    assert not problems, "\n".join(problems)


def test_the_table_rejects_an_upward_import():
    assert not _matches("losses", ALLOWED["schedules"])
    assert not _matches("train", ALLOWED["models.*"])
    assert _matches("models.attention", ALLOWED["models.*"])
