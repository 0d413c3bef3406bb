"""The layers of DESIGN §2 hold: every project import (lazy ones inside functions included)
points down or sideways, never up. Parsed from the source, so a new module is checked too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# layer of a module -> the layers it may import (its own included)
ALLOWED = {
    "vaes": {"vaes"},
    "prior": {"prior"},
    "unified": {"vaes", "prior", "unified"},  # the joint model: layout, model, engine, configs
    "unified.data": {"vaes", "prior", "unified", "unified.data"},
    "unified.training": {"vaes", "prior", "unified", "unified.data", "unified.training"},
    "tasks": {"vaes", "prior", "unified", "unified.data", "tasks"},
    # the applications (composition roots) wire everything together
    "unified.apps": {"vaes", "prior", "unified", "unified.data", "unified.training", "tasks",
                     "unified.apps", "demo"},
    "demo": {"vaes", "prior", "unified", "unified.data", "unified.training", "tasks",
             "unified.apps", "demo"},
}
TOP = ("vaes", "prior", "unified", "tasks", "demo")


def layer(module: str) -> str | None:
    """The layer a dotted module name belongs to (the longest matching prefix)."""
    parts = module.split(".")
    if parts[0] not in TOP:
        return None
    two = ".".join(parts[:2])
    return two if two in ALLOWED else parts[0]


def project_modules() -> dict[str, Path]:
    out = {}
    for top in TOP:
        for path in (ROOT / top).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import statement, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module))
            # `from tasks import shapes` names a submodule: check it as one
            out.extend((node.lineno, f"{node.module}.{a.name}") for a in node.names)
    return out


def upward_imports() -> list[str]:
    modules = project_modules()
    bad = []
    for name, path in sorted(modules.items()):
        own = layer(name)
        for line, target in imports_of(path):
            if target not in modules and target.rsplit(".", 1)[0] not in modules:
                continue  # not a project module (or a name imported from one)
            if target not in modules:
                continue  # `from pkg import name`: the package itself was checked
            other = layer(target)
            if other is not None and other not in ALLOWED[own]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports {target} ({other})")
    return bad


def test_every_module_belongs_to_a_layer():
    assert all(layer(name) in ALLOWED for name in project_modules())


def test_no_import_points_up():
    assert upward_imports() == []


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule can fail: a core module that imports a task is reported."""
    fake = tmp_path / "unified"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from tasks import text_to_image\n")
    found = imports_of(fake / "bad.py")
    assert (2, "tasks.text_to_image") in found
    assert layer("tasks.text_to_image") not in ALLOWED[layer("unified.bad")]


def test_every_task_has_the_same_shape():
    """Every task is in the registry with a name, a layout recipe with one target segment,
    and a way to decode; the image-text ones also turn records into training samples."""
    from tasks import REGISTRY, TASKS

    assert set(REGISTRY) == {"text_to_text", "image_to_text", "text_to_image"}
    for name, task in REGISTRY.items():
        assert task.NAME == name
        specs = task.recipe(1)
        assert sum(s.target for s in specs) == 1
        assert callable(getattr(task, "stream", None) or getattr(task, "generate", None))
    assert set(TASKS) <= set(REGISTRY)
    assert all(callable(t.training_sample) for t in TASKS.values())
