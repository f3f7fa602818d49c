"""Evaluation figures: confusion matrices, ROC and precision-recall curves, the reliability
diagram, training curves, the most confused pairs and what the model made of unknown classes.

Drawn with matplotlib's object API on the Agg canvas, so importing this module changes no global
matplotlib state. Only evaluation and reporting import it: prediction and the served model never do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn import metrics as skm

from pipeline.calibration import ECE_BINS, check_predictions, confidence_bin, expected_calibration_error
from pipeline.metrics import most_confused_pairs, safe_divide

DPI = 110


def figure_path(out_dir: Path, key: str) -> Path:
    """Where the figure ``key`` is written: ``<out_dir>/<key>.png`` (the report captions figures by key)."""
    return Path(out_dir) / f"{key}.png"


def new_figure(width: float, height: float) -> Figure:
    """An empty figure of ``width`` x ``height`` inches on its own Agg canvas (no pyplot state)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at :data:`DPI` on white, creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", facecolor="white")
    return path


def class_colors(k: int) -> list:
    """One distinct colour per class, the same in every figure."""
    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]] | np.ndarray,
    classes: Sequence[str],
    path: Path,
    *,
    normalize: bool = False,
    title: str | None = None,
) -> Path:
    """Heat map of the confusion matrix (rows = true class); ``normalize`` divides each row by its total."""
    counts = np.asarray(cm, dtype=np.float64)
    k = len(classes)
    values = safe_divide(counts, counts.sum(axis=1, keepdims=True)) if normalize else counts
    size = max(4.5, 0.6 * k + 2.5)
    fig = new_figure(size + 1.0, size)
    ax = fig.add_subplot()
    shown = np.nan_to_num(values)
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1.0 if normalize else max(1.0, shown.max()))
    fig.colorbar(image, ax=ax, shrink=0.85, label="share of true class" if normalize else "images")
    threshold = (1.0 if normalize else max(1.0, shown.max())) / 2
    for i in range(k):
        for j in range(k):
            if normalize:
                text = "–" if np.isnan(values[i, j]) else f"{values[i, j]:.2f}"
            else:
                text = f"{int(counts[i, j])}"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=8 if k > 10 else 9,
                color="white" if shown[i, j] > threshold else "black",
            )
    ax.set_xticks(range(k), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(classes))
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    default = "Confusion matrix (row-normalised)" if normalize else "Confusion matrix (counts)"
    ax.set_title(title or default)
    return save_figure(fig, path)


def _one_vs_rest_plot(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    classes: Sequence[str],
    path: Path,
    curve: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, str]],
    axes: tuple[str, str, str],
    diagonal: bool,
) -> Path:
    y_true, y_prob = check_predictions(y_true, y_prob, len(classes))
    # ROC points are joined by straight lines; a PR curve is a step function (as sklearn draws it).
    drawstyle = "default" if diagonal else "steps-post"
    fig = new_figure(7.5, 5.5)
    ax = fig.add_subplot()
    for c, (name, color) in enumerate(zip(classes, class_colors(len(classes)), strict=True)):
        positive = y_true == c
        if not positive.any() or (diagonal and positive.all()):
            continue
        x, y, label = curve(positive, y_prob[:, c])
        ax.plot(x, y, color=color, lw=1.6, label=f"{name} ({label})", drawstyle=drawstyle)
    if diagonal:
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    xlabel, ylabel, title = axes
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "No class has both positive and negative images", ha="center", va="center")
    return save_figure(fig, path)


def _roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    fpr, tpr, _ = skm.roc_curve(positive, scores)
    return fpr, tpr, f"AUC {skm.roc_auc_score(positive, scores):.3f}"


def _pr_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    precision, recall, _ = skm.precision_recall_curve(positive, scores)
    return recall, precision, f"AP {skm.average_precision_score(positive, scores):.3f}"


