"""Where a stage process's seconds go, for bench/stages.py: off unless SOFTMAXLAB_TIMINGS
names a file.

Off, `phase` does nothing and nothing is written. On, each stage process appends one JSON
line to that file when it exits: when the process was created, when its main() began and
when it ended, the seconds spent inside imports after this module loaded (outermost import
statements only, by top-level package), inside each named phase (imports made inside a phase
count as imports, not as the phase), and the peak RSS. The bench lines these up with
`dvc repro`'s own start and end: what lies between one stage's exit and the next one's
creation is DVC's.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import resource
import sys
import time

ENV = "SOFTMAXLAB_TIMINGS"

_imports: dict[str, float] = {}
_phases: dict[str, float] = {}
_depth = 0


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def _import_total() -> float:
    return sum(_imports.values())


def _timed_import(original):
    def timed(name, globals=None, locals=None, fromlist=(), level=0):
        global _depth
        if _depth or level or name in sys.modules:  # nested, relative or already loaded: not ours to time
            return original(name, globals, locals, fromlist, level)
        _depth += 1
        start = time.perf_counter()
        try:
            return original(name, globals, locals, fromlist, level)
        finally:
            _depth -= 1
            top = name.partition(".")[0]
            _imports[top] = _imports.get(top, 0.0) + time.perf_counter() - start

    return timed


_nested: list[float] = []  # per open phase: the seconds of the phases inside it


@contextlib.contextmanager
def phase(name: str):
    """Count the block's seconds under `name`, less the imports it made and the phases
    inside it (each counted under its own name)."""
    if not enabled():
        yield
        return
    start, imported = time.perf_counter(), _import_total()
    _nested.append(0.0)
    try:
        yield
    finally:
        inclusive = time.perf_counter() - start - (_import_total() - imported)
        inner = _nested.pop()
        _phases[name] = _phases.get(name, 0.0) + inclusive - inner
        if _nested:
            _nested[-1] += inclusive


@contextlib.contextmanager
def edges(context, name: str):
    """Enter and leave `context` (a context manager), counting only its entry and exit under
    `name`: an MLflow run's opening and closing, not the work done inside it."""
    with phase(name):
        value = context.__enter__()
    try:
        yield value
    except BaseException:
        with phase(name):
            if not context.__exit__(*sys.exc_info()):
                raise
    else:
        with phase(name):
            context.__exit__(None, None, None)


def stage_started(stage: str) -> None:
    """Called as a stage's main() begins: the line is written when the process exits."""
    if not enabled():
        return
    import atexit

    atexit.register(_write, stage, time.time())


def _created() -> float:
    """When this process was created, to 10 ms. psutil's create_time adds the start tick to a
    boot time rounded to whole seconds: up to a second off, as much as a small stage takes."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as up:
            ticks = int(stat.read().rpartition(")")[2].split()[19])  # field 22, starttime
            uptime = float(up.read().split()[0])
    except OSError:  # not Linux
        import psutil

        return psutil.Process().create_time()
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def _write(stage: str, main_at: float) -> None:
    record = {
        "stage": stage,
        "pid": os.getpid(),
        "created": _created(),
        "main": main_at,
        "exit": time.time(),
        "imports": {k: round(v, 4) for k, v in sorted(_imports.items(), key=lambda kv: -kv[1])},
        "phases": {k: round(v, 4) for k, v in _phases.items()},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    with open(os.environ[ENV], "a") as out:  # one short line per process: appends don't interleave
        out.write(json.dumps(record) + "\n")


if enabled() and not getattr(builtins.__import__, "_softmaxlab_timed", False):
    builtins.__import__ = _timed_import(builtins.__import__)
    builtins.__import__._softmaxlab_timed = True
