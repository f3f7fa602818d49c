"""The ``wbc`` command line: one sub-command per DVC stage, plus tools around them.

Every sub-command takes ``--params`` (default ``params.yaml``) and its input/output paths,
whose defaults come from :mod:`pipeline.layout` and are the ones ``dvc.yaml`` uses. ``-q`` and
``--params`` go before or after the sub-command. An expected failure (params, data, MLflow,
memory, a file) ends the command with one paragraph on stderr and exit status 1; a usage error
with argparse's status 2. ``WBC_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import __version__
from pipeline.config import Params, ParamsError, load_params
from pipeline.layout import (
    AUGMENT_PREVIEW_FILE,
    CROSS_SITE,
    IMAGES_FILE,
    INDEX_FILE,
    INGEST_SUMMARY_FILE,
    INTERIM,
    MANIFEST_FILE,
    MODEL_FILE,
    MODELS,
    NORMALIZE_SUMMARY_FILE,
    POLICY,
    PROCESSED,
    RAW,
    REJECTED_FILE,
    REPORTS,
    SAMPLE_DIR,
    SPLITS,
)

if TYPE_CHECKING:  # the stage modules are imported by the command that runs them
    from pipeline.stain import StainReference

DESCRIPTION = "Train and evaluate white-blood-cell image classifiers: one sub-command per DVC stage, and tools."
EPILOG = (
    "Exit status: 0 done, 1 the command failed (bad params or data, MLflow, memory, a file; one paragraph on "
    "stderr says what and where), 2 wrong usage. WBC_DEBUG=1 shows the full traceback of a failure."
)
DEFAULT_PARAMS = Path("params.yaml")


class UsageError(Exception):
    """Options that do not go together: reported like argparse's own usage errors (exit status 2)."""


def _cmd_sample(args: argparse.Namespace, params: Params) -> None:
    from pipeline.sample import generate_sample

    counts = generate_sample(args.out, params.sample, params.data.classes)
    sizes = [f"{site.name} {site.size}px" for site in params.sample.sites]
    print(f"synthetic sample: {sum(counts.values())} images in {args.out} "
          f"({', '.join(sizes) or f'{params.sample.size}px'})")


def _cmd_ingest(args: argparse.Namespace, params: Params) -> None:
    from pipeline.ingest import run_ingest

    summary = run_ingest(params, out_dir=args.out, reports_dir=args.reports, progress=not args.quiet)
    print(f"ingest: kept {summary['n_kept']} of {summary['n_files']} files, rejected {summary['n_rejected']} "
          f"(see {args.out / REJECTED_FILE})")
    for split, counts in summary["counts"].items():
        print(f"  {split:5s} " + "  ".join(f"{name}={n}" for name, n in counts.items()))


def _stain_reference(path: Path) -> StainReference:
    """The colour reference saved in a trained model file, or recorded by wbc normalize in a processed
    folder (or its normalize.json)."""
    from pipeline.preprocess import read_preprocessing

    if path.is_dir() or path.name == NORMALIZE_SUMMARY_FILE:
        preprocessing = read_preprocessing(path if path.is_dir() else path.parent)
        reference = None if preprocessing is None else preprocessing.stain_reference
    else:
        from pipeline.inference import load_model

        reference = load_model(path)[1].stain_reference
    if reference is None:
        raise ValueError(f"--stain-reference {path}: holds no colour reference (made with normalize.stain none)")
    return reference


def _cmd_normalize(args: argparse.Namespace, params: Params) -> None:
    from pipeline.normalize import run_normalize

    reference = _stain_reference(args.stain_reference) if args.stain_reference else None
    summary = run_normalize(args.manifest, Path(params.data.root), args.out, params.normalize,
                            progress=not args.quiet, workers=params.runtime.normalize_workers,
                            um_per_px={s.site: s.um_per_px for s in params.data.resolved_sources()},
                            stain_reference=reference)
    print(f"normalize: {summary['images']} images to {summary['size']}px ({summary['mode']}) in "
          f"{summary['seconds']:.1f}s = {summary['images_per_second']:.0f} img/s on {summary['workers']} "
          f"worker(s), {summary['images_per_second_per_worker']:.0f} img/s per worker")
    if params.normalize.framing != "none":
        per_site = "  ".join(f"{site}={n}" for site, n in summary["rejected"].items()) or "none"
        print(f"  framing {params.normalize.framing} found no cell in {sum(summary['rejected'].values())} image(s), "
              f"per site: {per_site} (listed in {args.out / REJECTED_FILE})")