def plot_roc_curves(y_true: np.ndarray, y_prob: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """One-vs-rest ROC curve per class (classes absent from ``y_true`` are skipped)."""
    axes = ("False positive rate (1 − specificity)", "True positive rate (sensitivity)", "ROC, one-vs-rest")
    return _one_vs_rest_plot(y_true, y_prob, classes, path, _roc_curve, axes, diagonal=True)


def plot_pr_curves(y_true: np.ndarray, y_prob: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """One-vs-rest precision-recall curve per class (classes absent from ``y_true`` are skipped)."""
    axes = ("Recall (sensitivity)", "Precision (positive predictive value)", "Precision-recall, one-vs-rest")
    return _one_vs_rest_plot(y_true, y_prob, classes, path, _pr_curve, axes, diagonal=False)


def _reliability_bins(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int) -> tuple:
    confidence = y_prob.max(axis=1)
    correct = (y_prob.argmax(axis=1) == y_true).astype(np.float64)
    index = confidence_bin(confidence, n_bins)
    count = np.bincount(index, minlength=n_bins)
    accuracy = safe_divide(np.bincount(index, correct, minlength=n_bins), count)
    return accuracy, count


def plot_reliability(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    path: Path,
    *,
    y_prob_calibrated: np.ndarray | None = None,
    n_bins: int = ECE_BINS,
) -> Path:
    """Reliability diagram (accuracy per confidence bin) with ECE, before and after temperature scaling."""
    y_true, y_prob = check_predictions(y_true, y_prob)
    series = [("uncalibrated", y_prob, "#1f77b4")]
    if y_prob_calibrated is not None:
        series.append(("temperature-scaled", check_predictions(y_true, y_prob_calibrated)[1], "#d62728"))
    fig = new_figure(6.5, 6.5)
    ax, hist = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    edges = np.linspace(0, 1, n_bins + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    offset = width / (2 * len(series))
    for i, (name, prob, color) in enumerate(series):
        accuracy, count = _reliability_bins(y_true, prob, n_bins)
        ece = expected_calibration_error(y_true, prob, n_bins)
        shift = (i - (len(series) - 1) / 2) * offset * 2
        filled = count > 0
        ax.bar(
            centres[filled] + shift,
            accuracy[filled],
            width=width / len(series),
            color=color,
            alpha=0.75,
            edgecolor="white",
            label=f"{name} (ECE {ece:.3f})",
        )
        hist.bar(centres + shift, count, width=width / len(series), color=color, alpha=0.75)
    ax.set(
        xlim=(0, 1), ylim=(0, 1), ylabel="Accuracy in bin", title="Reliability diagram (top-label confidence)"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    hist.set(xlabel="Confidence (max predicted probability)", ylabel="Images")
    hist.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_training_curves(history: pd.DataFrame, path: Path) -> Path:
    """Loss, validation accuracy / macro-F1 and learning rate per epoch from the training history."""
    needed = {"epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr"}
    missing = needed - set(history.columns)
    if missing:
        raise ValueError(f"training history lacks columns {sorted(missing)}")
    epoch = history["epoch"].to_numpy()
    fig = new_figure(12, 3.8)
    loss_ax, score_ax, lr_ax = fig.subplots(1, 3)
    marker = "o" if len(epoch) <= 30 else None
    loss_ax.plot(epoch, history["train_loss"], marker=marker, label="train")
    loss_ax.plot(epoch, history["val_loss"], marker=marker, label="validation")
    loss_ax.set(title="Loss", xlabel="Epoch", ylabel="Cross-entropy")
    score_ax.plot(epoch, history["val_accuracy"], marker=marker, label="accuracy")
    score_ax.plot(epoch, history["val_macro_f1"], marker=marker, label="macro F1")
    f1 = history["val_macro_f1"].to_numpy(dtype=np.float64)
    if np.isfinite(f1).any():
        best = int(np.nanargmax(f1))
        score_ax.axvline(
            epoch[best], color="grey", ls=":", lw=1, label=f"best macro F1 (epoch {epoch[best]})"
        )
    score_ax.set(title="Validation scores", xlabel="Epoch", ylabel="Score", ylim=(0, 1.02))
    lr_ax.plot(epoch, history["lr"], marker=marker, color="#2ca02c")
    lr_ax.set(title="Learning rate", xlabel="Epoch", ylabel="LR")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in (loss_ax, score_ax, lr_ax):
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=8)
    score_ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def plot_confused_pairs(
    cm: Sequence[Sequence[int]] | np.ndarray,
    classes: Sequence[str],
    path: Path,
    *,
    top: int = 10,
) -> Path:
    """Horizontal bar chart of the most frequent errors, each bar "true → predicted"."""
    pairs = most_confused_pairs(cm, classes, top)
    support = np.asarray(cm).sum(axis=1)
    index = {name: i for i, name in enumerate(classes)}
    fig = new_figure(7.5, max(2.5, 0.42 * len(pairs) + 1.4))
    ax = fig.add_subplot()
    if not pairs:
        ax.text(0.5, 0.5, "No misclassifications", ha="center", va="center", fontsize=12)
        ax.set_axis_off()
    else:
        labels = [f"{t} → {p}" for t, p, _ in pairs][::-1]
        counts = [n for _, _, n in pairs][::-1]
        bars = ax.barh(labels, counts, color="#d62728", alpha=0.8)
        shares = [n / support[index[t]] for t, _, n in pairs][::-1]
        ax.bar_label(
            bars,
            labels=[f"{n} ({s:.0%} of true)" for n, s in zip(counts, shares, strict=True)],
            padding=3,
            fontsize=8,
        )
        ax.set_xlim(0, max(counts) * 1.3)
        ax.set_xlabel("Misclassified images")
        ax.grid(axis="x", alpha=0.3)
    ax.set_title("Most confused class pairs (true → predicted)")
    return save_figure(fig, path)


def write_figures(
    out_dir: Path,
    y_true: np.ndarray,
    y_prob: np.ndarray,
    classes: Sequence[str],
    *,
    history: pd.DataFrame | None = None,
    y_prob_calibrated: np.ndarray | None = None,
) -> dict[str, Path]:
    """Write every evaluation figure into ``out_dir``; returns {figure key: PNG path} for the report.

    Keys (files :func:`figure_path`): confusion, confusion_normalized, roc, pr, reliability,
    confused_pairs, and training_curves when ``history`` is given.
    """
    y_true, y_prob = check_predictions(y_true, y_prob, len(classes))
    cm = skm.confusion_matrix(y_true, y_prob.argmax(axis=1), labels=list(range(len(classes))))
    figures = {
        "confusion": plot_confusion_matrix(cm, classes, figure_path(out_dir, "confusion")),
        "confusion_normalized": plot_confusion_matrix(
            cm, classes, figure_path(out_dir, "confusion_normalized"), normalize=True
        ),
        "roc": plot_roc_curves(y_true, y_prob, classes, figure_path(out_dir, "roc")),
        "pr": plot_pr_curves(y_true, y_prob, classes, figure_path(out_dir, "pr")),
        "reliability": plot_reliability(
            y_true, y_prob, figure_path(out_dir, "reliability"), y_prob_calibrated=y_prob_calibrated
        ),
        "confused_pairs": plot_confused_pairs(cm, classes, figure_path(out_dir, "confused_pairs")),
    }
    if history is not None and len(history):
        figures["training_curves"] = plot_training_curves(history, figure_path(out_dir, "training_curves"))
    return figures


def plot_unknown_predictions(table: pd.DataFrame, classes: Sequence[str], path: Path) -> Path:
    """Stacked horizontal bars: for each label the model has no class for, how its images were classified.

    ``table`` has columns label, predicted and images (one row per label and predicted class).
    """
    labels = list(dict.fromkeys(table["label"]))
    fig = new_figure(8.0, max(2.4, 0.55 * len(labels) + 1.6))
    ax = fig.add_subplot()
    left = np.zeros(len(labels))
    for cls, color in zip(classes, class_colors(len(classes)), strict=True):
        counts = np.array([table[(table["label"] == lab) & (table["predicted"] == cls)]["images"].sum()
                           for lab in labels], dtype=float)
        if counts.any():
            ax.barh(labels, counts, left=left, color=color, label=cls, edgecolor="white")
            left += counts
    ax.invert_yaxis()
    ax.set_xlabel("Images")
    ax.set_title("Classes the model does not know: what it predicted")
    ax.legend(title="predicted", loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def plot_site_scores(table: pd.DataFrame, path: Path, metric: str = "macro_f1", label: str = "Macro F1") -> Path:
    """``metric`` per site with its interval, sites the model was trained on apart from unseen ones
    (``table``: :func:`pipeline.sites.site_table`)."""
    records = table.to_dict("records")
    fig = new_figure(6.4, 0.5 * len(records) + 1.4)
    ax = fig.add_subplot()
    colors = {"trained on": "#1f77b4", "not trained on": "#d62728"}
    for y, record in enumerate(records):
        value = record[metric]
        if value is None or pd.isna(value):
            continue
        low, high = record[f"{metric}_ci_low"], record[f"{metric}_ci_high"]
        error = None if low is None or pd.isna(low) else [[value - low], [high - value]]
        ax.barh(y, value, xerr=error, color=colors.get(record["role"], "grey"), capsize=3,
                label=record["role"])
        ax.text(min(value + 0.02, 0.9), y, f"{value:.3f}  (n={record['n']:,}, {record['split']})", va="center",
                fontsize=8)
    ax.set_yticks(range(len(records)), [record["site"] for record in records])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(label)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="lower right", fontsize=8)
    ax.set_title(f"{label} per site (the model's own sites: test split; others: all images)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)
