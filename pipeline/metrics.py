"""Classification metrics with bootstrap confidence intervals: the numbers of an evaluation.

Every metric is declared once, in :data:`METRICS`: its key, its label in the report, a short
name, whether higher is better, whether it is per class, a sentence for the report's glossary
and its formula. ``metrics.json``, ``per_class.csv``, MLflow keys, the report and
``wbc compare`` all read that declaration, so adding a metric is one entry there (its formula
reads the counts of :class:`Weighted`; a new kind of count is a new property there).

Conventions:

* ``y_true`` holds class indices ``0..K-1`` in the order of ``classes``; ``y_prob`` is an
  ``(n, K)`` array of probabilities; the prediction is the arg-max.
* A metric that is undefined on the data (recall of a class absent from ``y_true``, the AUC
  of a class with no positives, ...) is ``None``, never NaN, so that the result passes
  ``json.dumps(..., allow_nan=False)``.
* Each metric is ``{"value": x, "ci_low": a, "ci_high": b}``: the point estimate and the
  percentile bootstrap interval (:data:`CI_LEVEL`) over resamples of the evaluated images.

One formula serves the point estimate and every resample: a formula reads the images under
weights (:class:`Weighted`), 1 for the point estimate and, for a bootstrap resample, how often
each image was drawn. The tests check each formula against scikit-learn with sample weights.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pipeline.calibration import ECE_BINS, check_predictions, nll_per_sample, weighted_ece

CI_LEVEL = 0.95
# One bootstrap chunk (images x resamples weights, about 4 MB of float64) stays cache-sized;
# bigger chunks run slower, bound by memory bandwidth.
_CHUNK_CELLS = 500_000

# Keys of the flat metrics (metrics.json) in MLflow: <prefix><key>.
TEST_PREFIX = "test_"  # the test split of the training data
EXTERNAL_PREFIX = "ext_"  # an external dataset NAME: ext_NAME_<key>


# ---------------------------------------------------------------------------
# Images under weights: what every formula reads
# ---------------------------------------------------------------------------


def safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den == 0 (an undefined ratio, later reported as None)."""
    num, den = np.broadcast_arrays(np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64))
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _tie_groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort order (descending score) and the start index of each run of equal scores."""
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    return order, starts


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
    auc = safe_divide(beaten, n_pos * n_neg)
    # Where nothing is ranked yet, no positive is either, so the 0/0 precision never counts.
    precision = tp / np.maximum(ranked, np.finfo(np.float64).tiny)
    ap = safe_divide(np.einsum("ij,ij->j", pos, precision), n_pos)
    return auc, ap


class Weighted:
    """The evaluated images under B weightings (the columns of ``weights``, shape (n, B)).

    Counts are (B, K) per class or (B,) overall, computed when first read. ``rankings`` (the
    sorted scores of each class) may be passed in so that bootstrap chunks sort only once.
    """

    def __init__(self, weights: np.ndarray, y_true: np.ndarray, y_prob: np.ndarray, rankings: list | None = None):
        self.weights, self.y_true, self.y_prob = weights, y_true, y_prob
        self.rankings = rankings or [_tie_groups(y_prob[:, c]) for c in range(y_prob.shape[1])]

    @cached_property
    def confusion(self) -> np.ndarray:
        """(B, K, K) weighted confusion matrices, rows = true class."""
        return _weighted_confusion(self.weights, self.y_true, self.y_prob.argmax(axis=1), self.y_prob.shape[1])

    @cached_property
    def tp(self) -> np.ndarray:
        """Images of each class predicted as that class."""
        return np.diagonal(self.confusion, axis1=1, axis2=2)

    @cached_property
    def support(self) -> np.ndarray:
        """Images of each true class."""
        return self.confusion.sum(axis=2)

    @cached_property
    def predicted(self) -> np.ndarray:
        """Images predicted as each class."""
        return self.confusion.sum(axis=1)

    @property
    def total(self) -> np.ndarray:
        """All images, (B,)."""
        return self.support.sum(axis=1)

    @property
    def fp(self) -> np.ndarray:
        """Images of other classes predicted as each class."""
        return self.predicted - self.tp

    @property
    def fn(self) -> np.ndarray:
        """Images of each class predicted as another."""
        return self.support - self.tp

    @property
    def tn(self) -> np.ndarray:
        """Images of other classes not predicted as each class."""
        return self.total[:, None] - self.tp - self.fp - self.fn

    @cached_property
    def recall(self) -> np.ndarray:
        """Per-class recall (NaN for a class without images)."""
        return safe_divide(self.tp, self.support)

    @cached_property
    def f1(self) -> np.ndarray:
        """Per-class F1 (NaN for a class neither present nor predicted)."""
        return safe_divide(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @cached_property
    def auc_ap(self) -> tuple[np.ndarray, np.ndarray]:
        """One-vs-rest ROC AUC and average precision, each (B, K)."""
        pairs = [_weighted_auc_ap(self.weights, self.y_true == c, ranking) for c, ranking in enumerate(self.rankings)]
        return np.stack([auc for auc, _ in pairs], axis=1), np.stack([ap for _, ap in pairs], axis=1)

    def image_mean(self, values: np.ndarray) -> np.ndarray:
        """Weighted mean over the images of a per-image quantity, (B,)."""
        return values @ self.weights / self.weights.sum(axis=0)


# ---------------------------------------------------------------------------
# Formulas: (B,) overall or (B, K) per class, NaN where undefined. Averages over
# classes follow sklearn: over the classes present (in y_true for balanced
# accuracy, in y_true or the predictions for macro F1); zero_division=0 elsewhere.
# ---------------------------------------------------------------------------


def _class_mean(values: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample may hold no class at all
        return np.nanmean(values, axis=1)


def _agreement(s: Weighted) -> tuple[np.ndarray, np.ndarray]:
    """Images on the diagonal and the chance-expected agreement times the total."""
    return s.tp.sum(axis=1), (s.support * s.predicted).sum(axis=1)


def _cohen_kappa(s: Weighted) -> np.ndarray:
    agree, expected = _agreement(s)
    return safe_divide(s.total * agree - expected, s.total**2 - expected)


def _mcc(s: Weighted) -> np.ndarray:
    agree, expected = _agreement(s)
    total = s.total
    den = np.sqrt((total**2 - (s.predicted**2).sum(axis=1)) * (total**2 - (s.support**2).sum(axis=1)))
    return np.nan_to_num(safe_divide(agree * total - expected, den), nan=0.0)


@dataclass(frozen=True)
class Metric:
    """One metric, declared once; everything that computes, stores or shows metrics reads it."""

    key: str  # in metrics.json and MLflow (<key>, or <key>/<class> per class) and per_class.csv
    label: str  # heading in the report
    short: str  # in `wbc compare` headings and plot legends
    per_class: bool  # one-vs-rest value per class, or one overall value
    higher_is_better: bool
    explanation: str  # the report's glossary
    formula: Callable[[Weighted], np.ndarray]

    @property
    def heading(self) -> str:
        """The label, marked when lower is better."""
        return self.label if self.higher_is_better else f"{self.label} (lower is better)"


METRICS: tuple[Metric, ...] = (
    Metric("accuracy", "Accuracy", "accuracy", False, True,
           "Share of images whose predicted class is the true class.",
           lambda s: safe_divide(s.tp.sum(axis=1), s.total)),
    Metric("balanced_accuracy", "Balanced accuracy (mean recall)", "balanced accuracy", False, True,
           "Mean of the recalls of the classes present: each class counts the same, however many images it has.",
           lambda s: _class_mean(s.recall)),
    Metric("macro_f1", "Macro F1", "macro F1", False, True,
           "Mean of the F1 of the classes present (true or predicted): each class counts the same.",
           lambda s: _class_mean(s.f1)),
    Metric("weighted_f1", "Weighted F1", "weighted F1", False, True,
           "Mean of the per-class F1 weighted by each class's support.",
           lambda s: safe_divide((np.nan_to_num(s.f1) * s.support).sum(axis=1), s.total)),
    Metric("cohen_kappa", "Cohen's kappa", "kappa", False, True,
           "Agreement with the true labels corrected for chance; 0 is chance, 1 perfect.",
           _cohen_kappa),
    Metric("mcc", "Matthews correlation (MCC)", "MCC", False, True,
           "Correlation between true and predicted classes over all classes; 0 is chance, 1 perfect.",
           _mcc),
    Metric("log_loss", "Log loss", "log loss", False, False,
           "Mean negative log of the probability given to the true class (raw, before temperature "
           "scaling); confident mistakes cost most.",
           lambda s: s.image_mean(nll_per_sample(s.y_true, s.y_prob))),
    Metric("ece", "Expected calibration error", "ECE", False, False,
           f"Mean gap between confidence and accuracy over {ECE_BINS} equal-width confidence bins, "
           "weighted by the images in each (raw probabilities).",
           lambda s: weighted_ece(s.weights, s.y_true, s.y_prob)),
    Metric("precision", "Precision (PPV)", "precision", True, True,
           "Share of cells labelled as a class that truly belong to it.",
           lambda s: safe_divide(s.tp, s.predicted)),
    Metric("recall", "Recall (sensitivity)", "recall", True, True,
           "Share of cells of a class that the model labels as that class.",
           lambda s: s.recall),
    Metric("specificity", "Specificity", "specificity", True, True,
           "Share of cells of all other classes that the model does not label as this class.",
           lambda s: safe_divide(s.tn, s.tn + s.fp)),
    Metric("f1", "F1", "F1", True, True,
           "Harmonic mean of precision and recall.",
           lambda s: s.f1),
    Metric("roc_auc", "ROC AUC", "ROC AUC", True, True,
           "Threshold-free one-vs-rest ranking quality from the predicted probability of the class: the "
           "chance that an image of the class scores above an image of another class.",
           lambda s: s.auc_ap[0]),
    Metric("average_precision", "Average precision", "AP", True, True,
           "Area under the one-vs-rest precision-recall curve; more telling than ROC AUC for rare classes.",
           lambda s: s.auc_ap[1]),
)


def overall_metrics() -> tuple[Metric, ...]:
    """The declared metrics with one value for all images, in declaration order."""
    return tuple(m for m in METRICS if not m.per_class)


def per_class_metrics() -> tuple[Metric, ...]:
    """The declared one-vs-rest metrics with one value per class, in declaration order."""
    return tuple(m for m in METRICS if m.per_class)


def metric(key: str) -> Metric:
    """The declared metric ``key``; a ``KeyError`` naming the declared ones otherwise."""
    for declared in METRICS:
        if declared.key == key:
            return declared
    raise KeyError(f"no metric {key!r}; declared: {', '.join(m.key for m in METRICS)}")


def per_class_key(key: str, cls: str) -> str:
    """Flat key of a per-class metric: ``recall/basophil``."""
    return f"{key}/{cls}"


def calibration_key(key: str) -> str:
    """Flat key of a calibration quantity: ``calibration/ece_calibrated``."""
    return f"calibration/{key}"


# ---------------------------------------------------------------------------
# Point estimates and bootstrap intervals
# ---------------------------------------------------------------------------


def _scores(sample: Weighted, macro_classes: list[int] | None) -> dict[str, np.ndarray]:
    """Every declared metric under each weighting of ``sample``."""
    scores = {m.key: m.formula(sample) for m in METRICS}
    if macro_classes is not None:
        scores["macro_f1"] = _class_mean(scores["f1"][:, macro_classes])
    return scores


def _bootstrap(y_true: np.ndarray, y_prob: np.ndarray, n_bootstrap: int, seed: int, rankings: list,
               macro_classes: list[int] | None) -> dict[str, np.ndarray]:
    """Metrics over ``n_bootstrap`` resamples with replacement, computed in memory-bounded chunks."""
    n = len(y_true)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // n)
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        draws = rng.integers(0, n, size=(b, n))
        flat = (draws * b + np.arange(b)[:, None]).ravel()
        weights = np.bincount(flat, minlength=n * b).reshape(n, b).astype(np.float64)
        parts.append(_scores(Weighted(weights, y_true, y_prob, rankings), macro_classes))
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _with_ci(value: float, samples: np.ndarray) -> dict[str, float | None]:
    """Point value and percentile interval over the resamples where the metric is defined."""
    point = _finite_or_none(value)
    finite = samples[np.isfinite(samples)]
    if point is None or finite.size == 0:
        return {"value": point, "ci_low": None, "ci_high": None}
    tail = (1.0 - CI_LEVEL) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return {"value": point, "ci_low": float(low), "ci_high": float(high)}


def _macro_choice(macro_classes: Sequence[int] | None, k: int) -> list[int] | None:
    if macro_classes is None:
        return None
    chosen = sorted({int(c) for c in macro_classes})
    if not chosen or chosen[0] < 0 or chosen[-1] >= k:
        raise ValueError(f"macro_classes must be class indices in 0..{k - 1}, got {list(macro_classes)}")
    return chosen


def classification_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    classes: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    macro_classes: Sequence[int] | None = None,
) -> dict:
    """Every metric of :data:`METRICS` with percentile bootstrap intervals, as a JSON-ready dict.

    Macro F1 averages the classes present in ``y_true`` or the predictions (scikit-learn's
    convention); ``macro_classes`` (class indices) restricts it to those classes, e.g. to the
    classes an external dataset holds, so that a class it lacks does not count as a zero.

    Returns ``{"classes", "n", "n_bootstrap", "ci_level", "seed", "overall", "per_class",
    "confusion_matrix"}`` where ``overall[key]`` and ``per_class[class][key]`` are
    ``{"value", "ci_low", "ci_high"}`` (``None`` where undefined), ``overall["n"]`` and
    ``per_class[class]["support"]`` are counts and ``confusion_matrix`` is a list of rows
    (true class) of counts per predicted class, in ``classes`` order.
    """
    classes = [str(c) for c in classes]
    y_true, y_prob = check_predictions(y_true, y_prob, len(classes))
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    chosen = _macro_choice(macro_classes, len(classes))
    images = Weighted(np.ones((len(y_true), 1)), y_true, y_prob)
    point = {key: values[0] for key, values in _scores(images, chosen).items()}
    boot = _bootstrap(y_true, y_prob, n_bootstrap, seed, images.rankings, chosen) if n_bootstrap else {}
    empty = np.empty(0)
    overall: dict = {m.key: _with_ci(point[m.key], boot.get(m.key, empty)) for m in overall_metrics()}
    overall["n"] = len(y_true)
    cm = np.rint(images.confusion[0]).astype(int)
    per_class: dict = {}
    for c, name in enumerate(classes):
        entry = {m.key: _with_ci(point[m.key][c], boot[m.key][:, c] if boot else empty) for m in per_class_metrics()}
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
        "confusion_matrix": cm.tolist(),
    }


def flat_metrics(metrics: dict) -> dict[str, float]:
    """Headline numbers as one flat mapping for DVC ``metrics.json`` and MLflow.

    Keys: each overall metric (``accuracy``, ``macro_f1``, ...), ``n``, :func:`per_class_key`
    for every per-class metric, and :func:`calibration_key` when ``metrics`` has a
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
                flat[per_class_key(name, cls)] = value
    for name, value in metrics.get("calibration", {}).items():
        if isinstance(value, int | float) and math.isfinite(value):
            flat[calibration_key(name)] = value
    return flat


def most_confused_pairs(
    cm: Sequence[Sequence[int]] | np.ndarray, classes: Sequence[str], top: int = 10
) -> list:
    """Largest off-diagonal cells as ``[(true class, predicted class, count), ...]``, largest first."""
    counts = np.asarray(cm, dtype=np.int64)
    off = [(counts[i, j], i, j) for i in range(len(classes)) for j in range(len(classes)) if i != j]
    off = [cell for cell in off if cell[0] > 0]
    off.sort(key=lambda cell: (-cell[0], cell[1], cell[2]))
    return [(classes[i], classes[j], int(n)) for n, i, j in off[:top]]