def _cmd_augment(args: argparse.Namespace, params: Params) -> None:
    from pipeline.augment import run_augment

    run_augment(args.processed, params.augment, args.policy, args.preview)
    print(f"augment: policy written to {args.policy}, preview to {args.preview}")


def _cmd_train(args: argparse.Namespace, params: Params) -> None:
    from pipeline.train import run_train

    result = run_train(params, args.processed, args.policy, args.models, args.reports,
                       ingest_summary=args.interim / INGEST_SUMMARY_FILE, progress=not args.quiet)
    if result.get("run_id"):
        print(f"train: best val macro-F1 {result['best_val_macro_f1']:.4f} at epoch {result['best_epoch']} "
              f"(MLflow run {result['run_id']})")


def _cmd_predict(args: argparse.Namespace, params: Params) -> None:
    from pipeline.predict import run_predict

    json_out = None if args.json is None else Path(args.json) if args.json else args.out.with_suffix(".json")
    summary = run_predict(params, args.inputs, args.model, args.out, json_out, progress=not args.quiet)
    reasons = ", ".join(f"{reason}={n}" for reason, n in summary["rejected_by_reason"].items())
    print(f"predict: {summary['rows']} rows, {summary['ok']} classified, {summary['rejected']} rejected"
          + (f" ({reasons})" if reasons else "")
          + f", {summary['uncertain']} uncertain (top probability < {summary['threshold']}); "
          f"{summary['images_per_second']} images/s on {summary['device']}")
    if not summary["calibrated"]:
        print(f"  note: {args.model} has no fitted temperature; probabilities are not calibrated (retrain to fit one)")
    print(f"  wrote {summary['csv']}" + (f" and {summary['json']}" if "json" in summary else ""))


def _cmd_export(args: argparse.Namespace, params: Params) -> None:
    from pipeline.export import FORMATS, run_export

    formats = FORMATS if args.format == "both" else (args.format,)
    result = run_export(args.model, args.out, formats, parity_images=args.images or None)
    for entry in result["exports"].values():
        print(f"export: {args.out / entry['file']}: max abs diff vs PyTorch on {result['images']} images: "
              f"logits {entry['max_abs_diff_logits']:.2e}, probabilities {entry['max_abs_diff_probabilities']:.2e} "
              f"(tolerance {result['tolerance']:g})")
    print(f"  classes, image size, temperature, normalize params and parity in {result['meta_file']}")


def _cmd_evaluate(args: argparse.Namespace, params: Params) -> None:
    unused = [flag for flag, value in (("--name", args.name), ("--split", args.split != "all"), ("--map", args.map),
                                       ("--adapt-bn", args.adapt_bn)) if value]
    if unused and args.dataset is None:
        raise UsageError(f"{', '.join(unused)} only apply with --dataset DIR (external validation)")
    from pipeline.evaluator import METRICS_FILE, REPORT_HTML

    if args.dataset is not None:
        from pipeline.external import ADAPTED_SUFFIX, parse_map, run_external_evaluate, safe_name

        metrics = run_external_evaluate(params, args.models, args.dataset, args.reports, name=args.name,
                                        split=args.split, label_map=parse_map(args.map), adapt_bn=args.adapt_bn)
        name = safe_name(args.name or args.dataset.resolve().name) + (ADAPTED_SUFFIX if args.adapt_bn else "")
        out = args.reports / "external" / name
        print(f"external validation: {metrics_summary(metrics)}\n  wrote {out / METRICS_FILE} and {out / REPORT_HTML}")
        return
    from pipeline.evaluate import run_evaluate

    metrics = run_evaluate(params, args.models, args.processed, args.interim, args.reports)
    print(f"evaluate (test split): {metrics_summary(metrics)}\n"
          f"  wrote {args.reports / METRICS_FILE} and {args.reports / REPORT_HTML}")


def metrics_summary(metrics: dict[str, float]) -> str:
    """One line of headline metrics: macro F1, balanced accuracy, accuracy, image count, weakest class."""
    from pipeline.metrics import METRICS

    short = {metric.key: metric.short for metric in METRICS}
    parts = [f"{short[key]} {metrics[key]:.4f}" for key in ("macro_f1", "balanced_accuracy", "accuracy")
             if key in metrics]
    line = ", ".join(parts) + (f" on {int(metrics['n'])} images" if "n" in metrics else "")
    recalls = {key.removeprefix("recall/"): value for key, value in metrics.items()
               if key.startswith("recall/") and value == value}  # NaN: a class with no image
    if recalls:
        weakest = min(recalls, key=recalls.__getitem__)
        line += f"; lowest {short['recall']}: {weakest} {recalls[weakest]:.4f}"
    return line


