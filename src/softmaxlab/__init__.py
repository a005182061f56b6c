"""softmaxlab: a reproducible DVC + Hydra + MLflow pipeline for Keras softmax classifiers. The layers, one
folder each, are drawn in docs/architecture.md."""
