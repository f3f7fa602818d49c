"""Classification metrics with bootstrap confidence intervals, calibration and figures.

Everything here is a pure function of labels and probabilities: :mod:`pipeline.evaluate`
predicts, then calls these. Figures are drawn with matplotlib's object API on the Agg
canvas, so importing this module changes no global matplotlib state.

Conventions:

* ``y_true`` holds class indices ``0..K-1`` in the order of ``classes``; ``y_prob`` is an
  ``(n, K)`` array of probabilities; the prediction is the arg-max.
* A metric that is undefined on the data (recall of a class absent from ``y_true``, the AUC
  of a class with no positives, ...) is ``None``, never NaN, so that the result passes
  ``json.dumps(..., allow_nan=False)``.
* Each metric is ``{"value": x, "ci_low": a, "ci_high": b}``: the point estimate and the
  percentile bootstrap interval (95 %) over resamples of the evaluated images.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.optimize import minimize_scalar
from sklearn import metrics as skm

CI_LEVEL = 0.95
DPI = 110
OVERALL_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "weighted_f1",
    "cohen_kappa",
    "mcc",
    "log_loss",
    "ece",
)
PER_CLASS_METRICS = ("precision", "recall", "specificity", "f1", "roc_auc", "average_precision")
# One bootstrap chunk (images x resamples weights, about 4 MB of float64) stays cache-sized;
# bigger chunks run slower, bound by memory bandwidth.
_CHUNK_CELLS = 500_000
_TEMPERATURE_BOUNDS = (0.05, 20.0)


# ---------------------------------------------------------------------------
# Input checks and small helpers
# ---------------------------------------------------------------------------


def _check_inputs(y_true: np.ndarray, y_prob: np.ndarray, n_classes: int | None = None) -> tuple:
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_prob.ndim != 2 or y_prob.shape[1] < 2:
        raise ValueError(f"y_prob must be an (n, K>=2) array, got shape {y_prob.shape}")
    if n_classes is not None and y_prob.shape[1] != n_classes:
        raise ValueError(f"y_prob has {y_prob.shape[1]} columns but there are {n_classes} classes")
    if y_true.ndim != 1 or len(y_true) != len(y_prob):
        raise ValueError(f"y_true must be 1-D with {len(y_prob)} entries, got shape {y_true.shape}")
    if len(y_true) == 0:
        raise ValueError("cannot compute metrics on zero samples")
    if not np.issubdtype(y_true.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y_true.dtype}")
    if y_true.min() < 0 or y_true.max() >= y_prob.shape[1]:
        raise ValueError(f"y_true holds indices outside 0..{y_prob.shape[1] - 1}")
    if not np.all(np.isfinite(y_prob)):
        raise ValueError("y_prob contains NaN or infinite values")
    return y_true.astype(np.int64), y_prob


def _finite_or_none(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den == 0 (an undefined ratio, later reported as None)."""
    num, den = np.broadcast_arrays(np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64))
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _percentile_ci(samples: np.ndarray) -> tuple[float | None, float | None]:
    """Percentile interval over the resamples where the metric is defined."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None, None
    tail = (1.0 - CI_LEVEL) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def _with_ci(value: float | None, samples: np.ndarray) -> dict[str, float | None]:
    value = _finite_or_none(value)
    low, high = _percentile_ci(samples) if value is not None else (None, None)
    return {"value": value, "ci_low": low, "ci_high": high}


# ---------------------------------------------------------------------------
# Metrics on weighted samples: a bootstrap resample is the original images with
# integer weights (how often each was drawn), so one formula serves the point
# estimate (weights 1) and every resample. Weights are (n, B): one column per
# resample, so sorting by score gathers whole rows and cumulative sums run down
# contiguous memory.
# ---------------------------------------------------------------------------


def _weighted_confusion(weights: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """(B, K, K) confusion matrices, rows = true class, from (n, B) sample weights."""
    cell = y_true * k + y_pred
    order = np.argsort(cell, kind="stable")
    ranked = cell[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    counts = np.zeros((k * k, weights.shape[1]))
    # Summing contiguous row blocks beats a (B, n) x (n, K*K) product, which is memory-bound here.
    counts[ranked[starts]] = np.add.reduceat(weights[order], starts, axis=0)
    return counts.T.reshape(-1, k, k)


def _confusion_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Overall and per-class scores from (B, K, K) confusion matrices (NaN where undefined)."""
    total = cm.sum(axis=(1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    fp, fn = predicted - tp, support - tp
    tn = total[:, None] - tp - fp - fn
    recall = _safe_divide(tp, support)
    f1 = _safe_divide(2 * tp, 2 * tp + fp + fn)
    # sklearn's conventions: averages run over the classes present (in y_true for
    # balanced accuracy, in y_true or y_pred for macro F1); zero_division=0 elsewhere.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        balanced = np.nanmean(recall, axis=1)
        macro_f1 = np.nanmean(f1, axis=1)
    weighted_f1 = _safe_divide((np.nan_to_num(f1) * support).sum(axis=1), total)
    expected = (support * predicted).sum(axis=1)
    agree = tp.sum(axis=1)
    kappa = _safe_divide(total * agree - expected, total**2 - expected)
    mcc_den = np.sqrt((total**2 - (predicted**2).sum(axis=1)) * (total**2 - (support**2).sum(axis=1)))
    mcc = np.nan_to_num(_safe_divide(agree * total - expected, mcc_den), nan=0.0)
    return {
        "accuracy": _safe_divide(agree, total),
        "balanced_accuracy": balanced,
        "macro_f1": macro_f1,
        "weighted_f1": weighted_f1,
        "cohen_kappa": kappa,
        "mcc": mcc,
        "precision": _safe_divide(tp, predicted),
        "recall": recall,
        "specificity": _safe_divide(tn, tn + fp),
        "f1": f1,
    }


def _tie_groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort order (descending score) and the start index of each run of equal scores."""
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    return order, starts


def _weighted_auc_ap(weights: np.ndarray, positive: np.ndarray, ranking: tuple) -> tuple:
    """One-vs-rest ROC AUC and average precision (sklearn's step definition) per weight column.

    ``ranking`` is :func:`_tie_groups` of the class scores, computed once for all chunks.
    """
    order, starts = ranking
    w = weights[order]
    pos = w * positive[order, None]
    if len(starts) < len(order):
        w, pos = np.add.reduceat(w, starts, axis=0), np.add.reduceat(pos, starts, axis=0)
    neg = w - pos
    tp, ranked = np.cumsum(pos, axis=0), np.cumsum(w, axis=0)
    fp = ranked - tp
    n_pos, n_neg = tp[-1], fp[-1]
    # A positive beats every negative ranked below it (n_neg - fp) and ties count half.
    beaten = n_pos * n_neg - np.einsum("ij,ij->j", pos, fp - 0.5 * neg)
    auc = _safe_divide(beaten, n_pos * n_neg)
    # Where nothing is ranked yet, no positive is either, so the 0/0 precision never counts.
    precision = tp / np.maximum(ranked, np.finfo(np.float64).tiny)
    ap = _safe_divide(np.einsum("ij,ij->j", pos, precision), n_pos)
    return auc, ap


def _weighted_ece(weights: np.ndarray, y_true: np.ndarray, y_prob: np.ndarray, n_bins: int) -> np.ndarray:
    confidence = y_prob.max(axis=1)
    gap = confidence - (y_prob.argmax(axis=1) == y_true)
    bins = np.zeros((len(y_true), n_bins))
    bins[np.arange(len(y_true)), _bin_index(confidence, n_bins)] = gap
    return np.abs(bins.T @ weights).sum(axis=0) / weights.sum(axis=0)


def _nll_per_sample(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    eps = np.finfo(y_prob.dtype).eps
    return -np.log(np.clip(y_prob[np.arange(len(y_true)), y_true], eps, 1 - eps))


def _weighted_scores(
    weights: np.ndarray, y_true: np.ndarray, y_prob: np.ndarray, rankings: list | None = None
) -> dict[str, np.ndarray]:
    """Every metric for each column of ``weights`` (n, B): overall (B,), per-class (B, K)."""
    k = y_prob.shape[1]
    y_pred = y_prob.argmax(axis=1)
    rankings = rankings or [_tie_groups(y_prob[:, c]) for c in range(k)]
    scores = _confusion_scores(_weighted_confusion(weights, y_true, y_pred, k))
    scores["log_loss"] = _nll_per_sample(y_true, y_prob) @ weights / weights.sum(axis=0)
    scores["ece"] = _weighted_ece(weights, y_true, y_prob, 15)
    auc_ap = [_weighted_auc_ap(weights, y_true == c, rankings[c]) for c in range(k)]
    scores["roc_auc"] = np.stack([auc for auc, _ in auc_ap], axis=1)
    scores["average_precision"] = np.stack([ap for _, ap in auc_ap], axis=1)
    return scores


def _bootstrap(y_true: np.ndarray, y_prob: np.ndarray, n_bootstrap: int, seed: int) -> dict[str, np.ndarray]:
    """Metrics over ``n_bootstrap`` resamples with replacement, computed in memory-bounded chunks."""
    n = len(y_true)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // n)
    rankings = [_tie_groups(y_prob[:, c]) for c in range(y_prob.shape[1])]
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        draws = rng.integers(0, n, size=(b, n))
        flat = (draws * b + np.arange(b)[:, None]).ravel()
        weights = np.bincount(flat, minlength=n * b).reshape(n, b).astype(np.float64)
        parts.append(_weighted_scores(weights, y_true, y_prob, rankings))
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


# ---------------------------------------------------------------------------
# Point estimates (scikit-learn)
# ---------------------------------------------------------------------------


def _point_overall(y_true: np.ndarray, y_pred: np.ndarray, y_prob: np.ndarray) -> dict[str, float | None]:
    labels = list(range(y_prob.shape[1]))
    with warnings.catch_warnings():
        # Undefined cases (a class never predicted, a single class) are handled by
        # returning None; sklearn's warnings about them would only be noise.
        warnings.simplefilter("ignore")
        return {
            "accuracy": skm.accuracy_score(y_true, y_pred),
            "balanced_accuracy": skm.balanced_accuracy_score(y_true, y_pred),
            "macro_f1": skm.f1_score(y_true, y_pred, average="macro", zero_division=0),
            "weighted_f1": skm.f1_score(y_true, y_pred, average="weighted", zero_division=0),
            "cohen_kappa": skm.cohen_kappa_score(y_true, y_pred),
            "mcc": skm.matthews_corrcoef(y_true, y_pred),
            "log_loss": skm.log_loss(y_true, y_prob, labels=labels),
            "ece": expected_calibration_error(y_true, y_prob),
        }


def _point_per_class(y_true: np.ndarray, y_pred: np.ndarray, y_prob: np.ndarray, cm: np.ndarray) -> dict:
    """Per-class point metrics, lists indexed by class; None where undefined."""
    k = y_prob.shape[1]
    labels = list(range(k))
    support, predicted, tp = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    present = (support + predicted) > 0
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    negatives = len(y_true) - support
    specificity = _safe_divide(negatives - (predicted - tp), negatives)
    out: dict[str, list] = {name: [] for name in PER_CLASS_METRICS}
    for c in range(k):
        positive = y_true == c
        has_both = 0 < positive.sum() < len(y_true)
        out["precision"].append(precision[c] if predicted[c] > 0 else None)
        out["recall"].append(recall[c] if support[c] > 0 else None)
        out["specificity"].append(specificity[c])
        out["f1"].append(f1[c] if present[c] else None)
        out["roc_auc"].append(skm.roc_auc_score(positive, y_prob[:, c]) if has_both else None)
        out["average_precision"].append(
            skm.average_precision_score(positive, y_prob[:, c]) if positive.any() else None
        )
    return out


def classification_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    classes: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    macro_classes: Sequence[int] | None = None,
) -> dict:
    """All evaluation metrics with percentile bootstrap 95 % intervals, as a JSON-ready dict.

    Macro F1 averages the classes present in ``y_true`` or the predictions (scikit-learn's
    convention); ``macro_classes`` (class indices) restricts it to those classes, e.g. to the
    classes an external dataset holds, so that a class it lacks does not count as a zero.

    Returns ``{"classes", "n", "n_bootstrap", "ci_level", "seed", "overall", "per_class",
    "confusion_matrix"}`` where ``overall[name]`` and ``per_class[class][name]`` are
    ``{"value", "ci_low", "ci_high"}`` (``None`` where undefined), ``overall["n"]`` and
    ``per_class[class]["support"]`` are counts and ``confusion_matrix`` is a list of rows
    (true class) of counts per predicted class, in ``classes`` order.
    """
    classes = [str(c) for c in classes]
    y_true, y_prob = _check_inputs(y_true, y_prob, len(classes))
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    k = len(classes)
    y_pred = y_prob.argmax(axis=1)
    cm = skm.confusion_matrix(y_true, y_pred, labels=list(range(k)))
    overall_point = _point_overall(y_true, y_pred, y_prob)
    class_point = _point_per_class(y_true, y_pred, y_prob, cm)
    boot = _bootstrap(y_true, y_prob, n_bootstrap, seed) if n_bootstrap else {}
    if macro_classes is not None:
        chosen = sorted({int(c) for c in macro_classes})
        if not chosen or chosen[0] < 0 or chosen[-1] >= k:
            raise ValueError(f"macro_classes must be class indices in 0..{k - 1}, got {list(macro_classes)}")
        defined = [class_point["f1"][c] for c in chosen if class_point["f1"][c] is not None]
        overall_point["macro_f1"] = float(np.mean(defined)) if defined else None
        if boot:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a resample may hold none of them
                boot["macro_f1"] = np.nanmean(boot["f1"][:, chosen], axis=1)
    empty = np.empty(0)

    overall: dict = {name: _with_ci(overall_point[name], boot.get(name, empty)) for name in OVERALL_METRICS}
    overall["n"] = len(y_true)
    per_class: dict = {}
    for c, name in enumerate(classes):
        entry = {
            metric: _with_ci(class_point[metric][c], boot[metric][:, c] if boot else empty)
            for metric in PER_CLASS_METRICS
        }
        entry["support"] = int(cm[c].sum())
        per_class[name] = entry
    return {
        "classes": classes,
        "n": len(y_true),
        "n_bootstrap": int(n_bootstrap),
        "ci_level": CI_LEVEL,
        "seed": int(seed),
        "overall": overall,
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
    }


def flat_metrics(metrics: dict) -> dict[str, float]:
    """Headline numbers as one flat mapping for DVC ``metrics.json`` and MLflow.

    Keys: each overall metric (``accuracy``, ``macro_f1``, ...), ``n``, ``<metric>/<class>``
    for every per-class metric, and ``calibration/<key>`` when ``metrics`` has a
    ``calibration`` section. Undefined (``None``) values are left out.
    """
    flat: dict[str, float] = {}
    for name, entry in metrics["overall"].items():
        value = entry["value"] if isinstance(entry, dict) else entry
        if value is not None:
            flat[name] = value
    for cls, entries in metrics["per_class"].items():
        for name, entry in entries.items():
            value = entry["value"] if isinstance(entry, dict) else entry
            if value is not None:
                flat[f"{name}/{cls}"] = value
    for name, value in metrics.get("calibration", {}).items():
        if isinstance(value, int | float) and math.isfinite(value):
            flat[f"calibration/{name}"] = value
    return flat


# ---------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (numerically stable)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins (lo, hi] over [0, 1]; a confidence of exactly 0 joins the first bin."""
    return np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: sum over confidence bins of (bin share) x |accuracy - mean confidence|."""
    y_true, y_prob = _check_inputs(y_true, y_prob)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    ones = np.ones((len(y_true), 1))
    return float(_weighted_ece(ones, y_true, y_prob, n_bins)[0])


def _nll(logits: np.ndarray, y_true: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(y_true)), y_true]))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Temperature T minimising the mean NLL of ``softmax(logits / T)``, within [0.05, 20].

    The NLL is convex in 1/T, so a bounded scalar search on log T finds the optimum.
    Fit it on validation logits and apply it to the test logits.
    """
    y_true, logits = _check_inputs(y_true, logits)
    low, high = (math.log(t) for t in _TEMPERATURE_BOUNDS)
    result = minimize_scalar(
        lambda log_t: _nll(logits, y_true, math.exp(log_t)),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(math.exp(result.x))


def calibration_summary(
    y_true: np.ndarray,
    logits: np.ndarray,
    temperature: float,
    n_bins: int = 15,
) -> dict[str, float]:
    """ECE and log loss before and after temperature scaling, for ``metrics["calibration"]``."""
    y_true, logits = _check_inputs(y_true, logits)
    before, after = softmax(logits), softmax(logits, temperature)
    return {
        "temperature": float(temperature),
        "ece": expected_calibration_error(y_true, before, n_bins),
        "ece_calibrated": expected_calibration_error(y_true, after, n_bins),
        "log_loss": float(_nll_per_sample(y_true, before).mean()),
        "log_loss_calibrated": float(_nll_per_sample(y_true, after).mean()),
    }


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", facecolor="white")
    return path


def class_colors(k: int) -> list:
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
    values = _safe_divide(counts, counts.sum(axis=1, keepdims=True)) if normalize else counts
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
    y_true, y_prob = _check_inputs(y_true, y_prob, len(classes))
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
    index = _bin_index(confidence, n_bins)
    count = np.bincount(index, minlength=n_bins)
    accuracy = _safe_divide(np.bincount(index, correct, minlength=n_bins), count)
    return accuracy, count


def plot_reliability(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    path: Path,
    *,
    y_prob_calibrated: np.ndarray | None = None,
    n_bins: int = 15,
) -> Path:
    """Reliability diagram (accuracy per confidence bin) with ECE, before and after temperature scaling."""
    y_true, y_prob = _check_inputs(y_true, y_prob)
    series = [("uncalibrated", y_prob, "#1f77b4")]
    if y_prob_calibrated is not None:
        series.append(("temperature-scaled", _check_inputs(y_true, y_prob_calibrated)[1], "#d62728"))
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


def most_confused_pairs(
    cm: Sequence[Sequence[int]] | np.ndarray, classes: Sequence[str], top: int = 10
) -> list:
    """Largest off-diagonal cells as ``[(true class, predicted class, count), ...]``, largest first."""
    counts = np.asarray(cm, dtype=np.int64)
    off = [(counts[i, j], i, j) for i in range(len(classes)) for j in range(len(classes)) if i != j]
    off = [cell for cell in off if cell[0] > 0]
    off.sort(key=lambda cell: (-cell[0], cell[1], cell[2]))
    return [(classes[i], classes[j], int(n)) for n, i, j in off[:top]]


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

    Keys and file names: confusion (confusion.png), confusion_normalized, roc, pr, reliability,
    confused_pairs, and training_curves when ``history`` is given.
    """
    out_dir = Path(out_dir)
    y_true, y_prob = _check_inputs(y_true, y_prob, len(classes))
    cm = skm.confusion_matrix(y_true, y_prob.argmax(axis=1), labels=list(range(len(classes))))
    figures = {
        "confusion": plot_confusion_matrix(cm, classes, out_dir / "confusion.png"),
        "confusion_normalized": plot_confusion_matrix(
            cm, classes, out_dir / "confusion_normalized.png", normalize=True
        ),
        "roc": plot_roc_curves(y_true, y_prob, classes, out_dir / "roc.png"),
        "pr": plot_pr_curves(y_true, y_prob, classes, out_dir / "pr.png"),
        "reliability": plot_reliability(
            y_true, y_prob, out_dir / "reliability.png", y_prob_calibrated=y_prob_calibrated
        ),
        "confused_pairs": plot_confused_pairs(cm, classes, out_dir / "confused_pairs.png"),
    }
    if history is not None and len(history):
        figures["training_curves"] = plot_training_curves(history, out_dir / "training_curves.png")
    return figures
