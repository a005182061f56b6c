"""Stage `check`: params.yaml is validated before any other stage touches an output.

`dvc repro` and `dvc exp run` remove a stage's outputs right before running it. Every stage
validates the config itself, but by then DVC has already removed that stage's outputs: a bad
value such as `-S optimizer.lr=-0.01` used to cost the model, predictions and reports. This
stage runs first (generate and train depend on its marker file) and writes nothing but that
marker, whose bytes never change: a valid config lets DVC go on exactly as if this stage
were not there, a bad one stops `dvc` before it touches the other stages' outputs.

It also says, at the moment it happens, how params.yaml differs from conf/'s defaults: after
`dvc exp run -S`, `dvc exp apply` or a hand edit (see docs/experiments.md, "The check stage").
"""

from __future__ import annotations

import os
from pathlib import Path

from softmaxlab.core.config import drift, load_params, project_root
from softmaxlab.core.errors import UserError, entry_point
from softmaxlab.core.io import write_text

MARKER_TEXT = "params.yaml passed softmaxlab's validation\n"
# Not `git checkout HEAD -- params.yaml`: after a failed `dvc exp run -S optimizer.lr=-0.01`
# it was seen to leave -0.01 in place, git's index holding the committed file's hash with the
# new file's size (0.001 and -0.01 are equally long) so that git took the file for unchanged.
# It depends on timing (git rehashes files changed within its index's timestamp); `git show`
# always writes the file.
RESTORE = (
    "stopped before any output was removed; fix params.yaml, or restore the committed one "
    "(`git show HEAD:params.yaml > params.yaml`)"
)


def drift_note(params: Path) -> str | None:
    """One line naming the values in params.yaml that differ from conf/'s defaults, or None."""
    changed = drift(params)
    if not changed:
        return None
    shown = ", ".join(f"{k}={v!r} (conf/: {d!r})" for k, v, d in changed[:6])
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    if os.environ.get("DVC_EXP_NAME"):
        return f"check: experiment {os.environ['DVC_EXP_NAME']} sets {shown}{more}"
    return (
        f"check: params.yaml differs from conf/'s defaults: {shown}{more}. The next `dvc exp run -S` "
        "recomposes params.yaml from conf/ and drops these; to keep them, `softmaxlab adopt` writes "
        "them into conf/"
    )


@entry_point
def main() -> None:
    params = project_root() / "params.yaml"
    try:
        cfg = load_params(params)
    except UserError as err:
        raise UserError(f"{err}; {RESTORE}") from err
    note = drift_note(params)
    if note:
        print(note)
    write_text(Path(cfg.paths.checked), MARKER_TEXT)


if __name__ == "__main__":
    main()
