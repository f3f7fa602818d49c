"""The MLflow model registry: aliases of the registered model and registry URIs as model files.

The evaluate stage gives the model it evaluated the alias ``candidate``; ``wbc promote`` moves
``champion`` to it when its test metrics pass the gates in ``params.yaml``. Anything that takes a
model file (``wbc predict --model``) also takes a registry URI such as
``models:/wbc-classifier@champion``: the model is downloaded from the tracking store and its
weights read like a local ``model.pt``. MLflow is imported only when a registry is used.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CANDIDATE = "candidate"  # the model the evaluate stage evaluated last
CHAMPION = "champion"  # the model a lab should use: promoted by `wbc promote` when it passes the gates
MODEL_URI_SCHEME = "models:/"
WEIGHTS_ARTIFACT = "weights"  # the artifact of the logged pyfunc model holding model.pt (pipeline.serving)


def is_model_uri(model: str | Path) -> bool:
    """Whether ``model`` names a registered or logged MLflow model (``models:/NAME@ALIAS``,
    ``models:/NAME/VERSION``, ``models:/m-<id>``) rather than a file."""
    return str(model).startswith(MODEL_URI_SCHEME)


def set_alias(run_info: dict, alias: str) -> str | None:
    """Point ``alias`` of the registered model in ``run_info`` (``run.json`` of the train stage) at
    the version that run registered; return that version, or None when the model was not registered."""
    import mlflow

    name, version = run_info.get("registered_model"), run_info.get("registered_model_version")
    if not name or not version:
        return None
    mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version))
    return str(version)


def logged_model_id(version) -> str | None:
    """The id of the logged model behind a registered ``version`` (an MLflow ``ModelVersion``): its
    ``model_id`` where the store keeps one, else read from its source, which MLflow 3 sets to
    ``models:/<model id>`` when it registers a logged model (SQL stores keep only that)."""
    if version.model_id:
        return version.model_id
    source = str(version.source or "")
    model_id = source.removeprefix(MODEL_URI_SCHEME)
    return model_id if source.startswith(MODEL_URI_SCHEME) and model_id and not {"/", "@"} & set(model_id) else None


@contextmanager
def local_model_file(model: str | Path) -> Iterator[Path]:
    """``model`` as a local weights file while the block runs: a path as it is, a ``models:/`` URI
    downloaded from the tracking store (``MLFLOW_TRACKING_URI`` or the project's) into a temporary
    folder that is removed afterwards."""
    if not is_model_uri(model):
        yield Path(model)
        return
    import mlflow
    from mlflow.models import Model

    from pipeline import tracking

    uri = str(model)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    with tempfile.TemporaryDirectory(prefix="wbc-model-") as folder:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder))
        artifacts = Model.load(local).flavors.get("python_function", {}).get("artifacts", {})
        if WEIGHTS_ARTIFACT not in artifacts:
            raise ValueError(f"{uri} is not a model logged by the train stage: it has no {WEIGHTS_ARTIFACT!r} "
                             "artifact")
        yield local / artifacts[WEIGHTS_ARTIFACT]["path"]
