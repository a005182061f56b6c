"""The command line: the entry point, the Hydra app, and the ui and adopt commands."""
