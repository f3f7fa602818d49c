"""``wbc promote``: the evaluated model becomes the one a lab should use, when it passes the gates.

The evaluate stage gives the version of the registered model it evaluated the alias ``candidate``
and links its test metrics to the logged model (MLflow model metrics). ``wbc promote`` reads those
metrics and moves the alias ``champion`` to that version when the test macro-F1 reaches
``promote.min_macro_f1`` and the recall of every class reaches ``promote.min_class_recall``;
otherwise it changes nothing and says which numbers failed. Serving and prediction then use
``models:/<name>@champion``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException

from pipeline import tracking
from pipeline.config import Params, PromoteParams
from pipeline.metrics import TEST_PREFIX, metric, per_class_key
from pipeline.registry import CANDIDATE, CHAMPION, logged_model_id


class PromotionRefused(RuntimeError):
    """The candidate failed a gate: the champion stays where it was."""


@dataclass(frozen=True)
class Gate:
    """One check of a test metric against its minimum."""

    what: str  # "macro-F1", "recall of monocyte"
    param: str  # the params key of the minimum
    value: float | None  # None: not measured (a class without test images)
    minimum: float

    @property
    def passed(self) -> bool:
        """Whether the value was measured and reaches the minimum."""
        return self.value is not None and math.isfinite(self.value) and self.value >= self.minimum

    def describe(self) -> str:
        """``macro-F1 0.9123 >= 0.8000 (promote.min_macro_f1)``, or why it failed."""
        if self.value is None or not math.isfinite(self.value):
            return f"{self.what} not measured (no test image) < {self.minimum:.4f} ({self.param})"
        sign = ">=" if self.passed else "<"
        return f"{self.what} {self.value:.4f} {sign} {self.minimum:.4f} ({self.param})"


@dataclass(frozen=True)
class Candidate:
    """A registered model version with the test metrics linked to its logged model."""

    name: str
    version: str
    model_id: str
    metrics: dict[str, float]  # keys of metrics.json (without the test_ prefix)
    dataset: str  # "<name> (digest <digest>)" of the data the metrics were measured on


def gates(metrics: dict[str, float], cfg: PromoteParams) -> list[Gate]:
    """The gates a model's test metrics face: macro-F1, then the recall of every class it was tested on
    (the classes of its ``support/<class>`` metrics)."""
    support = per_class_key("support", "")
    classes = sorted(key.removeprefix(support) for key in metrics if key.startswith(support))
    found = [Gate(metric("macro_f1").short, "promote.min_macro_f1", metrics.get("macro_f1"), cfg.min_macro_f1)]
    found += [Gate(f"{metric('recall').short} of {name}", "promote.min_class_recall",
                   metrics.get(per_class_key("recall", name)), cfg.min_class_recall) for name in classes]
    return found


def read_candidate(name: str, version: str | None = None) -> Candidate:
    """Version ``version`` of registered model ``name`` (default: the one with alias ``candidate``) and
    the test metrics linked to its logged model."""
    client = mlflow.MlflowClient()
    try:
        found = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name,
                                                                                                          CANDIDATE)
    except MlflowException as exc:
        which = f"version {version}" if version else f"a version with alias {CANDIDATE!r}"
        raise ValueError(f"registered model {name!r} has no {which} in {tracking.redact_uri(mlflow.get_tracking_uri())}"
                         f" (the evaluate stage sets {CANDIDATE!r}): {exc.message}") from None
    model_id = logged_model_id(found)
    if not model_id:
        raise ValueError(f"{name} version {found.version} has no logged model, so no model metrics to check")
    linked = [m for m in client.get_logged_model(model_id).metrics if m.key.startswith(TEST_PREFIX)]
    if not linked:
        raise ValueError(f"{name} version {found.version}: no test metrics are linked to its logged model "
                         f"{model_id}; run the evaluate stage (dvc repro) first")
    latest = {}
    for entry in sorted(linked, key=lambda m: (m.timestamp, m.step)):
        latest[entry.key.removeprefix(TEST_PREFIX)] = entry
    datasets = sorted({f"{m.dataset_name} (digest {m.dataset_digest})" for m in latest.values() if m.dataset_name})
    return Candidate(name, str(found.version), model_id, {key: m.value for key, m in latest.items()},
                     ", ".join(datasets) or "unnamed data")


def champion_version(name: str) -> str | None:
    """The version of ``name`` that has alias ``champion`` now, or None."""
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def run_promote(params: Params, version: str | None = None) -> dict:
    """Move alias ``champion`` of the registered model to ``version`` (default: the ``candidate``) when its
    test metrics pass ``params.promote``; raise :class:`PromotionRefused` naming every failing number
    otherwise. Returns what was checked and done."""
    name = params.tracking.registered_model
    if not name:
        raise ValueError("tracking.registered_model is empty: no registered model to promote")
    mlflow.set_tracking_uri(tracking.tracking_uri())
    candidate = read_candidate(name, version)
    checked = gates(candidate.metrics, params.promote)
    previous = champion_version(name)
    failing = [gate for gate in checked if not gate.passed]
    if failing:
        stays = f"version {previous}" if previous else "unset"
        raise PromotionRefused(
            f"{name} version {candidate.version} not promoted: "
            + "; ".join(gate.describe() for gate in failing)
            + f" (test data {candidate.dataset}); {CHAMPION!r} stays {stays}"
        )
    mlflow.MlflowClient().set_registered_model_alias(name, CHAMPION, candidate.version)
    return {"name": name, "version": candidate.version, "previous": previous, "model_id": candidate.model_id,
            "dataset": candidate.dataset, "gates": [gate.describe() for gate in checked]}
