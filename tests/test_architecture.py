"""The conventions of gradad's module structure, checked from the source (no import runs):

- imports go one way, down the layers of LAYERS (a module imports only from lower layers, or
  from its own package), so there is no cycle;
- no import inside a function or class, except of an optional dependency (OPTIONAL);
- no file over MAX_LINES lines;
- grad_ext (the op library) never imports gradad.

The checker itself is tested on made-up sources, so a broken checker cannot pass silently.
"""

from __future__ import annotations

import ast
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "python" / "gradad"
GRAD_EXT_DIR = ROOT / "grad_ext"
MAX_LINES = 400
# Lowest first. Each entry is a layer of module prefixes. The choice lists live with their
# implementers (datasets, features, evaluation, fusion, FBP, runtime), which is why config sits
# above them and reads them, and everything built from a config sits above config.
LAYERS = (
    ("gradad.io_utils", "gradad.image_files"),
    ("gradad.html_page",),
    ("gradad.prediction_files",),
    ("gradad.runtime", "gradad.deploy"),
    ("gradad.serve",),
    ("gradad.datasets",),
    ("gradad.backbones", "gradad.metrics", "gradad.operating_points"),
    ("gradad.evaluation", "gradad.features", "gradad.models.fusion", "gradad.models.fbp", "gradad.models"),
    ("gradad.config",),
    ("gradad.models.grad",),
    ("gradad.models.bigrid",),
    ("gradad.models.factory", "gradad.checkpoint", "gradad.listings"),
    ("gradad.engine", "gradad.inference"),
    ("gradad.precision_check",),
    ("gradad.quantize",),
    ("gradad.export",),
    ("gradad.report",),
    ("gradad.commands",),
    ("gradad.cli",),
    ("gradad.__main__",),
)
# Imported inside the functions that need them: dependencies a user may not have installed.
OPTIONAL = ("elpv_dataset", "safetensors", "onnxruntime", "openvino", "onnx", "onnxscript", "nncf",
            "grad_ext.onnx",  # grad_ext.onnx imports onnx and onnxscript
            "fcntl", "msvcrt")  # the standard library's file locks: one exists on POSIX, the other on Windows
# The allowed function-level imports of gradad modules: the command line imports its torch
# side only for the commands that need it, so `gradad predict --checkpoint model.onnx` runs
# where torch is not installed, and the server (starlette, uvicorn) only for `gradad serve`
# (module, imported module).
LAZY_IMPORTS = {("gradad.cli", "gradad.commands"), ("gradad.cli", "gradad.serve.server")}


def module_name(path: pathlib.Path, package_dir: pathlib.Path = PACKAGE_DIR) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the matching prefix) of a gradad module; the bare package is below all."""
    if module == "gradad":
        return -1, "gradad"
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    if best is None:
        raise AssertionError(f"module {module} is in no layer of LAYERS: add it")
    return best


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in ``source``, relative
    imports resolved; `if TYPE_CHECKING:` blocks are not imports."""
    tree = ast.parse(source)
    found = []
    base = module.split(".") if is_package else module.split(".")[:-1]

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            nested = top_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                                           ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, top_level) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    anchor = base[:len(base) - child.level + 1]
                    target = ".".join(anchor + ([child.module] if child.module else []))
                    # `from . import x` names submodules
                    names = [f"{target}.{a.name}" for a in child.names] if not child.module else [target]
                else:
                    names = [child.module]
                found.extend((name, child.lineno, top_level) for name in names)
            visit(child, nested)

    visit(tree, True)
    return found


def violations(sources: dict[str, tuple[str, bool]], max_lines: int = MAX_LINES) -> list[str]:
    """Every broken convention in ``sources`` ({module: (source, is_package)})."""
    problems = []
    for module, (source, is_package) in sorted(sources.items()):
        lines = source.count("\n") + 1
        if lines > max_lines:
            problems.append(f"{module}: {lines} lines (at most {max_lines})")
        layer, prefix = layer_of(module)
        for target, line, top_level in imports_of(source, module, is_package):
            root = target.split(".")[0]
            if not top_level and root not in OPTIONAL and target not in OPTIONAL and \
                    (module, target) not in LAZY_IMPORTS:
                problems.append(f"{module}:{line}: imports {target} inside a function (only {OPTIONAL} may be)")
            if root != "gradad" or target in ("gradad", "gradad.__version__"):
                continue
            target_layer, target_prefix = layer_of(target)
            if target_prefix == prefix or target_layer < layer:
                continue
            problems.append(f"{module}:{line}: imports {target} (layer {target_layer}, {target_prefix}) "
                            f"from layer {layer} ({prefix}): against the flow")
    return problems


