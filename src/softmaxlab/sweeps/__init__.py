"""Hydra sweeps: the callback that opens a parent run, checks jobs, summarises them and records
failed ones, and the settings of the cluster launchers."""
