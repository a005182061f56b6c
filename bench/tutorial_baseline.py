"""The tutorial's script ("How to use softmax for multiclass classification with Keras"),
modernised only where Keras 3 and NumPy 2 force it:

* ``keras.optimizers.adam(lr=0.001)``  ->  ``keras.optimizers.Adam(learning_rate=0.001)``
* ``np.integer`` (abstract, no longer a dtype) -> ``np.int64``

The tutorial's lines are kept as they were written (``# fmt: off``, import order included).
Measurement-only additions, all opt-in through environment variables; with none of them set
the script does exactly what the original does (random data, 1,000 samples, 30 epochs,
batch 5, verbose=1):

* ``TUTORIAL_SEED``        random_state passed to make_blobs (default: None, as in the original)
* ``TUTORIAL_N_SAMPLES``   num_samples_total (default 1000)
* ``TUTORIAL_N_TEST``      training_split, the first n samples kept for testing (default 250)
* ``TUTORIAL_EPOCHS``      epochs (default 30)
* ``TUTORIAL_BATCH_SIZE``  batch_size (default 5)
* ``TUTORIAL_VERBOSE``     verbose for fit/evaluate (default 1)
* ``TUTORIAL_BENCH=1``     print one line ``BENCH {json}`` with the wall time of model.fit
                           (time.perf_counter around it) and the test accuracy
"""

# ruff: noqa: I001
# fmt: off
import json
import os
import time

# ---- the tutorial, line by line --------------------------------------------------------
import keras
from keras.models import Sequential
from keras.layers import Dense
from keras.utils import to_categorical
import matplotlib.pyplot as plt  # noqa: F401  (imported by the original, unused there too)
import numpy as np
from sklearn.datasets import make_blobs
_env, _seed, _verbose = os.environ.get, os.environ.get("TUTORIAL_SEED"), int(os.environ.get("TUTORIAL_VERBOSE", "1"))
num_samples_total = int(_env("TUTORIAL_N_SAMPLES", "1000"))
training_split = int(_env("TUTORIAL_N_TEST", "250"))
cluster_centers = [(15,0), (15,15), (0,15), (30,15)]
num_classes = len(cluster_centers)
loss_function_used = 'categorical_crossentropy'
X, targets = make_blobs(n_samples = num_samples_total, centers = cluster_centers, n_features = num_classes, center_box=(0, 1), cluster_std = 1.5,
                        random_state = None if _seed is None else int(_seed))
categorical_targets = to_categorical(targets)
X_training = X[training_split:, :]
X_testing = X[:training_split, :]
Targets_training = categorical_targets[training_split:]
Targets_testing = categorical_targets[:training_split].astype(np.int64)
feature_vector_length = len(X_training[0])
input_shape = (feature_vector_length,)
print(f'Feature shape: {input_shape}')
model = Sequential()
model.add(Dense(12, input_shape=input_shape, activation='relu', kernel_initializer='he_uniform'))
model.add(Dense(8, activation='relu', kernel_initializer='he_uniform'))
model.add(Dense(num_classes, activation='softmax'))
model.compile(loss=loss_function_used, optimizer=keras.optimizers.Adam(learning_rate=0.001), metrics=['accuracy'])
_fit_start = time.perf_counter()
history = model.fit(X_training, Targets_training, epochs=int(_env("TUTORIAL_EPOCHS", "30")), batch_size=int(_env("TUTORIAL_BATCH_SIZE", "5")), verbose=_verbose, validation_split=0.2)
_fit_seconds = time.perf_counter() - _fit_start
test_results = model.evaluate(X_testing, Targets_testing, verbose=_verbose)
print(f'Test results - Loss: {test_results[0]} - Accuracy: {test_results[1]*100}%')
# ---- end of the tutorial ----------------------------------------------------------------

if _env("TUTORIAL_BENCH") == "1":
    print("BENCH " + json.dumps({"fit_seconds": _fit_seconds, "test_accuracy": float(test_results[1]),
                                 "test_loss": float(test_results[0]), "n_samples": num_samples_total}))
# fmt: on
