"""The DVC stages (check, generate, train, evaluate, report), their figures, and the same stages
in-process for the Hydra app."""
