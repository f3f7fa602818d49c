"""Cross-site benchmark: how models hold up in labs they were not trained in.

Four sites from ``../shared/data``: Barcelona (``pbc/``, subsampled per class), Jiangxi and the
CellaVision blog (``wbc-seg/Dataset 1`` and ``Dataset 2``, label tables, codes 1-5) and Tehran
(``lisc/``). For each method (a set of params) and each site held out, a model is trained on the
other sites with the train stage's recipe and scored on every image of the held-out site, over the
classes that site shares with training; few-shot rows then fine-tune that model on K labelled
images per class of the held-out site (whole groups, seeded) and score the rest. ``--train-only``
trains once on the named site(s) and scores every other site (e.g. PBC-only training).

Prints one table: rows = method, columns = held-out site, values = macro-F1 and accuracy with
their 95% bootstrap intervals. Every run is on CPU unless a GPU is present; it takes hours at full
size, so PBC is subsampled (``--pbc-per-class``) and training is short by default.

    python benchmarks/cross_site.py ../shared/data --out /tmp/cross-site --pbc-per-class 120 \\
        --image-size 96 --epochs 8 --methods defaults stain shift all --shots 5 10 25
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from pathlib import Path

import pandas as pd

from pipeline.adapt import choose_shots, fine_tune
from pipeline.augment import build_policy
from pipeline.config import PBC_CLASSES, Params, parse_params
from pipeline.crosssite import Fold, fold_model, score_columns, site_rows
from pipeline.data import load_index
from pipeline.evaluator import Images, evaluation_of, images_of_rows, predict_images, with_adapted_batchnorm
from pipeline.inference import pick_device
from pipeline.ingest import run_ingest
from pipeline.normalize import run_normalize

SITES = {
    "barcelona": {"root": "pbc"},
    "jiangxi": {"root": "wbc-seg", "source": "table", "label_map": {str(i + 1): c for i, c in enumerate(
        ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"])},
        "tables": [{"file": "Class Labels of Dataset 1.csv", "images": "Dataset 1", "path_pattern": "{id:03d}.bmp"}]},
    "cellavision": {"root": "wbc-seg", "source": "table", "label_map": {str(i + 1): c for i, c in enumerate(
        ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"])},
        "tables": [{"file": "Class Labels of Dataset 2.csv", "images": "Dataset 2", "path_pattern": "{id:03d}.bmp"}]},
    "tehran": {"root": "lisc"},
}
SHIFT_AUGMENTATION = {"stain": 0.5, "hsv": 0.5, "illuminant": 0.3, "gamma": 0.3, "grayscale": 0.1, "zoom": 0.5,
                      "downscale": 0.2}
METHODS = {
    "defaults": {},
    "stain": {"normalize": {"stain": "reinhard"}},
    "framing": {"normalize": {"framing": "nucleus"}},
    "shift": {"augment": SHIFT_AUGMENTATION},
    "all": {"normalize": {"stain": "reinhard", "framing": "nucleus"}, "augment": SHIFT_AUGMENTATION},
}
BN_ROW = "+ BN adaptation"


def link_data(data: Path, out: Path, pbc_per_class: int, seed: int) -> Path:
    """A raw folder under ``out`` with a seeded subsample of PBC (symlinks) and the other sites linked whole."""
    raw = out / "raw"
    if raw.exists():
        return raw
    rng = random.Random(seed)
    for folder in sorted((data / "pbc").iterdir()):
        if not folder.is_dir():
            continue
        files = sorted(folder.iterdir())
        chosen = files if pbc_per_class <= 0 else rng.sample(files, min(pbc_per_class, len(files)))
        (raw / "pbc" / folder.name).mkdir(parents=True)
        for file in chosen:
            (raw / "pbc" / folder.name / file.name).symlink_to(file.resolve())
    for name in ("wbc-seg", "lisc"):
        (raw / name).symlink_to((data / name).resolve())
    return raw


def method_params(raw: Path, method: dict, args: argparse.Namespace) -> Params:
    """The params of one method: the four sites as sources, the short schedule, the method's overrides."""
    raw_params = {
        "data": {"root": str(raw), "classes": list(PBC_CLASSES), "allow_outside_root": True,
                 "sources": [{"site": site, **source} for site, source in SITES.items()]},
        "ingest": {"near_dup_threshold": 44, "recrop_threshold": 44},  # LISC: ~250 cells in 1,287 crops
        "normalize": {"size": max(args.image_size, 128)},
        "train": {"model": args.model, "image_size": args.image_size, "epochs": args.epochs,
                  "batch_size": args.batch_size},
        "evaluate": {"n_bootstrap": args.bootstrap},
        "adapt": {"epochs": args.adapt_epochs},
        "runtime": {"train_workers": args.workers},
        "tracking": {"log_model": False, "registered_model": None},
    }
    for section, values in method.items():
        raw_params.setdefault(section, {}).update(values)
    return parse_params(raw_params, source="cross-site benchmark")


