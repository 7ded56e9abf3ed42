"""The torch side of the ``gradad`` command line: train, test, predict (of a checkpoint), export
and demo. :mod:`gradad.cli` imports this module only for these commands, so that ``gradad
predict --checkpoint model.onnx`` runs where torch is not installed.

Every command builds its config in the same order, each step overriding the previous one:
the preset (--preset) or, for test/predict, the checkpoint's own config, or the defaults;
then the YAML file (--config); then the shortcut flags (--model, --dataset, --root,
--classes, --device, --out); then each --set section.key=value in order.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Optional, Sequence

from grad_ext._common import SAMPLERS

from . import __version__
from .checkpoint import run_config
from .config import (
    ARCHITECTURES,
    PRESETS,
    Config,
    apply_overrides,
    config_to_yaml,
    dump_config,
    load_config,
    preset_config,
)
from .datasets import DATASET_NAMES, ON_ERROR_CHOICES
from .deploy import PRECISIONS
from .engine import train
from .export import FORMATS as EXPORT_FORMATS
from .export import export_detector
from .inference import load_model, load_run, predict, run_test
from .quantize import PrecisionConfig
from .report import format_table, pixel_notes, write_predictions, write_test_report
from .runtime import finish_distributed, is_main_process
from .serve.config import add_serve_arguments

# The demo: ELPV solar cells, offline EfficientNet-Lite weights, sized for a small CPU: a
# seeded subset of the training cells.
DEMO_PRESET = "lite-demo"
DEMO_BIGRID_PRESET = "bigrid-lite"
DEMO_OVERRIDES = ("data.dataset=elpv", "data.root=none", "split.max_train_images=400")
DEMO_OUT = "runs/demo"
CONFIG_NAME = "config.yaml"
EXIT_ERROR = 1
# Errors of bad input or environment: shown as one line, without a traceback.
USER_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, NotADirectoryError, OSError,
               RuntimeError, FloatingPointError, ImportError)


def _add_config_flags(parser: argparse.ArgumentParser, with_preset: bool = True,
                      with_model: bool = False) -> None:
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", metavar="YAML", help="YAML config file (missing keys keep the defaults)")
    if with_preset:
        group.add_argument("--preset", choices=sorted(PRESETS), help="named starting config")
    if with_model:
        group.add_argument("--model", choices=ARCHITECTURES,
                           help="grad, or bigrid: Bi-Grid GRAD trained in the stages of the bigrid "
                           "section (model.architecture)")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value, e.g. --set train.epochs=10 (repeatable)")
    group.add_argument("--dataset", help=f"dataset name: {', '.join(DATASET_NAMES)} (data.dataset)")
    group.add_argument("--root", help="dataset folder (data.root)")
    group.add_argument("--classes", help="comma-separated class names (data.classes); default: all")
    group.add_argument("--device", help="auto, cpu, cuda or cuda:N (train.device)")
    group.add_argument("--out", help="output folder")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of all subcommands."""
    parser = argparse.ArgumentParser(prog="gradad", description="GRAD anomaly detection: train on normal "
                                     "images, then score images with anomaly heatmaps.")
    parser.add_argument("--version", action="version", version=f"gradad {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model; writes <out>/checkpoint.pt",
                                description="Train GRAD on the normal training images of a dataset.")
    _add_config_flags(train, with_model=True)
    train.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    _add_split_flags(train)

    test = commands.add_parser("test", help="evaluate a checkpoint on a test split",
                               description="Metrics (docs/method.md §5), scores, ROC curves and heatmaps of a "
                               "dataset's test split; default dataset: the checkpoint's.")
    test.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    test_threshold = test.add_mutually_exclusive_group()
    test_threshold.add_argument("--quantile", dest="test_quantile", type=float, help="report the threshold at this "
                                "quantile of the checkpoint's validation scores instead of the stored one")
    test_threshold.add_argument("--target-fpr", dest="test_target_fpr", type=float, help="report the threshold "
                                "that lets at most this fraction of the validation normals through instead")
    _add_config_flags(test)

    predict = commands.add_parser("predict", help="score image files or folders",
                                  description="Image score, anomalous/normal decision and heatmap per "
                                  "image; results.json and results.csv in --out.")
    predict.add_argument("images", nargs="+", help="image files and/or folders of images")
    predict.add_argument("--checkpoint", required=True, help="checkpoint file or run folder, or an exported "
                         "model.onnx / model.xml (then scored without torch: gradad.deploy)")
    threshold = predict.add_mutually_exclusive_group()
    threshold.add_argument("--threshold", type=float, help="decision threshold on the image score")
    threshold.add_argument("--quantile", type=float,
                           help="threshold = this quantile of the checkpoint's validation scores")
    threshold.add_argument("--target-fpr", type=float, help="threshold that lets at most this fraction of the "
                           "checkpoint's validation normals through as anomalous")
    predict.add_argument("--on-error", choices=ON_ERROR_CHOICES,
                         help="unreadable image: stop with an error or skip it with a warning")
    _add_config_flags(predict)

    export = commands.add_parser("export", help="write a trained detector as one ONNX / OpenVINO / torch.export file",
                                 description="The detector from image to answer (resize, normalisation, "
                                 "backbone, GRAD, strict post-processing) as one file, with model.json (threshold, "
                                 "input size, versions) beside it, in a new folder --out.")
    export.add_argument("--checkpoint", required=True, help="checkpoint file or a run folder with one checkpoint")
    export.add_argument("--format", dest="export_format", choices=EXPORT_FORMATS, default="onnx",
                        help="onnx (model.onnx), openvino (model.xml + model.bin) or torch (model.pt2)")
    export.add_argument("--out", required=True, help="the folder to create (must not exist or be empty)")
    export.add_argument("--opset", type=int, help="ONNX opset (default: grad_ext.onnx.DEFAULT_OPSET)")
    export.add_argument("--sampler", choices=SAMPLERS, default="auto",
                        help="how grid lookups are expressed in ONNX (grad_ext.onnx)")
    export.add_argument("--input-dtype", choices=("float32", "uint8"), default="float32",
                        help="the pixel type of the graph's input (values 0..255 either way)")
    export_threshold = export.add_mutually_exclusive_group()
    export_threshold.add_argument("--threshold", type=float, help="decision threshold instead of the checkpoint's")
    export_threshold.add_argument("--quantile", type=float,
                                  help="threshold = this quantile of the checkpoint's validation scores")
    export_threshold.add_argument("--target-fpr", type=float, help="threshold that lets at most this fraction of "
                                  "the checkpoint's validation normals through as anomalous")
    _add_precision_flags(export)

    demo = commands.add_parser("demo", help="train and evaluate on ELPV solar cells (CPU-sized)",
                               description="Train on ELPV normal cells with the offline "
                               "EfficientNet-Lite backbone, evaluate on the ELPV test split and write "
                               "the report to --out.")
    _add_config_flags(demo, with_preset=False, with_model=True)
    _add_split_flags(demo)
    # listed here for --help; gradad.cli runs it without torch (it never reaches COMMANDS)
    serve = commands.add_parser("serve", help="serve an exported model over HTTP, with a page and a durable log")
    add_serve_arguments(serve)
    return parser


