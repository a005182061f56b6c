"""The team servers on 127.0.0.1 (PostgreSQL, Ceph radosgw, the MLflow server and its users) and
the DVC remote."""