def _cmd_crosssite(args: argparse.Namespace, params: Params) -> None:
    from pipeline.crosssite import REPORT_FILE, run_crosssite

    metrics = run_crosssite(params, args.processed, args.policy, args.out, progress=not args.quiet)
    if "worst_out_of_site_macro_f1" in metrics:
        print(f"crosssite: {int(metrics['sites'])} sites left out in turn; out-of-site macro F1 worst "
              f"{metrics['worst_out_of_site_macro_f1']:.4f}, mean {metrics['mean_out_of_site_macro_f1']:.4f}")
    else:
        print("crosssite: one site only, nothing to leave out")
    print(f"  wrote {args.out / REPORT_FILE}")


def _cmd_adapt(args: argparse.Namespace, params: Params) -> None:
    from pipeline.adapt import run_adapt
    from pipeline.external import parse_map

    shots = args.shots or params.adapt.shots
    metrics = run_adapt(params, args.models, args.dataset, shots, name=args.name, label_map=parse_map(args.map),
                        models_root=args.out_models, reports_root=args.out_reports, progress=not args.quiet)
    print(f"adapt ({shots} per class): {metrics_summary(metrics)}\n  adapted model in {args.out_models}, "
          f"report in {args.out_reports}")


def _cmd_compare(args: argparse.Namespace, params: Params) -> None:
    from pipeline.compare import run_compare

    table = run_compare(args.experiment or params.tracking.experiment, args.reports)
    print(f"compare: {len(table)} runs of experiment {args.experiment or params.tracking.experiment!r} → "
          f"{args.reports / 'compare.csv'}, compare.md, compare.png")


def _cmd_promote(args: argparse.Namespace, params: Params) -> None:
    from pipeline.promote import run_promote

    result = run_promote(params, args.model_version)
    was = f"version {result['previous']}" if result["previous"] else "unset"
    print(f"promote: {result['name']} version {result['version']} is now champion (was {was}); "
          f"test data {result['dataset']}")
    for line in result["gates"]:
        print(f"  {line}")


def _cmd_fetch(args: argparse.Namespace, params: Params) -> None:
    from pipeline.fetch import run_fetch

    record = run_fetch(args.dataset, dest=args.dest, force=args.force, progress=not args.quiet)
    print(f"fetch: {record['title']}\n  images in {record['unpacked']['data_root']} "
          f"(set data.root to it in params.yaml)\n  licence {record['licence']}; cite: {record['citation']}")


def _common_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """``--params`` and ``-q`` on the top parser and again on each sub-command, so that they go before
    or after it. A sub-command's copy only sets them when given (SUPPRESS), never undoing the top's."""
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS if top else argparse.SUPPRESS,
                        help=f"params file (default: {DEFAULT_PARAMS})")
    parser.add_argument("-q", "--quiet", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="print nothing but errors: no progress bars, summaries or warnings")