def _optional_fraction(text: str) -> Optional[float]:
    return None if text.lower() == "none" else float(text)


def _add_precision_flags(parser: argparse.ArgumentParser) -> None:
    # defaults: gradad.quantize.PrecisionConfig
    defaults = PrecisionConfig()
    group = parser.add_argument_group("precision (onnx and openvino; see gradad.quantize)")
    group.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                       help="the convolutions' precision (backbone and GRAD head, gradad.quantize.LOWERED_SCOPES); "
                       "grid lookups, refinement and post-processing stay float32. fp16 and int8 are scored "
                       "against fp32 on the validation normals and test split before they are written")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--calibration", metavar="DIR", default=defaults.calibration_dir,
                        help="int8: calibrate on the normal images of this folder")
    source.add_argument("--calibration-from-checkpoint", dest="calibration", action="store_const", const=None,
                        help="int8: calibrate on the run's own training normals (the default)")
    group.add_argument("--calibration-images", type=int, default=defaults.calibration_images,
                       help="int8: at most this many calibration images, a seeded subset")
    group.add_argument("--max-auroc-drop", type=_optional_fraction, default=defaults.max_auroc_drop,
                       help="refuse a reduced-precision model whose image AUROC on the test split drops by more "
                       "than this ('none': no check)")


def _add_split_flags(parser: argparse.ArgumentParser) -> None:
    # shortcuts to the config's split section (defaults there; the demo caps the images)
    group = parser.add_argument_group("training images and threshold")
    group.add_argument("--max-train-images", help="train on a seeded subset of at most this many images "
                       "(split.max_train_images; 'none' for all)")
    group.add_argument("--val-fraction", help="seeded fraction of the training normals held out for the "
                       "threshold (split.val_fraction)")
    rule = group.add_mutually_exclusive_group()
    rule.add_argument("--threshold-quantile", help="decision threshold: this quantile of the held-out "
                      "normals' scores (split.threshold_quantile)")
    rule.add_argument("--target-fpr", help="decision threshold: the one that lets at most this fraction of the "
                      "held-out normals through as anomalous, e.g. 0.01 (split.target_fpr)")


