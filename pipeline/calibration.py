"""Probabilities from logits, and how far their confidence can be trusted.

Softmax with a temperature, the expected calibration error (ECE) and temperature scaling.
Prediction and the served model import this module, so it draws nothing: no matplotlib here.

Conventions (shared with :mod:`pipeline.metrics`): ``y_true`` holds class indices ``0..K-1``;
``y_prob`` is an ``(n, K)`` array of probabilities; the prediction is the arg-max.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

ECE_BINS = 15  # equal-width confidence bins of the ECE and the reliability diagram
TEMPERATURE_BOUNDS = (0.05, 20.0)
# Keys of calibration_summary(), in order, with their meaning: the report and `wbc compare` read them here.
CALIBRATION_LABELS = {
    "temperature": "Fitted temperature T",
    "ece": "ECE, raw probabilities",
    "ece_calibrated": "ECE, temperature-scaled",
    "log_loss": "Log loss, raw probabilities",
    "log_loss_calibrated": "Log loss, temperature-scaled",
}


def check_predictions(y_true: np.ndarray, y_prob: np.ndarray, n_classes: int | None = None) -> tuple:
    """``(y_true, y_prob)`` as int64 and float64 arrays; a clear ``ValueError`` when they do not fit together.

    ``y_prob`` may also be logits: only its shape and finiteness are checked.
    """
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


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (numerically stable)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def confidence_bin(confidence: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Index of each confidence's equal-width bin (lo, hi] over [0, 1]; exactly 0 joins the first bin."""
    return np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def weighted_ece(weights: np.ndarray, y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Top-label ECE for each column of ``weights`` (n, B): how often each image counts."""
    confidence = y_prob.max(axis=1)
    gap = confidence - (y_prob.argmax(axis=1) == y_true)
    bins = np.zeros((len(y_true), n_bins))
    bins[np.arange(len(y_true)), confidence_bin(confidence, n_bins)] = gap
    return np.abs(bins.T @ weights).sum(axis=0) / weights.sum(axis=0)


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE: sum over confidence bins of (bin share) x |accuracy - mean confidence|."""
    y_true, y_prob = check_predictions(y_true, y_prob)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return float(weighted_ece(np.ones((len(y_true), 1)), y_true, y_prob, n_bins)[0])


def nll_per_sample(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """Negative log of the probability each image gives its true class (clipped away from 0 and 1)."""
    eps = np.finfo(y_prob.dtype).eps
    return -np.log(np.clip(y_prob[np.arange(len(y_true)), y_true], eps, 1 - eps))


def _mean_nll(logits: np.ndarray, y_true: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(y_true)), y_true]))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Temperature T minimising the mean NLL of ``softmax(logits / T)``, within :data:`TEMPERATURE_BOUNDS`.

    The NLL is convex in 1/T, so a bounded scalar search on log T finds the optimum.
    Fit it on validation logits and apply it to the test logits.
    """
    y_true, logits = check_predictions(y_true, logits)
    low, high = (math.log(t) for t in TEMPERATURE_BOUNDS)
    result = minimize_scalar(
        lambda log_t: _mean_nll(logits, y_true, math.exp(log_t)),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(math.exp(result.x))


def calibration_summary(y_true: np.ndarray, logits: np.ndarray, temperature: float,
                        n_bins: int = ECE_BINS) -> dict[str, float]:
    """ECE and log loss before and after temperature scaling (the keys of :data:`CALIBRATION_LABELS`)."""
    y_true, logits = check_predictions(y_true, logits)
    before, after = softmax(logits), softmax(logits, temperature)
    return {
        "temperature": float(temperature),
        "ece": expected_calibration_error(y_true, before, n_bins),
        "ece_calibrated": expected_calibration_error(y_true, after, n_bins),
        "log_loss": float(nll_per_sample(y_true, before).mean()),
        "log_loss_calibrated": float(nll_per_sample(y_true, after).mean()),
    }