def _path(parser: argparse.ArgumentParser, flag: str, default: Path, what: str) -> None:
    parser.add_argument(flag, type=Path, default=default, metavar=flag.removeprefix("--").upper(),
                        help=f"{what} (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the wbc command line."""
    parser = argparse.ArgumentParser(prog="wbc", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    _common_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG)
        p.set_defaults(handler=handler)
        _common_options(p, top=False)
        return p

    _data_commands(command)
    _model_commands(command)
    _evaluation_commands(command)
    return parser


def _data_commands(command: Callable[[str, Callable, str], argparse.ArgumentParser]) -> None:
    """Sub-commands that bring data in: fetch, sample and the data stages."""
    from pipeline.fetch import DATASETS

    p = command("fetch", _cmd_fetch, f"download a public dataset (checksummed, resumable) into {RAW}")
    p.add_argument("dataset", choices=list(DATASETS), help="dataset to download: %(choices)s")
    _path(p, "--dest", RAW, "folder the dataset is downloaded and unpacked into")
    p.add_argument("--force", action="store_true", help="download and unpack again even if present")

    p = command("sample", _cmd_sample, "generate the synthetic blood-smear sample")
    _path(p, "--out", SAMPLE_DIR, "folder of the generated images")

    p = command("ingest", _cmd_ingest, "validate, hash and split the raw images into a manifest")
    _path(p, "--out", INTERIM, f"folder of {MANIFEST_FILE}, {REJECTED_FILE} and {INGEST_SUMMARY_FILE}")
    _path(p, "--reports", REPORTS, "folder of the readable ingest report")

    p = command("normalize", _cmd_normalize, "resize every kept image to a square RGB array for training")
    _path(p, "--manifest", INTERIM / MANIFEST_FILE, "manifest written by wbc ingest")
    _path(p, "--out", PROCESSED,
          f"folder of {IMAGES_FILE}, {INDEX_FILE}, {REJECTED_FILE} and {NORMALIZE_SUMMARY_FILE}")
    p.add_argument("--stain-reference", type=Path, default=None, metavar="MODEL_OR_FOLDER",
                   help="standardise colour to the reference of a trained model (models/model.pt) or of another "
                   "processed folder instead of fitting one (another dataset is then normalized exactly like "
                   "the model's training data); normalize.stain must name its method (default: fit one)")

    p = command("augment", _cmd_augment, "build, save and preview the augmentation policy")
    _path(p, "--processed", PROCESSED, "normalized images (output of wbc normalize)")
    _path(p, "--policy", POLICY, "where the serialised policy is written")
    _path(p, "--preview", REPORTS / AUGMENT_PREVIEW_FILE, "preview grid of augmented images")


def _model_commands(command: Callable[[str, Callable, str], argparse.ArgumentParser]) -> None:
    """Sub-commands that make and use a model: train, predict, export."""
    p = command("train", _cmd_train, "train the classifier (resumes an interrupted run)")
    _path(p, "--processed", PROCESSED, "normalized images (output of wbc normalize)")
    _path(p, "--interim", INTERIM, "ingest outputs (its summary is logged with the run)")
    _path(p, "--policy", POLICY, "augmentation policy (output of wbc augment)")
    _path(p, "--models", MODELS, "folder of the trained model and its run record")
    _path(p, "--reports", REPORTS, "folder of the training history")

    p = command("predict", _cmd_predict, "classify new images: files, folders (recursive) or manifest CSVs")
    p.add_argument("inputs", nargs="+", type=Path, metavar="PATH",
                   help="image file, folder, or CSV with a 'path' column (paths relative to the CSV)")
    _path(p, "--model", MODELS / MODEL_FILE, "trained model")
    _path(p, "--out", REPORTS / "predictions_new.csv", "CSV of predictions, one row per input image")
    p.add_argument("--json", nargs="?", const="", metavar="FILE",
                   help="also write JSON to FILE (without FILE: the CSV's name with .json; default: no JSON)")

    p = command("export", _cmd_export, "export the trained model to ONNX and/or TorchScript, checked against PyTorch")
    _path(p, "--model", MODELS / MODEL_FILE, "trained model")
    p.add_argument("--format", choices=["onnx", "torchscript", "both"], default="both",
                   help="what to export: %(choices)s (default: %(default)s)")
    _path(p, "--out", MODELS / "export", "output folder")
    p.add_argument("--images", nargs="+", type=Path, metavar="IMAGE",
                   help="image files for the parity check (default: 8 random images)")


def _evaluation_commands(command: Callable[[str, Callable, str], argparse.ArgumentParser]) -> None:
    """Sub-commands that measure, compare and release models."""
    p = command("evaluate", _cmd_evaluate, "evaluate the trained model on the test split and write the report")
    _path(p, "--processed", PROCESSED, "normalized images (output of wbc normalize)")
    _path(p, "--interim", INTERIM, "ingest outputs (provenance of the data)")
    _path(p, "--models", MODELS, "folder of the trained model (output of wbc train)")
    _path(p, "--reports", REPORTS, "folder of metrics, tables, figures and report.html")
    p.add_argument("--dataset", type=Path, metavar="DIR",
                   help="external validation on another ingested + normalized dataset (DIR/interim, DIR/processed); "
                        "report in REPORTS/external/NAME/ (default: none, the test split)")
    p.add_argument("--name", help="name of the external dataset in reports and MLflow (default: DIR's name)")
    p.add_argument("--split", choices=["all", *SPLITS], default="all",
                   help="split of the external dataset to evaluate: %(choices)s (default: %(default)s)")
    p.add_argument("--adapt-bn", action="store_true",
                   help="with --dataset: recompute the network's BatchNorm statistics on the dataset's images "
                        "(no labels used) before evaluating; report in REPORTS/external/NAME-adapted-bn/ "
                        "(default: off)")
    p.add_argument("--map", action="append", default=[], metavar="LABEL=CLASS",
                   help="map an external label to a model class (repeatable); LABEL= marks it unknown to the model "
                        "(default: labels are matched to class names)")

    p = command("crosssite", _cmd_crosssite,
                "leave one site out: train on the other sites, score the site left out, for every site")
    _path(p, "--processed", PROCESSED, "normalized images of every site (output of wbc normalize)")
    _path(p, "--policy", POLICY, "augmentation policy (output of wbc augment)")
    _path(p, "--out", CROSS_SITE, "folder of the table, report, figure and metrics (replaced whole)")

    p = command("adapt", _cmd_adapt,
                "few-shot adaptation: fine-tune the model on K labelled images per class of a new site, score the rest")
    p.add_argument("--dataset", type=Path, required=True, metavar="DIR",
                   help="the new site, ingested and normalized (DIR/interim, DIR/processed) (required)")
    p.add_argument("--shots", type=int, metavar="K", help="labelled images per class (default: adapt.shots)")
    p.add_argument("--name", help="name of the site in reports, models and MLflow (default: DIR's name)")
    p.add_argument("--map", action="append", default=[], metavar="LABEL=CLASS",
                   help="map a label of the site to a model class (repeatable); LABEL= marks it unknown "
                        "(default: labels are matched to class names)")
    _path(p, "--models", MODELS, "folder of the trained model to adapt (output of wbc train)")
    _path(p, "--out-models", MODELS / "adapted", "where the adapted model goes (a folder per site and K)")
    _path(p, "--out-reports", REPORTS / "adapt", "where its evaluation report goes (a folder per site and K)")

    p = command("compare", _cmd_compare, "compare the runs of an MLflow experiment: table and bar plot in reports/")
    p.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment from params)")
    _path(p, "--reports", REPORTS, "folder of compare.csv, compare.md and compare.png")

    p = command("promote", _cmd_promote, "make the evaluated model (alias candidate) the champion when its test "
                "metrics pass the promote gates in params; exit status 1 with the failing numbers otherwise")
    p.add_argument("--model-version", metavar="N",
                   help="registered model version to promote (default: the one with alias candidate)")