def build_config(args: argparse.Namespace, base: Optional[Config] = None) -> Config:
    """The run's config from the parsed flags (see the module docstring for the order)."""
    if getattr(args, "preset", None):
        cfg = preset_config(args.preset)
    else:
        cfg = base if base is not None else Config()
    if args.config:
        cfg = load_config(args.config, base=cfg)
    shortcuts = []
    if getattr(args, "model", None) is not None:
        shortcuts.append(f"model.architecture={args.model}")
    if args.dataset is not None:
        shortcuts.append(f"data.dataset={args.dataset}")
    if args.root is not None:
        shortcuts.append(f"data.root={args.root}")
    if args.classes is not None:
        shortcuts.append(f"data.classes={args.classes}")
    if args.device is not None:
        shortcuts.append(f"train.device={args.device}")
    for flag, key in (("max_train_images", "max_train_images"), ("val_fraction", "val_fraction"),
                      ("threshold_quantile", "threshold_quantile"), ("target_fpr", "target_fpr")):
        if getattr(args, flag, None) is not None:
            shortcuts.append(f"split.{key}={getattr(args, flag)}")
    if getattr(args, "threshold_quantile", None) is not None:  # the quantile rule, not a target_fpr from elsewhere
        shortcuts.append("split.target_fpr=none")
    return apply_overrides(cfg, shortcuts + list(args.overrides))