def fitted_on_sites(params: Params) -> bool:
    """Whether normalize fits something on the training sites' images (a colour reference)."""
    return params.normalize.stain != "none"


def ingested(params: Params, out: Path, suffix: str = "") -> Path:
    """Ingest once into ``out/interim<suffix>``; that folder."""
    interim = out / f"interim{suffix}"
    if not (interim / "manifest.csv").is_file():
        run_ingest(params, interim, out / f"reports{suffix}", progress=False)
    return interim


def prepared(params: Params, out: Path, key: str, held_out: list[str] | None = None) -> Path:
    """Ingest (once per set of held-out sites) and normalize (once per normalize params and held-out sites)
    into ``out``; the processed folder. ``held_out`` sites are ``ingest.holdout_sites``, so a colour
    reference is fitted on the other sites' training images only: the sites scored stay unseen."""
    if held_out:
        params = params.model_copy(update={"ingest": params.ingest.model_copy(update={"holdout_sites": held_out})})
    suffix = f"-without-{'+'.join(held_out)}" if held_out else ""
    if list(params.data.classes) != list(PBC_CLASSES):
        suffix += "-classes-" + hashlib.sha256(" ".join(params.data.classes).encode()).hexdigest()[:8]
    interim = ingested(params, out, suffix)
    processed = out / f"processed-{key}{suffix}"
    if not (processed / "index.csv").is_file():
        run_normalize(interim / "manifest.csv", Path(params.data.root), processed, params.normalize, progress=False)
    return processed


def cell(record: dict, prefix: str) -> str:
    """'F1 0.812 (0.78-0.84) / acc 0.83 (0.80-0.86)' or '—'."""
    if record.get(f"{prefix}_macro_f1") is None or pd.isna(record.get(f"{prefix}_macro_f1")):
        return "—"
    return (f"F1 {record[f'{prefix}_macro_f1']:.3f} ({record[f'{prefix}_macro_f1_ci_low']:.2f}-"
            f"{record[f'{prefix}_macro_f1_ci_high']:.2f}) / acc {record[f'{prefix}_accuracy']:.3f} "
            f"({record[f'{prefix}_accuracy_ci_low']:.2f}-{record[f'{prefix}_accuracy_ci_high']:.2f})")


def few_shot(model, processed: Path, index: pd.DataFrame, site: str, params: Params, shots: int) -> dict:
    """Fine-tune on ``shots`` per class of ``site`` (whole groups, seeded) and score the rest."""
    rows = site_rows(index, site, None)
    images = images_of_rows(processed, rows, model.classes)
    groups = [g if isinstance(g, str) and g else f"row{r}" for g, r in zip(index.iloc[rows]["group"], rows,
                                                                             strict=True)]
    chosen = choose_shots(images, groups, model.classes, shots, params.adapt.seed)
    adapted = fine_tune(model, images, chosen, params, progress="")
    rest = Images(processed, images.rows[chosen.evaluate], [images.paths[i] for i in chosen.evaluate],
                  images.y[chosen.evaluate])
    logits = predict_images(adapted, rest, params.evaluate.batch_size)
    evaluation = evaluation_of(adapted, rest, logits, params.evaluate, present_classes_only=True)
    overall = evaluation.metrics["overall"]
    record = {"out_of_site_n": len(rest.rows), "shots_taken": len(chosen.train)}
    for key in ("macro_f1", "accuracy"):
        record.update({f"out_of_site_{key}": overall[key]["value"], f"out_of_site_{key}_ci_low": overall[key]["ci_low"],
                       f"out_of_site_{key}_ci_high": overall[key]["ci_high"]})
    return record


