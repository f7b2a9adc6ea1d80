"""The MLflow model of a run: a trained model folder behind ``mlflow.pyfunc``.

Logged as an MLflow "model from code": MLflow runs this file to build the model when it loads
it (``mlflow.pyfunc.load_model``, ``mlflow models serve``), with this package on the path
(``code_paths``), so nothing is pickled. A python model rather than ``mlflow.transformers``:
that flavour answers with the top class's score only, and cannot load the pooled head.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

from pipeline.inference import MLFLOW_ARTIFACT, TEXT, TEXT_PAIR, Classifier


class TextClassifierModel(PythonModel):
    """Rows with ``text`` (and ``text_pair``) in; per row the label and every class's
    probability (or the regression score) out: the inference command's records."""

    def load_context(self, context):
        self.classifier = Classifier(context.artifacts[MLFLOW_ARTIFACT])

    def predict(self, context, model_input, params=None):
        rows = model_input.to_dict(orient="records") if hasattr(model_input, "to_dict") \
            else list(model_input)
        # v == v drops the NaN pandas puts where a row has no pair
        rows = [{k: v for k, v in row.items() if k in (TEXT, TEXT_PAIR) and v == v}
                for row in rows]
        return [{k: v for k, v in record.items() if k not in (TEXT, TEXT_PAIR)}
                for record in self.classifier.predict(rows)]


mlflow.models.set_model(TextClassifierModel())
