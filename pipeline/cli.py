"""The ``wbc`` command line: one sub-command per DVC stage, plus tools around them.

Every sub-command takes ``--params`` (default ``params.yaml``) and its input/output paths,
whose defaults come from :mod:`pipeline.layout` and are the ones ``dvc.yaml`` uses. Errors in
params or data end the command with a one-paragraph message and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Params, ParamsError, load_params
from pipeline.layout import (
    AUGMENT_PREVIEW_FILE,
    IMAGES_FILE,
    INDEX_FILE,
    INGEST_SUMMARY_FILE,
    INTERIM,
    MANIFEST_FILE,
    MODEL_FILE,
    MODELS,
    POLICY,
    PROCESSED,
    RAW,
    REJECTED_FILE,
    REPORTS,
    SAMPLE_DIR,
    SPLITS,
)


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


def _cmd_normalize(args: argparse.Namespace, params: Params) -> None:
    from pipeline.normalize import run_normalize

    summary = run_normalize(args.manifest, Path(params.data.root), args.out, params.normalize,
                            progress=not args.quiet)
    print(f"normalize: {summary['images']} images to {summary['size']}px ({summary['mode']}) in "
          f"{summary['seconds']:.1f}s = {summary['images_per_second']:.0f} img/s on {summary['workers']} "
          f"worker(s), {summary['images_per_second_per_worker']:.0f} img/s per worker")


def _cmd_augment(args: argparse.Namespace, params: Params) -> None:
    from pipeline.augment import run_augment

    run_augment(args.processed / IMAGES_FILE, args.processed / INDEX_FILE, params.augment, args.policy,
                args.preview)
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
    if args.dataset is not None:
        from pipeline.external import parse_map, run_external_evaluate, safe_name

        metrics = run_external_evaluate(params, args.models, args.dataset, args.reports, name=args.name,
                                        split=args.split, label_map=parse_map(args.map))
        name = safe_name(args.name or args.dataset.resolve().name)
        print(json.dumps(metrics, indent=2))
        print(f"external validation report: {args.reports / 'external' / name / 'report.html'}")
        return
    unused = [flag for flag, value in (("--name", args.name), ("--split", args.split != "all"), ("--map", args.map))
              if value]
    if unused:
        raise ValueError(f"{', '.join(unused)} only apply with --dataset DIR (external validation)")
    from pipeline.evaluate import run_evaluate

    metrics = run_evaluate(params, args.models, args.processed, args.interim, args.reports)
    print(json.dumps(metrics, indent=2))


def _cmd_compare(args: argparse.Namespace, params: Params) -> None:
    from pipeline.compare import run_compare

    table = run_compare(args.experiment or params.train.experiment, args.reports)
    print(f"compare: {len(table)} runs of experiment {args.experiment or params.train.experiment!r} → "
          f"{args.reports / 'compare.csv'}, compare.md, compare.png")


def _cmd_fetch(args: argparse.Namespace, params: Params) -> None:
    from pipeline.fetch import run_fetch

    record = run_fetch(args.dataset, dest=args.dest, force=args.force, progress=not args.quiet)
    print(f"fetch: {record['title']}\n  images in {record['unpacked']['data_root']} "
          f"(set data.root to it in params.yaml)\n  licence {record['licence']}; cite: {record['citation']}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``wbc``."""
    parser = argparse.ArgumentParser(prog="wbc", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    from pipeline.fetch import DATASETS

    p = command("fetch", _cmd_fetch, f"download a public dataset (checksummed, resumable) into {RAW}")
    p.add_argument("dataset", choices=list(DATASETS))
    p.add_argument("--dest", type=Path, default=RAW)
    p.add_argument("--force", action="store_true", help="download and unpack again even if present")

    p = command("sample", _cmd_sample, "generate the synthetic blood-smear sample")
    p.add_argument("--out", type=Path, default=SAMPLE_DIR)

    p = command("ingest", _cmd_ingest, "validate, hash and split the raw images into a manifest")
    p.add_argument("--out", type=Path, default=INTERIM)
    p.add_argument("--reports", type=Path, default=REPORTS)

    p = command("normalize", _cmd_normalize, "resize every kept image to a square RGB array for training")
    p.add_argument("--manifest", type=Path, default=INTERIM / MANIFEST_FILE)
    p.add_argument("--out", type=Path, default=PROCESSED)

    p = command("augment", _cmd_augment, "build, save and preview the augmentation policy")
    p.add_argument("--processed", type=Path, default=PROCESSED)
    p.add_argument("--policy", type=Path, default=POLICY)
    p.add_argument("--preview", type=Path, default=REPORTS / AUGMENT_PREVIEW_FILE)

    p = command("train", _cmd_train, "train the classifier (resumes an interrupted run)")
    p.add_argument("--processed", type=Path, default=PROCESSED)
    p.add_argument("--interim", type=Path, default=INTERIM)
    p.add_argument("--policy", type=Path, default=POLICY)
    p.add_argument("--models", type=Path, default=MODELS)
    p.add_argument("--reports", type=Path, default=REPORTS)

    p = command("predict", _cmd_predict, "classify new images: files, folders (recursive) or manifest CSVs")
    p.add_argument("inputs", nargs="+", type=Path, metavar="PATH",
                   help="image file, folder, or CSV with a 'path' column (paths relative to the CSV)")
    p.add_argument("--model", type=Path, default=MODELS / MODEL_FILE, help="trained model (default: %(default)s)")
    p.add_argument("--out", type=Path, default=REPORTS / "predictions_new.csv", help="CSV (default: %(default)s)")
    p.add_argument("--json", nargs="?", const="", metavar="FILE",
                   help="also write JSON (default file: the CSV's name with .json)")

    p = command("export", _cmd_export, "export the trained model to ONNX and/or TorchScript, checked against PyTorch")
    p.add_argument("--model", type=Path, default=MODELS / MODEL_FILE, help="trained model (default: %(default)s)")
    p.add_argument("--format", choices=["onnx", "torchscript", "both"], default="both")
    p.add_argument("--out", type=Path, default=MODELS / "export", help="output folder (default: %(default)s)")
    p.add_argument("--images", nargs="+", type=Path, metavar="IMAGE",
                   help="image files for the parity check (default: 8 random images)")

    p = command("evaluate", _cmd_evaluate, "evaluate the trained model on the test split and write the report")
    p.add_argument("--processed", type=Path, default=PROCESSED)
    p.add_argument("--interim", type=Path, default=INTERIM)
    p.add_argument("--models", type=Path, default=MODELS)
    p.add_argument("--reports", type=Path, default=REPORTS)
    p.add_argument("--dataset", type=Path, metavar="DIR",
                   help="external validation on another ingested + normalized dataset (DIR/interim, DIR/processed); "
                        "report in REPORTS/external/NAME/")
    p.add_argument("--name", help="name of the external dataset in reports and MLflow (default: DIR's name)")
    p.add_argument("--split", choices=["all", *SPLITS], default="all",
                   help="split of the external dataset to evaluate (default: %(default)s)")
    p.add_argument("--map", action="append", default=[], metavar="LABEL=CLASS",
                   help="map an external label to a model class (repeatable); LABEL= marks it unknown to the model")

    p = command("compare", _cmd_compare, "compare the runs of an MLflow experiment: table and bar plot in reports/")
    p.add_argument("--experiment", help="MLflow experiment (default: train.experiment from params)")
    p.add_argument("--reports", type=Path, default=REPORTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``wbc`` console script."""
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params)
        args.handler(args, params)
    except (ParamsError, FileNotFoundError, ValueError, RuntimeError) as exc:
        if os.environ.get("WBC_DEBUG"):
            raise
        print(f"wbc {args.command}: error: {exc}", file=sys.stderr)
        print("(set WBC_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