def run(args: argparse.Namespace) -> pd.DataFrame:
    out = Path(args.out)
    raw = link_data(Path(args.data), out, args.pbc_per_class, args.seed)
    device = pick_device("auto")
    done = out / "cross_site.csv"
    records = pd.read_csv(done).to_dict("records") if args.resume and done.is_file() else []
    finished = {(r["method"], r["held_out"]) for r in records}
    for name in args.methods:
        params = method_params(raw, METHODS[name], args)
        key = hashlib.sha256(json.dumps(params.normalize.model_dump(mode="json"), sort_keys=True).encode())
        key = key.hexdigest()[:16]
        refit = fitted_on_sites(params)
        shared = None if refit else prepared(params, out, key)
        index = None if refit else load_index(shared)
        policy = build_policy(params.augment)
        manifest = pd.read_csv(ingested(params, out) / "manifest.csv")
        sites = list(dict.fromkeys(manifest["site"]))
        plans = ([Fold(site, tuple(args.train_only)) for site in sites if site not in args.train_only]
                 if args.train_only else [Fold(site, tuple(s for s in sites if s != site)) for site in sites])
        cache: dict[tuple[str, ...], object] = {}
        for fold in plans:
            if (args.held_out and fold.left_out not in args.held_out) or (name, fold.left_out) in finished:
                continue
            started = time.perf_counter()
            processed = shared
            # Scores cover the classes the scored site shares with training: a class no training site has
            # is left out of data.classes (its images listed as unknown-class, not scored)
            known = set(manifest.loc[manifest["site"].isin(fold.trained_on), "label"])
            fold_params = params.model_copy(update={"data": params.data.model_copy(
                update={"classes": [c for c in params.data.classes if c in known]})})
            if refit or len(known) < len(params.data.classes):  # a colour reference must not see the sites
                # the model is scored on: ingest and normalize with them held out
                processed = prepared(fold_params, out, key, [s for s in sites if s not in fold.trained_on])
                index = load_index(processed)
            model = cache.get(fold.trained_on) or fold_model(fold, fold_params, processed, index, policy, device,
                                                               progress=args.verbose)
            cache[fold.trained_on] = model
            target = site_rows(index, fold.left_out, None)
            base = {"method": name, "held_out": fold.left_out, "trained_on": " ".join(fold.trained_on)}
            records.append({**base, **score_columns("out_of_site", model, processed, target, fold_params),
                            **score_columns("in_site", model, processed, site_rows(index, fold.trained_on, "test"),
                                            fold_params)})
            if name in args.bn_for:
                adapted = with_adapted_batchnorm(model, images_of_rows(processed, target, model.classes),
                                                 fold_params.evaluate.batch_size)
                records.append({**base, "method": f"{name} {BN_ROW}",
                                **score_columns("out_of_site", adapted, processed, target, fold_params)})
            if name == args.few_shot_from:
                for shots in args.shots:
                    records.append({**base, "method": f"{name} + few-shot K={shots}",
                                    **few_shot(model, processed, index, fold.left_out, params, shots)})
            print(f"{name}: held out {fold.left_out} done in {time.perf_counter() - started:.0f}s", flush=True)
            pd.DataFrame(records).to_csv(out / "cross_site.csv", index=False)
    return pd.DataFrame(records)


def table(records: pd.DataFrame) -> str:
    """Markdown: rows = method, columns = held-out site."""
    sites = list(dict.fromkeys(records["held_out"]))
    lines = ["| method | " + " | ".join(f"{s} held out" for s in sites) + " |", "|---|" + "---|" * len(sites)]
    for method in dict.fromkeys(records["method"]):
        part = records[records["method"] == method].set_index("held_out")
        lines.append(f"| {method} | " + " | ".join(cell(part.loc[s].to_dict(), "out_of_site") if s in part.index
                                                   else "—" for s in sites) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="folder with pbc/, wbc-seg/ and lisc/")
    parser.add_argument("--out", type=Path, default=Path("/tmp/wbc-cross-site"), help="work folder (cached)")
    parser.add_argument("--methods", nargs="+", default=["defaults", "stain", "framing", "shift", "all"],
                        choices=list(METHODS))
    parser.add_argument("--bn-for", nargs="*", default=["defaults", "all"], help="methods also scored after AdaBN")
    parser.add_argument("--few-shot-from", default="all", help="the method whose fold models are fine-tuned")
    parser.add_argument("--shots", nargs="*", type=int, default=[5, 10, 25])
    parser.add_argument("--resume", action="store_true", help="keep the rows of --out's table, run only the rest")
    parser.add_argument("--held-out", nargs="*", default=[], help="only the folds leaving out these sites")
    parser.add_argument("--train-only", nargs="*", default=[], help="train once on these sites, score the others")
    parser.add_argument("--pbc-per-class", type=int, default=120, help="PBC images per class (0 = all)")
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--adapt-epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    records = run(args)
    text = table(records)
    (Path(args.out) / "cross_site.md").write_text(text + "\n", encoding="utf-8")
    print(f"\n{text}\n\n{len(records)} rows in {time.perf_counter() - started:.0f}s; "
          f"PBC {args.pbc_per_class or 'all'} per class, {args.model} at {args.image_size}px, {args.epochs} epochs")


if __name__ == "__main__":
    main()
