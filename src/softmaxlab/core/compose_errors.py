"""Hydra's compose errors (a bad override, an unknown group option or key) as one line that
keeps the key, the value and what is allowed: used by the Hydra app and by a sweep's checks
of its jobs' overrides."""

from __future__ import annotations

import difflib
import re

from softmaxlab.core.config import unknown_key_error


def one_line(hydra_error: str) -> str:
    """Fold Hydra's compose error (message, OmegaConf details, available options, search
    path) into one line that keeps the key, the value and what is allowed."""
    keep, options, head = [], [], ""
    for line in hydra_error.splitlines():
        s = line.strip()
        skip = ("Set the environment variable", "reference_type", "object_type", "To append to your config")
        if not s or s.startswith(skip):
            continue
        if s.startswith("Config search path"):
            break
        if s.startswith("Available options"):
            head = s.rstrip(":").lower()
            continue
        (options if head else keep).append(s.rstrip("."))
    missing_key = re.search(r"Could not override '([^']+)'", hydra_error)
    if missing_key and "not in" in hydra_error:
        return str(unknown_key_error(missing_key.group(1)))
    missing_option = re.search(r"Could not find '([^']+)/([^'/]+)'", hydra_error)
    if missing_option and options:
        group, option = missing_option.groups()
        close = difflib.get_close_matches(option, options, n=1, cutoff=0.5)
        hint = f"did you mean `{group}={close[0]}`? " if close else ""
        return f"{group}={option}: no such option; {hint}choose one of {', '.join(options)}"
    msg = "; ".join(keep) or "bad command line"
    return msg + (f" ({head}: {', '.join(options)})" if options else "")