def package_sources(package_dir: pathlib.Path = PACKAGE_DIR) -> dict[str, tuple[str, bool]]:
    return {module_name(p, package_dir): (p.read_text(encoding="utf-8"), p.name == "__init__.py")
            for p in sorted(package_dir.rglob("*.py"))}


def test_gradad_follows_its_layers():
    sources = package_sources()
    assert len(sources) > 20  # the whole package was found
    assert violations(sources) == []


def test_every_module_is_in_a_layer():
    for module in package_sources():
        layer_of(module)


def test_grad_ext_never_imports_gradad():
    for path in sorted(GRAD_EXT_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] == "gradad" for n in names), f"{path.name}:{node.lineno}"


def test_one_cpp_standard_for_both_builds():
    cmake = re.search(r"set\(CMAKE_CXX_STANDARD (\d+)\)", (ROOT / "CMakeLists.txt").read_text())
    setup = re.search(r"^CXX_STANDARD = (\d+)$", (ROOT / "setup.py").read_text(), re.MULTILINE)
    assert cmake and setup and cmake.group(1) == setup.group(1)


# ---- the checker catches what it should ------------------------------------------------------

@pytest.mark.parametrize("module, source, expected", [
    # a dataset module reaching up to the engine
    ("gradad.datasets.listing", "from ..engine import train\n", "against the flow"),
    # two modules of the same layer but different packages
    ("gradad.inference", "from .engine import train\n", "against the flow"),
    # the config importing a model built from it
    ("gradad.config.sections", "import gradad.models.grad\n", "against the flow"),
    # a function-level import of a gradad module
    ("gradad.cli", "def f():\n    from .engine import train\n", "inside a function"),
    # a function-level import of a gradad module other than the allowed lazy one
    ("gradad.cli", "def f():\n    from .report import write_test_report\n", "inside a function"),
    # a function-level import of a required dependency
    ("gradad.backbones", "def f():\n    import timm\n", "inside a function"),
    # too long
    ("gradad.metrics", "x = 1\n" * (MAX_LINES + 1), "lines"),
])
def test_checker_finds_violations(module, source, expected):
    problems = violations({module: (source, False)})
    assert len(problems) == 1 and expected in problems[0], problems


def test_checker_accepts_the_allowed_forms():
    sources = {
        "gradad.engine.training": ("from .epochs import run_epoch\nfrom ..config import Config\n", False),
        "gradad.cli": ("from .deploy import Scorer\nfrom . import __version__\ndef f():\n    from . import commands\n",
                       False),
        "gradad.datasets.listing": ("def f():\n    import elpv_dataset\n", False),
        "gradad.export": ("def f():\n    import grad_ext.onnx\n", False),
        "gradad.commands": ("from .report import write_test_report\n", False),
        "gradad.models.grad": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..cli import main\n",
                               False),
    }
    assert violations(sources) == []


LIGHT_ROOTS = {"numpy", "PIL", "__future__"}
# the modules of gradad.serve that import the [serve] extra (starlette, uvicorn); the rest of it is light
SERVE_EXTRA = {"gradad.serve.app": {"starlette"}, "gradad.serve.server": {"uvicorn"}}
# gradad's modules of the standard library only, shared by the light and the torch side.
LIGHT_GRADAD = ("gradad.io_utils", "gradad.image_files", "gradad.html_page", "gradad.prediction_files")


def test_cli_and_deploy_import_only_light_modules():
    """gradad.cli, gradad.deploy and the standard-library helpers they use (LIGHT_GRADAD) at
    module level import the standard library, numpy, Pillow and each other only (no torch, no
    grad_ext), so predict of an exported model runs without torch; tests/test_export.py runs it
    where importing torch fails."""
    sources = package_sources()
    light = {m: s for m, s in sources.items()
             if m == "gradad.cli" or m.startswith(("gradad.deploy", "gradad.serve")) or m in LIGHT_GRADAD}
    assert "gradad.deploy.scorer" in light and "gradad.serve.store" in light
    for module, (source, is_package) in light.items():
        for target, line, top_level in imports_of(source, module, is_package):
            root = target.split(".")[0]
            if root == "gradad":
                allowed = (target in ("gradad", "gradad.__version__", *LIGHT_GRADAD)
                           or target.startswith("gradad.deploy")
                           or (target.startswith("gradad.serve") and (module != "gradad.cli" or target not in
                                                                       SERVE_EXTRA or not top_level))
                           or (not top_level and (module, target) in LAZY_IMPORTS))
                assert allowed, f"{module}:{line} imports {target}"
            elif top_level:
                assert root in LIGHT_ROOTS | SERVE_EXTRA.get(module, set()) or root in sys.stdlib_module_names, \
                    f"{module}:{line} imports {target}"
