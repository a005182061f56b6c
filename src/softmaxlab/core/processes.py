"""Local server processes, for the team servers, the benchmarks and the tests that start them: a
free port on 127.0.0.1, and stopping a server started in its own process group
(`start_new_session=True`) together with everything it started, even when it does not exit on
its own.

Several agents and servers share these machines: a port is always asked of the kernel (bind
port 0), and only the group this process created is ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psutil

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def group_members(pgid: int) -> list[psutil.Process]:
    """The live processes of process group `pgid` (zombies have exited: they do not count)."""
    import psutil  # here: the stages import this module for restored_env alone

    members = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(OSError, psutil.Error):  # gone since the listing
            if (
                proc.info["status"] not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
                and os.getpgid(proc.pid) == pgid
            ):
                members.append(proc)
    return members


def _signal_group(pgid: int, sig: int) -> None:
    if group_members(pgid):  # someone lives in it: the group is still ours to signal
        with contextlib.suppress(ProcessLookupError):  # it exited just now
            os.killpg(pgid, sig)


def _group_gone(pgid: int, popen: subprocess.Popen | None, deadline: float | None) -> bool:
    """Wait until no process of group `pgid` lives (reaping its leader when it is our child),
    or until `deadline` (time.monotonic(); None: no limit). True if the group is gone."""
    while True:
        if popen is not None:
            popen.poll()
        else:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pgid, os.WNOHANG)  # our own child (the tests start the team stack in-process)
        if not group_members(pgid):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def stop_group(
    proc: subprocess.Popen | int, sig: int = signal.SIGTERM, timeout: float = 30.0
) -> tuple[bool, Any, Any]:
    """Send `sig` to the process group that `proc` leads (a Popen, or the leader's PID), give
    every process of the group `timeout` seconds to exit, then SIGKILL what is left of it.
    Returns (the whole group exited on `sig`, stdout, stderr), the output as
    `proc.communicate()` gives it (None where it was not piped, or given a PID)."""
    popen = proc if isinstance(proc, subprocess.Popen) else None
    pgid = popen.pid if popen is not None else proc
    deadline = time.monotonic() + timeout
    out: tuple[Any, Any] = (None, None)
    _signal_group(pgid, sig)
    try:
        if popen is not None:  # reads its pipes meanwhile, so a chatty leader cannot block
            out = popen.communicate(timeout=timeout)
        stopped = _group_gone(pgid, popen, deadline)
    except subprocess.TimeoutExpired:
        stopped = False
    if not stopped:
        _signal_group(pgid, signal.SIGKILL)
        if popen is not None and popen.returncode is None:  # communicate timed out: read the rest
            out = popen.communicate()
        _group_gone(pgid, popen, None)
    return stopped, *out


@contextlib.contextmanager
def restored_env(*names: str):
    """Environment variables `names` as they were before the block, whatever the block set or
    unset (for libraries that read or write settings in os.environ)."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
