"""MLflow "models from code" entry point of the logged WBC classifier (see pipeline/serving.py).

MLflow runs this file when it loads the model; it defines no weights itself: they arrive as the
model's ``weights`` artifact and :class:`~pipeline.serving.WbcPyfuncModel` reads them with
``torch.load(weights_only=True)``.
"""

import mlflow

from pipeline.serving import WbcPyfuncModel

mlflow.models.set_model(WbcPyfuncModel())