def _command_train(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    out_dir = args.out or cfg.output_dir
    cfg = apply_overrides(cfg, [f"output_dir={out_dir}"])
    if is_main_process():
        dump_config(cfg, os.path.join(out_dir, CONFIG_NAME))
    try:
        result = train(cfg, out_dir, resume=args.resume, progress=not args.no_progress)
    finally:
        finish_distributed()
    if is_main_process():
        for path, losses in zip(result.checkpoints, result.epoch_losses):
            last = f", last epoch loss {losses[-1]:.5g}" if losses else ""
            print(f"checkpoint: {path} ({result.epochs} epochs{last})")
    return 0


def _run_and_out_dir(args: argparse.Namespace, default_subfolder: str):
    """The loaded run of --checkpoint under the config of the flags, and the output folder."""
    cfg = build_config(args, base=run_config(args.checkpoint))
    models = load_run(args.checkpoint, cfg, cfg.train.device)
    run_dir = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(args.checkpoint)
    return models, args.out or os.path.join(run_dir, default_subfolder)


def _command_test(args: argparse.Namespace) -> int:
    models, out_dir = _run_and_out_dir(args, "test")
    result = run_test(models, progress=not args.no_progress, quantile=args.test_quantile,
                      target_fpr=args.test_target_fpr)
    write_test_report(result, out_dir, progress=not args.no_progress)
    _print_results(result)
    print(f"report: {out_dir}")
    return 0


def _print_results(result) -> None:
    print(format_table(result.results))
    for note in pixel_notes(result.pixel_masks):
        print(note)


def _command_predict(args: argparse.Namespace) -> int:
    models, out_dir = _run_and_out_dir(args, "predict")
    if None not in models:
        raise ValueError(f"{args.checkpoint} is a per-class run ({', '.join(models)}): pass the checkpoint "
                         f"of one class, e.g. {os.path.join(args.checkpoint, next(iter(models)), 'checkpoint.pt')}")
    prediction = predict(models[None], args.images, threshold=args.threshold, quantile=args.quantile,
                         target_fpr=args.target_fpr, on_error=args.on_error, progress=not args.no_progress)
    results = write_predictions(prediction, out_dir, config_to_yaml(models[None].config))
    for row in results:
        verdict = "ANOMALOUS" if row["anomalous"] else "normal"
        print(f"{row['score']:.5g}\t{verdict}\t{row['path']}")
    print(f"results: {os.path.join(out_dir, 'results.json')}")
    if prediction.problems and prediction.on_error == "raise":
        print(f"gradad predict: error: {len(prediction.problems)} image(s) could not be scored (listed in "
              f"results.json; --on-error skip accepts that): {', '.join(prediction.problems[:5])}"
              + (" ..." if len(prediction.problems) > 5 else ""), file=sys.stderr)
        return EXIT_ERROR
    return 0


def _command_export(args: argparse.Namespace) -> int:
    precision = PrecisionConfig(args.precision, args.calibration, args.calibration_images, args.max_auroc_drop)
    result = export_detector(args.checkpoint, args.export_format, args.out, opset=args.opset, sampler=args.sampler,
                             input_dtype=args.input_dtype, threshold=args.threshold, quantile=args.quantile,
                             target_fpr=args.target_fpr, precision=precision)
    print(f"exported: {result.model_path} ({result.metadata['precision']}, threshold "
          f"{result.metadata['threshold']:.5g}, {result.metadata['threshold_source']})")
    accuracy = result.metadata.get("quantization", {}).get("accuracy")
    if accuracy is not None:
        auroc = "n/a" if accuracy["auroc"] is None else f"{accuracy['auroc_fp32']:.4f} -> {accuracy['auroc']:.4f}"
        print(f"accuracy against fp32: image AUROC {auroc} on {accuracy['test_images']} test images, largest score "
              f"change {accuracy['max_score_change']:.4g} over {accuracy['validation_normals']} validation normals "
              f"and the test images")
    print(f"metadata: {result.metadata_path}")
    return 0


def demo_config(args: argparse.Namespace) -> Config:
    """The demo's config: the 'lite-demo' preset ('bigrid-lite' with --model bigrid) on a
    seeded subset of ELPV (:data:`DEMO_OVERRIDES`), then the user's flags."""
    preset = DEMO_BIGRID_PRESET if getattr(args, "model", None) == "bigrid" else DEMO_PRESET
    return build_config(args, base=apply_overrides(preset_config(preset), DEMO_OVERRIDES))


def _command_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    cfg = demo_config(args)
    out_dir = args.out or DEMO_OUT
    cfg = apply_overrides(cfg, [f"output_dir={out_dir}"])
    dump_config(cfg, os.path.join(out_dir, CONFIG_NAME))
    result = train(cfg, out_dir, progress=not args.no_progress)
    trained = time.perf_counter()
    loaded = load_model(result.checkpoints[0], cfg, cfg.train.device)
    tested = run_test(loaded, progress=not args.no_progress)
    write_test_report(tested, out_dir, progress=not args.no_progress)
    finished = time.perf_counter()
    _print_results(tested)
    print(f"demo: trained in {trained - started:.0f} s, evaluated in {finished - trained:.0f} s, "
          f"total {finished - started:.0f} s on {loaded.device}")
    print(f"report: {out_dir}")
    return 0


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


COMMANDS = {"train": _command_train, "test": _command_test, "predict": _command_predict, "export": _command_export,
            "demo": _command_demo}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``gradad`` console script; returns the exit status (0 on success, 1
    on an error, which is printed as one line unless --traceback is given)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    previous_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as error:
        if args.traceback:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"gradad {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"gradad {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous_format
