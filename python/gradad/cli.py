"""The ``gradad`` command line: train, test, predict, export, demo and serve.

This module imports only light modules (the standard library and gradad.deploy: numpy, Pillow),
so that ``gradad predict IMAGES --checkpoint model.onnx`` (or ``model.xml``) and ``gradad serve``
run on a machine without torch: those commands are parsed and run here, through
:mod:`gradad.deploy` and :mod:`gradad.serve`. Every other command, and predict of a torch
checkpoint, is :mod:`gradad.commands` (the parser of all subcommands and their torch-side
implementations), imported by :func:`main` only then; the server (starlette, uvicorn: the
``[serve]`` extra) is :mod:`gradad.serve.server`, imported only for ``serve``. These are the
function-level imports of gradad modules that tests/test_architecture.py allows.

Every command builds its config in the same order, each step overriding the previous one:
the preset (--preset) or, for test/predict, the checkpoint's own config, or the defaults;
then the YAML file (--config); then the shortcut flags (--model, --dataset, --root,
--classes, --device, --out); then each --set section.key=value in order.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Optional, Sequence

from . import __version__
from .deploy.metadata import MetadataError
from .deploy.predict import ON_ERROR_CHOICES, predict_files
from .deploy.scorer import BACKENDS
from .serve.config import add_serve_arguments, config_from_args
from .serve.store import StoreLocked

# --checkpoint files scored by gradad.deploy, without torch
EXPORTED_SUFFIXES = (".onnx", ".xml")
EXIT_ERROR = 1
LIGHT_ERRORS = (ValueError, KeyError, TypeError, OSError, RuntimeError, ImportError, MetadataError, StoreLocked)
SERVE_INSTALL = "pip install 'gradad-runtime[serve]' (or 'grad-ext[serve]')"
# names gradad.cli re-exports from gradad.commands when asked for (build_parser, build_config, ...)
_LAZY = ("build_parser", "build_config", "demo_config", "COMMANDS", "USER_ERRORS", "DEMO_PRESET", "DEMO_OUT")


def light_command(argv: Sequence[str]) -> bool:
    """Whether the command line is one this module runs without torch: ``serve``, or
    ``predict`` of an exported model."""
    positional = [a for a in argv if not a.startswith("-")]
    return bool(positional) and positional[0] == "serve" or exported_checkpoint(argv) is not None


def exported_checkpoint(argv: Sequence[str]) -> Optional[str]:
    """The --checkpoint of a ``predict`` command line when it names an exported model
    (:data:`EXPORTED_SUFFIXES`), else None."""
    args = list(argv)
    positional = [a for a in args if not a.startswith("-")]
    if not positional or positional[0] != "predict":
        return None
    for i, arg in enumerate(args):
        value = args[i + 1] if arg == "--checkpoint" and i + 1 < len(args) else \
            arg.split("=", 1)[1] if arg.startswith("--checkpoint=") else None
        if value is not None and value.lower().endswith(EXPORTED_SUFFIXES):
            return value
    return None


def build_light_parser() -> argparse.ArgumentParser:
    """The parser of ``gradad predict IMAGES --checkpoint EXPORTED`` and ``gradad serve`` (no torch)."""
    parser = argparse.ArgumentParser(prog="gradad", description="GRAD anomaly detection (exported model).")
    parser.add_argument("--version", action="version", version=f"gradad {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict = commands.add_parser("predict", help="score image files or folders with an exported model")
    predict.add_argument("images", nargs="+", help="image files and/or folders of images")
    predict.add_argument("--checkpoint", required=True, help="exported model.onnx or model.xml, model.json beside it")
    predict.add_argument("--threshold", type=float, help="decision threshold instead of the metadata's")
    predict.add_argument("--backend", choices=BACKENDS, default="auto", help="runtime (auto: by the file's suffix)")
    predict.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="raise",
                         help="unreadable image: fail the run (after scoring the others) or skip it")
    predict.add_argument("--batch-size", type=int, default=8, help="images read per step")
    predict.add_argument("--out", help="output folder (default: predict/ beside the model file)")
    predict.add_argument("--no-progress", action="store_true", help="accepted for symmetry; nothing to hide")
    serve = commands.add_parser("serve", help="serve an exported model over HTTP, with a page and a durable log",
                                description="Inspect images sent over HTTP (and from --watch) with an exported "
                                            "model; every answer is committed to the log in --data first.")
    add_serve_arguments(serve)
    return parser


def _serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        from .serve.server import serve  # starlette and uvicorn: only for this command (see the docstring)
    except ImportError as error:
        raise ImportError(f"gradad serve needs the [serve] extra ({error}): {SERVE_INSTALL}") from None
    return serve(config, announce=lambda line: print(line, flush=True))


def _light_predict(args: argparse.Namespace) -> int:
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "predict")
    result = predict_files(args.checkpoint, args.images, out_dir, threshold=args.threshold, backend=args.backend,
                           on_error=args.on_error, batch_size=args.batch_size)
    for row in result.rows:
        verdict = "ANOMALOUS" if row["anomalous"] else "normal"
        print(f"{row['score']:.5g}\t{verdict}\t{row['path']}")
    print(f"results: {os.path.join(out_dir, 'results.json')}")
    if result.problems and args.on_error == "raise":
        print(f"gradad predict: error: {len(result.problems)} image(s) could not be scored (listed in "
              f"results.json; --on-error skip accepts that): {', '.join(result.problems[:5])}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def _light_main(argv: Sequence[str]) -> int:
    args = build_light_parser().parse_args(argv)
    previous_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return _serve(args) if args.command == "serve" else _light_predict(args)
    except LIGHT_ERRORS as error:
        if args.traceback:
            raise
        print(f"gradad {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        warnings.formatwarning = previous_format


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``gradad`` console script; returns the exit status (0 on success, 1
    on an error, which is printed as one line unless --traceback is given)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if light_command(argv):
        return _light_main(argv)
    try:
        from . import commands  # torch side: only for the commands that need it (see the docstring)
    except ImportError as error:  # gradad-runtime, or no torch: only predict of an exported model runs
        print(f"gradad: error: this command needs the full grad-ext install with torch ({error}); without "
              f"it only `gradad predict IMAGES --checkpoint model.onnx|model.xml` runs", file=sys.stderr)
        return EXIT_ERROR
    return commands.main(argv)


def __getattr__(name: str):
    """build_parser, build_config, ... of :mod:`gradad.commands`, imported on first use."""
    if name in _LAZY:
        from . import commands  # as in main: torch side on demand

        return getattr(commands, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
