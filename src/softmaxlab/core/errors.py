"""User errors: one clear line on stderr and exit code 2, never a traceback.

A traceback is for bugs. Set SOFTMAXLAB_DEBUG=1 to get one for user errors too.
"""

from __future__ import annotations

import atexit
import functools
import gc
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from softmaxlab.core import timing

EXIT_USER_ERROR = 2
F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """Bad input the user can fix: config, data file, environment."""


def first_line(err: BaseException | str) -> str:
    """The first line of an error's message (or of a text), or the error's type when it has none:
    what a one-line report of a library's multi-line error shows."""
    text = str(err).strip()
    if text:
        return text.splitlines()[0]
    return type(err).__name__ if isinstance(err, BaseException) else ""


def debug() -> bool:
    return os.environ.get("SOFTMAXLAB_DEBUG", "").lower() in ("1", "true", "yes")


def fail(message: str) -> None:
    print(f"softmaxlab: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def quick_exit() -> None:
    """Let this process end without the garbage collector walking every object it holds.

    At exit the interpreter collects garbage again and again while it clears its modules:
    2.2 s after importing Keras and TensorFlow, 0.7 s after MLflow, paid by every stage and
    every `softmaxlab` command. Registered before the work's imports, gc.freeze() runs after
    their exit handlers (atexit is last-in first-out) and moves what exists then out of the
    collector's sight: objects are still freed as their references go, and whatever is made
    later is collected as usual."""
    atexit.register(gc.freeze)


def entry_point(fn: F) -> F:
    """Wrap a stage's main(): user errors print one line and exit 2; Ctrl-C exits 130; the
    process ends quickly (quick_exit)."""
    quick_exit()

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # Run as `python -m softmaxlab.stages.<stage>`, the module is __main__: name it by its spec.
        spec = getattr(sys.modules.get(fn.__module__), "__spec__", None)
        timing.stage_started((spec.name if spec else fn.__module__).rpartition(".")[2])
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            if debug():
                raise
            fail(str(err))
        except KeyboardInterrupt:
            print("softmaxlab: interrupted", file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapper
