"""``wbc compare``: the runs of one MLflow experiment side by side.

Reads every run of the experiment from the tracking store (:func:`pipeline.tracking.tracking_uri`)
and writes ``compare.csv`` (one row per run), ``compare.md`` (the same as a Markdown table) and
``compare.png`` (test macro F1, balanced accuracy and ECE per evaluated run) into the reports folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.calibration import CALIBRATION_LABELS
from pipeline.figures import new_figure, save_figure
from pipeline.metrics import EXTERNAL_PREFIX, TEST_PREFIX, calibration_key, metric

# Metrics (keys of pipeline.metrics.METRICS) shown per run: in the table, in the plot, and of each
# external validation (logged by `wbc evaluate --dataset` as ext_<name>_<key>).
TABLE_METRICS = ("macro_f1", "balanced_accuracy", "accuracy", "ece")
PLOTTED_METRICS = ("macro_f1", "balanced_accuracy", "ece")
EXTERNAL_METRICS = ("macro_f1", "balanced_accuracy")
RANKED_BY = TEST_PREFIX + "macro_f1"


def _test_column(key: str) -> tuple[str, str, str]:
    return TEST_PREFIX + key, f"metrics.{TEST_PREFIX}{key}", f"Test {metric(key).short}"


# (column in the table, MLflow column, heading in Markdown)
COLUMNS = (
    ("run_name", "tags.mlflow.runName", "Run"),
    ("run_id", "run_id", "Run id"),
    ("status", "status", "Status"),
    ("start_time", "start_time", "Started (UTC)"),
    ("model", "params.train.model", "Model"),
    ("pretrained", "params.train.pretrained", "Pretrained"),
    ("image_size", "params.train.image_size", "Image size"),
    ("epochs", "params.train.epochs", "Epochs"),
    ("best_val_macro_f1", "metrics.best_val_macro_f1", "Best val macro F1"),
    (TEST_PREFIX + "n", f"metrics.{TEST_PREFIX}n", "Test images"),
    *(_test_column(key) for key in TABLE_METRICS),
    (TEST_PREFIX + "ece_calibrated", f"metrics.{TEST_PREFIX}{calibration_key('ece_calibrated')}",
     f"Test {CALIBRATION_LABELS['ece_calibrated']}"),
    ("dvc_experiment", "tags.dvc.exp_name", "DVC experiment"),
    ("git_commit", "tags.git.commit", "Git commit"),
)
# Plotted per run: (table column, legend: the short name and ↑ for higher-better, ↓ for lower-better).
PLOTTED = tuple((TEST_PREFIX + key, f"{metric(key).short} {'↑' if metric(key).higher_is_better else '↓'}")
                for key in PLOTTED_METRICS)


def _store_check(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        if not database.is_file():
            raise FileNotFoundError(f"no MLflow store at {database}; train a model first (`wbc train` or `dvc repro`) "
                                    "or set MLFLOW_TRACKING_URI")


def load_runs(experiment: str, uri: str | None = None) -> pd.DataFrame:
    """Every run of ``experiment`` as one row per run with the :data:`COLUMNS` (and external metrics)."""
    uri = uri or tracking.tracking_uri()
    _store_check(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no MLflow experiment named {experiment!r} in {uri}; experiments there: "
                         f"{', '.join(names) or 'none'}")
    runs = mlflow.search_runs(experiment_ids=[found.experiment_id], output_format="pandas")
    if runs.empty:
        raise ValueError(f"MLflow experiment {experiment!r} in {uri} has no runs")
    table = pd.DataFrame({name: runs.get(source, np.nan) for name, source, _ in COLUMNS})
    for column in ("image_size", "epochs", TEST_PREFIX + "n"):  # counts, whatever MLflow stored them as
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
    table["start_time"] = pd.to_datetime(table["start_time"], utc=True).dt.strftime("%Y-%m-%d %H:%M")
    for column in runs.columns:
        if column.startswith(f"metrics.{EXTERNAL_PREFIX}") and column.endswith(EXTERNAL_METRICS):
            table[column.removeprefix("metrics.")] = runs[column]
    table = table.sort_values([RANKED_BY, "start_time"], ascending=[False, False], na_position="last")
    return table.reset_index(drop=True)


def _cell(value: object) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def compare_markdown(table: pd.DataFrame, experiment: str, uri: str) -> str:
    """The comparison as a Markdown page."""
    headings = {name: heading for name, _, heading in COLUMNS}
    columns = [c for c in table.columns if c not in ("run_id", "git_commit")]
    lines = [
        f"# Runs of MLflow experiment {_cell(experiment)}",
        "",
        f"{len(table)} runs from {_cell(uri)}, best test macro F1 first. Test metrics are on each run's own "
        "test split; runs without them were not evaluated. `ext_<name>_*` columns are external validations "
        "(`wbc evaluate --dataset`).",
        "",
        "| " + " | ".join(headings.get(c, c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for _, row in table.iterrows()]
    lines += ["", "Run ids: " + ", ".join(f"{_cell(r)} `{r_id}`" for r, r_id in zip(table["run_name"],
                                                                                   table["run_id"], strict=True))]
    return "\n".join(lines) + "\n"


def _run_label(row: pd.Series) -> str:
    size = row["image_size"]
    return f"{_cell(row['run_name'])}\n{_cell(row['model'])}, {_cell(row['pretrained'])}, {_cell(size)} px"


def plot_compare(table: pd.DataFrame, path: Path, experiment: str) -> Path:
    """Grouped horizontal bars of the :data:`PLOTTED` test metrics, one group per evaluated run."""
    evaluated = table.dropna(subset=[column for column, _ in PLOTTED], how="all")
    fig = new_figure(9.0, max(2.6, 0.75 * len(evaluated) + 1.6))
    ax = fig.add_subplot()
    if evaluated.empty:
        ax.text(0.5, 0.5, "No run of this experiment has test metrics yet (run `wbc evaluate`)",
                ha="center", va="center")
        ax.set_axis_off()
    else:
        positions = np.arange(len(evaluated))
        height = 0.8 / len(PLOTTED)
        colors = ("#1f5fae", "#2ca02c", "#d62728")
        for i, ((column, label), color) in enumerate(zip(PLOTTED, colors, strict=True)):
            values = evaluated[column].to_numpy(dtype=float)
            bars = ax.barh(positions + (i - 1) * height, np.nan_to_num(values), height=height, color=color,
                           label=label)
            ax.bar_label(bars, labels=["—" if np.isnan(v) else f"{v:.3f}" for v in values], padding=2, fontsize=7)
        ax.set_yticks(positions, labels=[_run_label(row) for _, row in evaluated.iterrows()], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.1)
        ax.set_xlabel("Test split score")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    skipped = len(table) - len(evaluated)
    ax.set_title(f"Test metrics per run, MLflow experiment {experiment}"
                 + (f"\n({skipped} run(s) without test metrics not shown)" if skipped else ""), fontsize=10)
    return save_figure(fig, path)


def run_compare(experiment: str, reports_dir: Path, uri: str | None = None) -> pd.DataFrame:
    """Write ``compare.csv``, ``compare.md`` and ``compare.png`` for ``experiment``; return the table."""
    uri = uri or tracking.tracking_uri()
    table = load_runs(experiment, uri)
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(reports_dir / "compare.csv", index=False)
    (reports_dir / "compare.md").write_text(compare_markdown(table, experiment, uri), encoding="utf-8")
    plot_compare(table, reports_dir / "compare.png", experiment)
    return table
