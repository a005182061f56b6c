"""Local server processes, for the benchmarks and the tests that start them: a free port on
127.0.0.1, and stopping a server started in its own process group (`start_new_session=True`)
together with everything it started, even when it does not exit on its own.

Several agents and servers share these machines: a port is always asked of the kernel (bind
port 0), and only the group this process created is ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from typing import Any

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def stop_group(
    proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0
) -> tuple[bool, Any, Any]:
    """Send `sig` to the process group that `proc` leads, give it `timeout` seconds, then
    SIGKILL the group. Returns (exited on `sig`, stdout, stderr), the output as
    `proc.communicate()` gives it (None where it was not piped)."""
    if proc.poll() is None:  # the leader is alive: the group is still ours to signal
        os.killpg(proc.pid, sig)
    try:
        return True, *proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # it exited just now
            os.killpg(proc.pid, signal.SIGKILL)
        return False, *proc.communicate()


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
