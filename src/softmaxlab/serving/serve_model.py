"""The calibrated model a run logs and `make serve` serves: softmax(logits / T).

MLflow's "models from code": this file is copied into the logged model and executed when the
model loads, so it imports nothing from softmaxlab (a served model needs only MLflow, pandas,
NumPy and Keras). Its configuration comes from the model's `model_config` (in its MLmodel):
`temperature` (fitted on the validation split), `features` (input columns, in order) and
`classes` (one output column per class). Keras loads the `.keras` file in safe mode on
whatever backend is configured (KERAS_BACKEND), and each request calls the logits
sub-model directly: `model.predict` costs ~100 ms per call in setup alone.
"""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

KERAS_ARTIFACT = "keras_model"
PREDICTED_CLASS = "predicted_class"


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def bad_input(message: str) -> MlflowException:
    """MLflow's scoring server answers this with HTTP 400 and the message."""
    return MlflowException.invalid_parameter_value(message)


def check_features(frame: pd.DataFrame, features: list[str]) -> np.ndarray:
    """The feature columns as a float32 matrix, or one clear error. MLflow's schema
    enforcement (the signature) has already refused missing, misnamed and non-numeric
    columns; NaN, infinity and an empty frame get through it."""
    if len(frame) == 0:
        raise bad_input(f"no rows: send at least one row with columns {', '.join(features)}")
    x = frame[features].to_numpy(np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise bad_input(
            f"{features[col]} must be a finite number, got {x[row, col]} in row {row} "
            f"({int(bad.any(axis=1).sum())} of {len(x)} rows have NaN, null or infinite values)"
        )
    return x.astype(np.float32)


class CalibratedSoftmax(PythonModel):
    def load_context(self, context) -> None:
        import keras

        config = context.model_config
        self.temperature = float(config["temperature"])
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise MlflowException(f"model_config temperature={self.temperature} must be a positive number")
        self.features = list(config["features"])
        self.classes = list(config["classes"])
        # Safe mode: a .keras file that carries code (a Lambda layer) is refused, not run.
        model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], safe_mode=True)
        # inputs[0], not .input: a loaded Sequential has never been called and has no .input.
        self.logits = keras.Model(model.inputs[0], model.get_layer("logits").output)
        self._to_numpy = keras.ops.convert_to_numpy

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        x = check_features(model_input, self.features)
        logits = self._to_numpy(self.logits(x, training=False))
        probs = softmax(logits, self.temperature)
        out = pd.DataFrame(probs, columns=self.classes, index=model_input.index)
        out[PREDICTED_CLASS] = probs.argmax(axis=1).astype(np.int64)
        return out


mlflow.models.set_model(CalibratedSoftmax())
