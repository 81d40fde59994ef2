"""Imports point one way (README "Layout"): every module of flowfeat_jax/ sits in one layer of LAYERS, and no module
imports a higher layer or a sibling layer of the same rank, not even inside a function. Imports inside functions
are kept for heavy optional dependencies and for the `--help` speed of the entry points only, each with a comment.

A static parse (ast) of the source: fast, and it sees imports that never run in the tests.
"""

import ast
import pathlib
import re

PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1] / "flowfeat_jax"

# (layer, rank, modules or packages). Higher ranks may import lower ones; layers of the same rank (train and eval:
# train reaches evaluation only through the callback main hands it) may not import each other. A new module must be
# placed here.
LAYERS = (
    ("basics", 0, ("flowfeat_jax.errors", "flowfeat_jax.config", "flowfeat_jax.settings", "flowfeat_jax.progress",
                   "flowfeat_jax.viz")),
    ("models", 1, ("flowfeat_jax.models",)),
    ("torch_ref", 1, ("flowfeat_jax.torch_ref",)),
    ("ports", 2, ("flowfeat_jax.ports",)),
    ("flow", 3, ("flowfeat_jax.flow",)),
    ("data", 4, ("flowfeat_jax.data",)),
    ("train", 5, ("flowfeat_jax.train",)),
    ("eval", 5, ("flowfeat_jax.eval",)),
    ("inference", 6, ("flowfeat_jax.inference",)),
    ("probes", 7, ("flowfeat_jax.probes",)),
    ("apps", 8, ("flowfeat_jax.apps", "flowfeat_jax.cli", "flowfeat_jax.main", "flowfeat_jax.evaluate",
                 "flowfeat_jax.probe", "flowfeat_jax")),
)
# Third-party packages slow to import or needed by one path only: imported where that path runs.
HEAVY_OPTIONAL = {"torch", "cv2", "av", "tensorflow_datasets", "wandb", "tensorboardX", "huggingface_hub"}
# Package modules imported inside a function, because they bring one of those with them: (importer, imported).
HEAVY_PACKAGE_MODULES = {
    ("flowfeat_jax.apps.bench", "flowfeat_jax.ports.flowfeat"),  # torch, only for --torch
    ("flowfeat_jax.apps.bench", "flowfeat_jax.torch_ref.flowfeat"),
    ("flowfeat_jax.apps.bench", "flowfeat_jax.torch_ref.train"),
    ("flowfeat_jax.flow.methods", "flowfeat_jax.flow.dis"),  # cv2 / torch, only for the method asked for
    ("flowfeat_jax.flow.methods", "flowfeat_jax.flow.searaft"),
    ("flowfeat_jax.flow.methods", "flowfeat_jax.flow.raft"),
}
# Entry points whose imports wait until after argument parsing, so `--help` answers at once (the package root: so
# that `import flowfeat_jax`, which every configs/*.py does through flowfeat_jax.config, stays light).
HELP_SPEED = {"flowfeat_jax.main", "flowfeat_jax.evaluate", "flowfeat_jax.probe", "flowfeat_jax"}


def module_name(path: pathlib.Path, package_dir: pathlib.Path = PACKAGE_DIR) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> tuple[str, int] | None:
    """The layer whose most specific entry covers `module` (a subpackage entry covers its modules; the package root
    entry only the root)."""
    best = None
    for name, rank, entries in LAYERS:
        for entry in entries:
            covers = module == entry or (entry != "flowfeat_jax" and module.startswith(entry + "."))
            if covers and (best is None or len(entry) > best[0]):
                best = (len(entry), name, rank)
    return best and best[1:]


def imports(path: pathlib.Path, package_dir: pathlib.Path = PACKAGE_DIR) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) of every import; `from pkg import name` names pkg.name when that
    is a module of the package, else pkg."""
    module, root = module_name(path, package_dir), package_dir.parent
    is_package = path.name == "__init__.py"
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = module.split(".")[: len(module.split(".")) - child.level + is_package]
                    base = ".".join(parent + ([child.module] if child.module else []))
                for alias in child.names:
                    candidate = f"{base}.{alias.name}"
                    known = (root / (candidate.replace(".", "/") + ".py")).is_file() or (
                        root / candidate.replace(".", "/") / "__init__.py").is_file()
                    found.append((candidate if known else base, child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}
IMPORTS = {module: imports(path) for module, path in MODULES.items()}


def has_reason(path: pathlib.Path, line: int) -> bool:
    """A comment on the import line, or on a line of the block of imports (blank lines included) it is part of."""
    lines = path.read_text().splitlines()
    index = line - 1
    while True:
        comment = lines[index].partition("#")[2]
        if re.sub(r"noqa(: [A-Z0-9, ]+)?", "", comment).strip():  # a reason, not only a linter pragma
            return True
        above = lines[index - 1].strip() if index else None
        if above is None or (above and not above.startswith(("import ", "from ", "#"))):
            return False
        index -= 1


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if layer_of(m) is None)
    assert not unplaced, f"modules in no layer of LAYERS (place them): {unplaced}"


def test_no_import_points_up_or_sideways():
    back_edges = []
    for module, found in IMPORTS.items():
        layer, rank = layer_of(module)
        for name, line, _ in found:
            target = layer_of(name) if name.startswith("flowfeat_jax") else None
            if target is None or target[0] == layer:
                continue
            if target[1] >= rank:
                back_edges.append(f"{MODULES[module].relative_to(PACKAGE_DIR.parent)}:{line} ({layer}) imports "
                                  f"{name} ({target[0]})")
    assert not back_edges, "imports against the layer order:\n" + "\n".join(back_edges)


def test_imports_inside_functions_are_heavy_or_for_help_speed_and_say_why():
    refused, silent = [], []
    for module, found in IMPORTS.items():
        for name, line, inner in found:
            if not inner:
                continue
            where = f"{MODULES[module].relative_to(PACKAGE_DIR.parent)}:{line} {name}"
            package_module = name.startswith("flowfeat_jax")
            if not (module in HELP_SPEED or ((module, name) in HEAVY_PACKAGE_MODULES if package_module
                                             else name.split(".")[0] in HEAVY_OPTIONAL)):
                refused.append(where)
            elif not has_reason(MODULES[module], line):
                silent.append(where)
    assert not refused, "imports inside functions that should be at the top:\n" + "\n".join(refused)
    assert not silent, "imports inside functions without a comment saying why:\n" + "\n".join(silent)


def test_the_parse_sees_relative_in_function_and_module_imports(tmp_path):
    """The checks above are only as good as the parse: a relative `from . import module`, an import inside a
    function, and placement of a module no layer names."""
    package = tmp_path / "flowfeat_jax"
    for name in ("models/vit.py", "models/new_model.py", "train/loop.py"):
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text("")
    source = "from . import vit\n\n\ndef f():\n    from flowfeat_jax.train import loop\n"
    (package / "models" / "new_model.py").write_text(source)
    found = imports(package / "models" / "new_model.py", package)
    assert found == [("flowfeat_jax.models.vit", 1, False), ("flowfeat_jax.train.loop", 5, True)]
    assert layer_of("flowfeat_jax.train.loop")[1] > layer_of("flowfeat_jax.models.new_model")[1]
    assert layer_of("flowfeat_jax.new_module") is None  # the package root entry does not cover new modules