def _mlflow_error() -> type[BaseException] | None:
    """MLflow's exception class when MLflow is loaded (an MLflow error cannot happen before that)."""
    module = sys.modules.get("mlflow.exceptions")
    return None if module is None else module.MlflowException


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The failures a user can cause or fix (params, data, files, memory, a missing package, MLflow);
    anything else is a bug and keeps its traceback."""
    mlflow_error = _mlflow_error()
    return (ParamsError, ValueError, RuntimeError, OSError, MemoryError, ImportError,
            *([mlflow_error] if mlflow_error else []))


def describe_failure(exc: BaseException, command: str) -> str:
    """One paragraph for stderr saying what failed and where (the file, key or store it concerns)."""
    text = str(exc).strip()
    mlflow_error = _mlflow_error()
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        what = f"{exc.strerror}: {exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    elif isinstance(exc, MemoryError):
        what = ("out of memory" + (f" ({text})" if text else "") + "; lower the workers or batch_size params, "
                "or look for oversized files in the data (ingest.max_file_bytes rejects them before reading)")
    elif isinstance(exc, ModuleNotFoundError):
        what = f"the Python package {exc.name!r} is not installed ({text}); install the project with its extras"
    elif mlflow_error is not None and isinstance(exc, mlflow_error):
        what = _mlflow_failure(getattr(exc, "message", text))
    else:
        what = text or type(exc).__name__
    lines = [line.rstrip() for line in what.splitlines() if line.strip()]  # one paragraph: no blank lines
    return f"wbc {command}: error: " + "\n".join(lines) + "\n(set WBC_DEBUG=1 for the full traceback)"


def _mlflow_failure(message: str) -> str:
    """An MLflow error message naming the tracking store, with any password in its URI hidden."""
    import mlflow

    from pipeline.tracking import redact_uri

    uri = mlflow.get_tracking_uri()
    return f"MLflow (tracking store {redact_uri(uri)}): {message.replace(uri, redact_uri(uri))}"


@contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """With ``enabled``: stdout, logging below ERROR and warnings silenced while the command runs."""
    if not enabled:
        yield
        return
    with open(os.devnull, "w", encoding="utf-8") as sink, redirect_stdout(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def _sub_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the wbc console script; returns the exit status (0 done, 1 failed, 2 wrong usage,
    130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(os.environ.get("WBC_DEBUG"))
    try:
        with _quiet(args.quiet):
            params = load_params(args.params)
            args.handler(args, params)
    except UsageError as exc:  # reported as argparse reports its own, but returned, not raised as SystemExit
        sub = _sub_parser(parser, args.command)
        sub.print_usage(sys.stderr)
        print(f"{sub.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"wbc {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug or not isinstance(exc, (ParamsError, *_expected_errors())):
            raise
        print(describe_failure(exc, args.command), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
