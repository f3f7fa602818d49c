"""Metrics against scikit-learn and hand-computed cases; undefined cases; figures."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn import metrics as skm

from pipeline import calibration, figures, metrics

CLASSES = ["basophil", "eosinophil", "lymphocyte", "neutrophil"]


def _fake_predictions(n: int, k: int, seed: int = 0, signal: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y_true] += signal
    return y_true, calibration.softmax(logits)


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, np.ndarray]:
    return _fake_predictions(300, len(CLASSES))


@pytest.fixture(scope="module")
def result(sample) -> dict:
    y_true, y_prob = sample
    return metrics.classification_metrics(y_true, y_prob, CLASSES, n_bootstrap=300, seed=7)


def test_overall_point_metrics_match_sklearn(sample, result):
    y_true, y_prob = sample
    y_pred = y_prob.argmax(axis=1)
    expected = {
        "accuracy": skm.accuracy_score(y_true, y_pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y_true, y_pred),
        "macro_f1": skm.f1_score(y_true, y_pred, average="macro"),
        "weighted_f1": skm.f1_score(y_true, y_pred, average="weighted"),
        "cohen_kappa": skm.cohen_kappa_score(y_true, y_pred),
        "mcc": skm.matthews_corrcoef(y_true, y_pred),
        "log_loss": skm.log_loss(y_true, y_prob),
    }
    for name, value in expected.items():
        assert result["overall"][name]["value"] == pytest.approx(value), name
    assert result["overall"]["n"] == result["n"] == len(y_true)
    assert result["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred).tolist()


def test_per_class_point_metrics_match_sklearn(sample, result):
    y_true, y_prob = sample
    y_pred = y_prob.argmax(axis=1)
    precision, recall, f1, support = skm.precision_recall_fscore_support(y_true, y_pred)
    for c, name in enumerate(CLASSES):
        entry = result["per_class"][name]
        assert entry["precision"]["value"] == pytest.approx(precision[c])
        assert entry["recall"]["value"] == pytest.approx(recall[c])
        assert entry["f1"]["value"] == pytest.approx(f1[c])
        assert entry["support"] == support[c]
        assert entry["roc_auc"]["value"] == pytest.approx(skm.roc_auc_score(y_true == c, y_prob[:, c]))
        assert entry["average_precision"]["value"] == pytest.approx(
            skm.average_precision_score(y_true == c, y_prob[:, c])
        )


def test_specificity_by_hand():
    # true:      0  0  1  1  2
    # predicted: 0  1  1  1  0
    # class 0: negatives are images 2, 3, 4; image 4 is predicted 0 -> 2/3
    # class 1: negatives are images 0, 1, 4; image 1 is predicted 1 -> 2/3
    # class 2: negatives are images 0..3; none is predicted 2 -> 1
    y_true = np.array([0, 0, 1, 1, 2])
    y_prob = np.eye(3)[[0, 1, 1, 1, 0]] * 0.8 + 0.2 / 3
    result = metrics.classification_metrics(y_true, y_prob, ["a", "b", "c"], n_bootstrap=0)
    specificity = [result["per_class"][c]["specificity"]["value"] for c in "abc"]
    assert specificity == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert result["per_class"]["c"]["precision"]["value"] is None  # never predicted
    assert result["per_class"]["c"]["recall"]["value"] == 0.0


def test_weighted_engine_matches_sklearn_sample_weights():
    """The bootstrap computes every metric from per-image weights; check it on weights with zeros and ties."""
    rng = np.random.default_rng(3)
    y_true, y_prob = _fake_predictions(200, 4, seed=3)
    y_prob = np.round(y_prob, 1)  # many tied scores
    weights = rng.integers(0, 3, size=(200, 5)).astype(float)
    scores = metrics._scores(metrics.Weighted(weights, y_true, y_prob), None)
    y_pred = y_prob.argmax(axis=1)
    for b in range(weights.shape[1]):
        w = weights[:, b]
        assert scores["accuracy"][b] == pytest.approx(skm.accuracy_score(y_true, y_pred, sample_weight=w))
        assert scores["mcc"][b] == pytest.approx(skm.matthews_corrcoef(y_true, y_pred, sample_weight=w))
        assert scores["cohen_kappa"][b] == pytest.approx(
            skm.cohen_kappa_score(y_true, y_pred, sample_weight=w)
        )
        # Macro F1 averages the classes present (true or predicted) in the resample, as sklearn does.
        present = np.union1d(y_true[w > 0], y_pred[w > 0])
        assert scores["macro_f1"][b] == pytest.approx(
            skm.f1_score(y_true, y_pred, average="macro", sample_weight=w, labels=present)
        )
        for c in range(4):
            positive = y_true == c
            auc = skm.roc_auc_score(positive, y_prob[:, c], sample_weight=w)
            ap = skm.average_precision_score(positive, y_prob[:, c], sample_weight=w)
            assert scores["roc_auc"][b, c] == pytest.approx(auc)
            assert scores["average_precision"][b, c] == pytest.approx(ap)


def test_absent_class_and_single_predicted_class_give_null_not_nan():
    y_true = np.array([0, 1, 0, 1, 1])  # class "c" absent
    y_prob = np.tile([0.6, 0.3, 0.1], (5, 1))  # always predicts "a"
    result = metrics.classification_metrics(y_true, y_prob, ["a", "b", "c"], n_bootstrap=100)
    text = json.dumps(result, allow_nan=False)
    assert json.loads(text) == result
    absent = result["per_class"]["c"]
    assert absent["support"] == 0
    for name in ("recall", "f1", "roc_auc", "average_precision", "precision"):
        assert absent[name] == {"value": None, "ci_low": None, "ci_high": None}, name
    assert absent["specificity"]["value"] == 1.0
    assert result["per_class"]["b"]["precision"]["value"] is None
    assert result["per_class"]["b"]["recall"]["value"] == 0.0
    assert result["overall"]["accuracy"]["value"] == pytest.approx(0.4)
    assert result["overall"]["mcc"]["value"] == 0.0


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiny_samples_do_not_crash(n):
    y_true, y_prob = _fake_predictions(n, 3, seed=n)
    result = metrics.classification_metrics(y_true, y_prob, ["a", "b", "c"], n_bootstrap=50)
    json.dumps(result, allow_nan=False)
    json.dumps(metrics.flat_metrics(result), allow_nan=False)
    assert result["n"] == n


def test_bootstrap_ci_contains_point_and_is_deterministic(sample, result):
    y_true, y_prob = sample
    again = metrics.classification_metrics(y_true, y_prob, CLASSES, n_bootstrap=300, seed=7)
    assert again == result
    other = metrics.classification_metrics(y_true, y_prob, CLASSES, n_bootstrap=300, seed=8)
    assert other["overall"]["accuracy"]["ci_low"] != result["overall"]["accuracy"]["ci_low"]
    # ECE is biased upwards under resampling, so its interval may sit above the point estimate.
    entries = [v for k, v in result["overall"].items() if k not in ("n", "ece")]
    entries += [e for per in result["per_class"].values() for e in per.values() if isinstance(e, dict)]
    for entry in entries:
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
        assert entry["ci_high"] - entry["ci_low"] > 0


def test_no_bootstrap_gives_null_intervals(sample):
    y_true, y_prob = sample
    result = metrics.classification_metrics(y_true, y_prob, CLASSES, n_bootstrap=0)
    assert result["overall"]["accuracy"]["ci_low"] is None
    assert result["overall"]["accuracy"]["value"] is not None


def test_bad_inputs_raise():
    y_true, y_prob = _fake_predictions(10, 3)
    with pytest.raises(ValueError, match="classes"):
        metrics.classification_metrics(y_true, y_prob, ["a", "b"])
    with pytest.raises(ValueError, match="entries"):
        metrics.classification_metrics(y_true[:5], y_prob, ["a", "b", "c"])
    with pytest.raises(ValueError, match="outside"):
        metrics.classification_metrics(y_true + 3, y_prob, ["a", "b", "c"])


def test_flat_metrics(result):
    flat = metrics.flat_metrics(result)
    assert flat["accuracy"] == result["overall"]["accuracy"]["value"]
    assert flat["recall/basophil"] == result["per_class"]["basophil"]["recall"]["value"]
    assert flat["n"] == 300
    assert all(isinstance(v, int | float) and math.isfinite(v) for v in flat.values())
    with_calibration = {**result, "calibration": {"temperature": 1.5, "ece": 0.02}}
    assert metrics.flat_metrics(with_calibration)["calibration/temperature"] == 1.5


def test_flat_metrics_leaves_out_undefined():
    y_true = np.array([0, 0, 1])
    y_prob = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.2, 0.7, 0.1]])
    flat = metrics.flat_metrics(
        metrics.classification_metrics(y_true, y_prob, ["a", "b", "c"], n_bootstrap=10)
    )
    assert "recall/c" not in flat
    assert flat["specificity/c"] == 1.0


def test_softmax():
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, 0.0]])
    prob = calibration.softmax(logits)
    assert prob.sum(axis=1) == pytest.approx([1.0, 1.0])
    assert prob[1] == pytest.approx([0.5, 0.5, 0.0])
    assert calibration.softmax(logits + 7) == pytest.approx(prob)
    assert calibration.softmax(logits[:1], temperature=2.0) == pytest.approx(calibration.softmax(logits[:1] / 2))
    with pytest.raises(ValueError):
        calibration.softmax(logits, temperature=0.0)


def test_ece_by_hand():
    # 10 bins. Confidences 0.95 (right), 0.95 (wrong), 0.65 (right), 0.55 (wrong):
    # bin (0.9, 1]: accuracy 0.5, confidence 0.95, gap 0.45, share 2/4
    # bin (0.6, 0.7]: accuracy 1, confidence 0.65, gap 0.35, share 1/4
    # bin (0.5, 0.6]: accuracy 0, confidence 0.55, gap 0.55, share 1/4
    y_prob = np.array([[0.95, 0.05], [0.95, 0.05], [0.35, 0.65], [0.55, 0.45]])
    y_true = np.array([0, 1, 1, 1])
    expected = 0.5 * 0.45 + 0.25 * 0.35 + 0.25 * 0.55
    assert calibration.expected_calibration_error(y_true, y_prob, n_bins=10) == pytest.approx(expected)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert calibration.expected_calibration_error(np.array([0, 1]), perfect) == pytest.approx(0.0)


def test_fit_temperature_recovers_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(scale=2.0, size=(4000, 5))
    prob = calibration.softmax(true_logits)
    y_true = np.array([rng.choice(5, p=p) for p in prob])
    temperature = calibration.fit_temperature(true_logits * 2.5, y_true)
    assert temperature == pytest.approx(2.5, rel=0.1)
    nll = [
        skm.log_loss(y_true, calibration.softmax(true_logits * 2.5, t), labels=range(5))
        for t in (1.0, temperature)
    ]
    assert nll[1] < nll[0]


def test_fit_temperature_stays_in_bounds_on_separable_logits():
    y_true = np.array([0, 1, 2, 0])
    logits = np.eye(3)[y_true] * 50.0
    temperature = calibration.fit_temperature(logits, y_true)
    assert 0.05 <= temperature <= 20.0


def test_calibration_summary_is_finite():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 3)) * 4
    y_true = rng.integers(0, 3, 50)
    summary = calibration.calibration_summary(y_true, logits, 3.0)
    assert set(summary) == {"temperature", "ece", "ece_calibrated", "log_loss", "log_loss_calibrated"}
    assert summary["log_loss"] == pytest.approx(skm.log_loss(y_true, calibration.softmax(logits)))
    json.dumps(summary, allow_nan=False)


def test_most_confused_pairs():
    cm = [[5, 3, 0], [1, 4, 3], [0, 0, 2]]
    assert metrics.most_confused_pairs(cm, ["a", "b", "c"], top=2) == [("a", "b", 3), ("b", "c", 3)]
    assert metrics.most_confused_pairs(np.eye(3) * 4, ["a", "b", "c"]) == []


def _assert_png(path):
    assert path.is_file()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()


def test_write_figures_writes_valid_pngs(tmp_path):
    y_true, y_prob = _fake_predictions(60, len(CLASSES), seed=5)
    y_true[y_true == 3] = 0  # one class absent from the split
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "train_loss": [1.2, 0.9, 0.7],
            "val_loss": [1.3, 1.0, 0.9],
            "val_accuracy": [0.5, 0.6, 0.7],
            "val_macro_f1": [0.4, 0.55, 0.65],
            "lr": [1e-3, 5e-4, 1e-4],
        }
    )
    written = figures.write_figures(
        tmp_path, y_true, y_prob, CLASSES, history=history, y_prob_calibrated=y_prob**0.8
    )
    assert set(written) == {
        "confusion",
        "confusion_normalized",
        "roc",
        "pr",
        "reliability",
        "confused_pairs",
        "training_curves",
    }
    for path in written.values():
        _assert_png(path)


def test_confused_pairs_figure_without_errors(tmp_path):
    path = figures.plot_confused_pairs(np.eye(3, dtype=int) * 5, ["a", "b", "c"], tmp_path / "pairs.png")
    _assert_png(path)


def test_training_curves_require_columns(tmp_path):
    with pytest.raises(ValueError, match="val_macro_f1"):
        figures.plot_training_curves(pd.DataFrame({"epoch": [1]}), tmp_path / "x.png")


def test_figures_on_degenerate_data(tmp_path):
    y_true = np.zeros(3, dtype=int)  # one class only: no ROC curve is defined
    y_prob = np.tile([0.5, 0.3, 0.2], (3, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = figures.write_figures(tmp_path, y_true, y_prob, ["a", "b", "c"])
    for path in written.values():
        _assert_png(path)


def test_macro_f1_over_chosen_classes_matches_sklearn():
    # class "c" is absent but predicted once: by default its F1 of 0 pulls the macro F1 down
    y_true = np.array([0, 0, 1, 1, 1, 0])
    y_prob = np.eye(3)[[0, 2, 1, 1, 0, 0]] * 0.7 + 0.1
    default = metrics.classification_metrics(y_true, y_prob, ["a", "b", "c"], n_bootstrap=0)
    chosen = metrics.classification_metrics(y_true, y_prob, ["a", "b", "c"], n_bootstrap=200, macro_classes=[0, 1])
    y_pred = y_prob.argmax(axis=1)
    assert default["overall"]["macro_f1"]["value"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    assert chosen["overall"]["macro_f1"]["value"] == pytest.approx(
        skm.f1_score(y_true, y_pred, labels=[0, 1], average="macro")
    )
    assert chosen["overall"]["macro_f1"]["value"] > default["overall"]["macro_f1"]["value"]
    entry = chosen["overall"]["macro_f1"]
    assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
    assert chosen["overall"]["accuracy"] == metrics.classification_metrics(
        y_true, y_prob, ["a", "b", "c"], n_bootstrap=200)["overall"]["accuracy"]
    with pytest.raises(ValueError, match="macro_classes"):
        metrics.classification_metrics(y_true, y_prob, ["a", "b", "c"], macro_classes=[3])
