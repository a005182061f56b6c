"""`python -m softmaxlab.tracking.where` (the end of `make run`): where the runs are and how to
look at them."""

from __future__ import annotations

from softmaxlab.core.config import load_params, project_root
from softmaxlab.core.errors import UserError, fail
from softmaxlab.tracking.server import redact
from softmaxlab.tracking.tracker import connect


def main() -> None:
    """Print where the runs are and how to look at them (the end of `make run`)."""
    try:
        cfg = load_params(project_root() / "params.yaml")
        tracker = connect(cfg)
    except UserError as err:
        fail(str(err))
    if tracker is None:
        print("tracking is off (tracking.enabled: false)")
        return
    print(f"MLflow store: {redact(tracker.uri)}")
    print("Look at the runs: `make ui` (it prints the link to the runs table once the UI answers)")


if __name__ == "__main__":
    main()
