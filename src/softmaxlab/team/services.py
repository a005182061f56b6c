"""The team's server processes: each started in the foreground of its own session (so its whole
group can be stopped) with its output in logs/<name>.log, its PID and start time in
pids/<name>.pid (a reused PID is not ours), waited for until it answers, and its memory. Also
the helper commands they need, each failing with one line."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import psutil

from softmaxlab.core.errors import UserError
from softmaxlab.core.probe import http_status
from softmaxlab.core.processes import group_members
from softmaxlab.team.state import HOST, State, port_variable


def start_ticks(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (what pids/<name>.pid keeps: it
    tells a reused PID apart); None if it is gone or a zombie. psutil's start time is boot time
    plus those ticks, and the boot time moves with the clock: the ticks do not."""
    try:
        proc = psutil.Process(pid)
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        since_boot = proc.create_time() - psutil.boot_time()
    except psutil.Error:
        return None
    return str(round(since_boot * os.sysconf("SC_CLK_TCK")))


def record(state: State, name: str, pid: int) -> None:
    state.path("pids").mkdir(exist_ok=True)
    state.path("pids", f"{name}.pid").write_text(f"{pid} {start_ticks(pid)}\n")


def running_pid(state: State, name: str) -> int | None:
    """The PID of our service `name` if that very process still runs (same PID and start time)."""
    try:
        pid, started = state.path("pids", f"{name}.pid").read_text().split()
    except (OSError, ValueError):
        return None
    return int(pid) if start_ticks(int(pid)) == started else None


def spawn(state: State, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    """Start a foreground server in its own session (so down can stop its whole group), its
    output appended to logs/<name>.log."""
    state.path("logs").mkdir(exist_ok=True)
    with open(state.path("logs", f"{name}.log"), "ab") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env=env, cwd=state.dir,
        )  # fmt: skip
    record(state, name, proc.pid)
    return proc


def rss_mb(pid: int | None) -> float:
    """Resident memory of `pid`, its process group and its descendants (PostgreSQL's backends
    each lead their own group)."""
    if not pid or not start_ticks(pid):
        return 0.0
    try:
        keep = {psutil.Process(pid), *group_members(os.getpgid(pid))}
    except (OSError, psutil.Error):
        return 0.0
    for proc in list(keep):
        try:
            keep.update(proc.children(recursive=True))
        except psutil.Error:
            continue
    total = 0
    for proc in keep:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def last_lines(path: Path) -> str:
    """What a server's log says went wrong: its last exception line, else its last line."""
    try:
        lines = [s.strip() for s in path.read_text(errors="replace").splitlines() if s.strip()]
    except OSError:
        return "no log"
    errors = [s for s in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", s)]
    return f"{(errors or lines or ['empty log'])[-1]} (log: {path})"


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((HOST, port)) == 0


def http_answers(url: str, timeout: float = 3) -> bool:
    """Any HTTP answer counts (radosgw says 403/200, an auth server 401)."""
    return isinstance(http_status(url, timeout), int)


def wait(what: str, ready, proc: subprocess.Popen | None, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise UserError(f"{what} stopped (exit code {proc.returncode}) while starting: {last_lines(log)}")
        if time.monotonic() > deadline:
            raise UserError(f"{what} did not answer within {timeout:.0f} s: {last_lines(log)}")
        time.sleep(0.3)


def failed(what: str, proc: subprocess.CompletedProcess) -> UserError:
    """`what` failed: its exit code and the last line it printed."""
    last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
    return UserError(f"{what} failed (exit code {proc.returncode}): {last}")


def run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise failed(what, proc)
    return proc


def check_port_free(state: State, name: str) -> None:
    if port_open(state.ports[name]):
        raise UserError(
            f"port {state.ports[name]} ({name}) is taken by another program: "
            f"choose another with {port_variable(name)}=N"
        )
