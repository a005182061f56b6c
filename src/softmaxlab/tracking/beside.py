"""The train stage's MLflow work in a process of its own, beside training.

Importing MLflow and opening its store take the train stage ~4-7 s (more for a new sqlite
store, which runs its schema migrations), and importing Keras on TensorFlow ~5 s: one after
the other they were most of the stage. A process forked before either import does the MLflow
half: it imports MLflow, connects (tracker.connect: the fallback, the refusals), opens the
run and records what is sent to it, in order, while this process imports Keras and trains.

    with beside(cfg) as tracker:          # forked here; the run opens over there
        keras_for(cfg)                    # meanwhile
        run_id = tracker.run_id()         # waits: a refused login stops the stage here
        ...tracker.set_tags / log_data / log_training, as on a Tracker...

Leaving the block waits until the run is recorded and closed as Tracker.run closes it
(pending the later stages; FAILED with the error, or KILLED on Ctrl-C, if the block raised).
A failure over there is raised here as itself (a refusal stays one line). The worker ignores
Ctrl-C: this process answers it and then has the run closed KILLED.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import types
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from softmaxlab.core.config import Config

# The worker's state: its Tracker and the open run's context.
_worker: dict[str, Any] = {}


def _open(cfg: Config) -> tuple[str, str, str] | None:
    from softmaxlab.tracking.tracker import connect, maybe_run

    tracker = connect(cfg)
    if tracker is None:
        return None
    stack = contextlib.ExitStack()
    run_id = stack.enter_context(maybe_run(tracker, cfg))
    _worker.update(tracker=tracker, stack=stack)
    return run_id, tracker.experiment_id, tracker.uri


def _call(method: str, *args) -> None:
    getattr(_worker["tracker"], method)(*args)


def _close(error: str | None, interrupted: bool) -> None:
    stack = _worker.pop("stack")
    if interrupted:
        err: BaseException | None = KeyboardInterrupt()
    else:
        err = RuntimeError(error) if error is not None else None
    if err is None:
        stack.close()
    else:
        stack.__exit__(type(err), err, None)  # Tracker.run records it; its re-raise stays here


class Beside:
    """A Tracker's methods for the train stage, carried out in order by the worker."""

    def __init__(self, pool: ProcessPoolExecutor, cfg: Config):
        self._pool = pool
        self._opened = pool.submit(_open, cfg)
        self._sent: list = []

    def run_id(self) -> str | None:
        """The open run's id (None with tracking off); raises what opening it raised."""
        opened = self._opened.result()
        return opened[0] if opened else None

    @property
    def experiment_id(self) -> str:
        return self._opened.result()[1]

    @property
    def uri(self) -> str:
        return self._opened.result()[2]

    def _send(self, method: str, *args) -> None:
        self._sent.append(self._pool.submit(_call, method, *args))

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self._send("set_tags", run_id, tags)

    def log_data(self, run_id: str, cfg: Config, root, frames: dict[str, Any]) -> None:
        self._send("log_data", run_id, cfg, root, frames)

    def log_training(self, run_id: str, result: Any, cfg: Config) -> None:
        # What log_training reads, without the model (a Keras model does not cross processes).
        sent = types.SimpleNamespace(
            history=result.history, train_seconds=result.train_seconds, device=result.device,
            backend=result.backend, info=result.info,
        )  # fmt: skip
        self._send("log_training", run_id, sent, cfg)

    def _finish(self, error: BaseException | None) -> None:
        """Wait for everything sent; close the run with the first failure (ours or the
        worker's), or as finished. Raises the worker's failure if we had none."""
        failure = None
        for future in self._sent:
            if failure is None and (exc := future.exception()) is not None:
                failure = exc
        if self._opened.exception() is not None or self.run_id() is None:
            return
        first = error or failure
        self._pool.submit(
            _close, None if first is None else str(first).strip() or type(first).__name__,
            isinstance(first, KeyboardInterrupt),
        ).result()  # fmt: skip
        if error is None and failure is not None:
            raise failure


@contextlib.contextmanager
def beside(cfg: Config) -> Iterator[Beside]:
    # Forked, not spawned: nothing heavy is imported yet, and the worker needs nothing
    # re-imported. It ignores Ctrl-C (see the module's docstring).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context(method),
        initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN),
    ) as pool:  # fmt: skip
        tracker = Beside(pool, cfg)
        try:
            yield tracker
        except BaseException as err:
            tracker._finish(err)
            raise
        tracker._finish(None)
