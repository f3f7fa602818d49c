"""The trained model as an MLflow pyfunc model, for ``mlflow models serve`` and the registry.

Logged as MLflow "models from code": ``pyfunc_entry.py`` (this project's code, copied into the
model) builds :class:`WbcPyfuncModel`; the weights travel as the artifact ``model.pt`` and are read
with ``torch.load(weights_only=True)``, so loading the model unpickles nothing. The ``pipeline``
package is logged with the model (``code/``), so the served model runs the very code that
``wbc predict`` runs: same checks, decoding, resizing, temperature and threshold.

Input: a DataFrame with a column ``image`` (base64 of an image file's bytes) and/or ``path``.
The served model reads only what it is sent: a ``path`` row is refused (``path-not-allowed``)
unless the model was logged with ``predict.serve_path_root``, and then only a regular file that
resolves (symlinks and ``..`` followed) under that folder (relative paths are taken from it).
A request of more than ``predict.max_rows`` rows is refused row by row (``too-many-rows``), an
image of more than ``predict.max_image_bytes`` bytes (``too-large``) or ``predict.max_pixels``
pixels (``too-many-pixels``) before it is decoded. Output: one row per input row with ``status``
(``ok`` or the reason code the input was rejected with), ``detail`` (never the input's content),
one ``p_<class>`` column per class (calibrated probabilities), ``predicted``, ``top_probability``
and ``uncertain``.
"""

from __future__ import annotations

import base64
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import cv2
import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from pipeline.config import IngestParams, Params, PredictParams
from pipeline.inputs import ImageInput
from pipeline.predict import Predictor
from pipeline.registry import WEIGHTS_ARTIFACT

ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")
PACKAGE_DIR = Path(__file__).parent
# What the served model imports (pipeline.predict and what it imports), pinned to this environment.
SERVING_DISTRIBUTIONS = (
    "mlflow", "torch", "monai", "numpy", "pandas", "pillow", "opencv-python-headless", "scikit-learn", "scipy",
    "matplotlib", "pydantic", "pyyaml", "tqdm", "filelock",
)
# What the onnx engine adds: the exporter (run when the served model loads) and the runtime.
ONNX_DISTRIBUTIONS = ("onnx", "onnxscript", "onnxruntime")


def serving_requirements(engine: str = "torch") -> list[str]:
    """pip requirements of the served model running ``engine``: the installed versions of what it imports."""
    requirements = []
    for name in SERVING_DISTRIBUTIONS + (ONNX_DISTRIBUTIONS if engine in ("onnx", "auto") else ()):
        try:
            requirements.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            requirements.append(name)
    return requirements


def model_config(params: Params) -> dict[str, Any]:
    """What the served model needs besides its weights: prediction settings and input checks."""
    predict = params.predict.model_dump(mode="json")
    predict["workers"] = 0  # the server decodes in its request thread, no loader processes
    ingest = params.ingest.model_dump(mode="json", include={"min_side", "formats"})
    return {"predict": predict, "ingest": ingest}


def inputs_from_frame(frame: pd.DataFrame, path_root: str | None = None) -> list[ImageInput]:
    """The images of a request: per row, the ``image`` column (base64) when set, else ``path``,
    taken relative to ``path_root`` and confined to it when one is given."""
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"expected a DataFrame with an 'image' and/or 'path' column, got {type(frame).__name__}")
    if "image" not in frame.columns and "path" not in frame.columns:
        raise ValueError("the input needs an 'image' column (base64 of an image file) and/or a 'path' column; "
                         f"it has: {', '.join(map(str, frame.columns)) or 'no columns'}")

    def cell(row: Any, column: str) -> Any:
        value = getattr(row, column, None)
        return None if value is None or (isinstance(value, float) and np.isnan(value)) else value

    items = []
    for row in frame.itertuples(index=False):
        image, path = cell(row, "image"), cell(row, "path")
        path = str(path) if path is not None and str(path) else None
        file = os.path.join(path_root, path) if path and path_root else path
        items.append(ImageInput(path or "", path=file, image_b64=image, root=path_root))
    return items


def served_path_root(settings: PredictParams) -> str | None:
    """``predict.serve_path_root`` as an absolute folder (relative to where the server runs), or None."""
    if settings.serve_path_root is None:
        return None
    root = os.path.realpath(settings.serve_path_root)
    if not os.path.isdir(root):
        raise ValueError(f"predict.serve_path_root: {settings.serve_path_root} is not a folder on this machine")
    return root


class WbcPyfuncModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around :class:`pipeline.predict.Predictor`."""

    def load_context(self, context) -> None:
        config = context.model_config or {}
        settings = PredictParams(**config.get("predict", {}))
        checks = IngestParams(**config.get("ingest", {}))
        self.path_root = served_path_root(settings)
        self.predictor = Predictor.load(context.artifacts[WEIGHTS_ARTIFACT], settings, checks,
                                        read_paths=self.path_root is not None)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """``model_input``: DataFrame with ``image`` (base64) and/or ``path``; returns a DataFrame.
        Request ``params`` are ignored: no client can widen the limits the model was logged with."""
        items = inputs_from_frame(model_input, self.path_root)
        limit = self.predictor.settings.max_rows
        if len(items) > limit:
            table = self.predictor.refused([item.name for item in items], "too-many-rows",
                                           f"the request has {len(items)} rows; predict.max_rows allows {limit}")
        else:
            table = self.predictor.predict(items)
        # Missing values (the probabilities of a rejected row) as None, so responses are valid JSON (null, not NaN).
        return table.astype(object).where(table.notna(), None)


def signature(classes: list[str]) -> ModelSignature:
    """Input: optional ``image`` and ``path`` strings. Output: status, probabilities, prediction."""
    inputs = Schema([ColSpec("string", "image", required=False), ColSpec("string", "path", required=False)])
    outputs = Schema([
        ColSpec("string", "path"),
        ColSpec("string", "status"),
        ColSpec("string", "detail"),
        *(ColSpec("double", f"p_{name}") for name in classes),
        ColSpec("string", "predicted", required=False),
        ColSpec("double", "top_probability", required=False),
        ColSpec("boolean", "uncertain", required=False),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs)


def encode_png(image: np.ndarray) -> str:
    """Base64 of an RGB uint8 image encoded as PNG (the request format of the served model)."""
    ok, png = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("could not encode the example image as PNG")
    return base64.b64encode(png.tobytes()).decode("ascii")


def log_pyfunc_model(model_path: Path, params: Params, classes: list[str], example_image: np.ndarray,
                     registered_model: str | None = None):
    """Log ``model_path`` as the pyfunc model ``model`` of the active run (registered under
    ``registered_model`` when given); return MLflow's ``ModelInfo``."""
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(ENTRY_FILE),
        artifacts={WEIGHTS_ARTIFACT: str(model_path)},
        model_config=model_config(params),
        code_paths=[str(PACKAGE_DIR)],
        pip_requirements=serving_requirements(params.predict.engine),
        signature=signature(classes),
        input_example=pd.DataFrame({"image": [encode_png(example_image)]}),
        registered_model_name=registered_model or None,
    )
