"""MLflow at the edge: the store and its server, the run tracker, provenance, and sync."""
