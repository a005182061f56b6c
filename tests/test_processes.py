"""softmaxlab.core.processes: what the benchmarks and the server tests use to stop what they start."""

from __future__ import annotations

import signal
import subprocess
import time

from softmaxlab.core.processes import stop_group

# A shell that ignores SIGTERM and SIGINT and has a child of its own (which leaves the
# shell's group only if someone moves it: it does not), printing the child's PID.
STUBBORN = 'trap "" TERM INT; sleep 300 & echo $!; wait'


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def gone(pid: int) -> bool:
    """True once `pid` has exited: SIGKILL is delivered asynchronously (a guard, not a timing)."""
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_a_group_that_ignores_the_signal_is_killed_after_the_timeout_children_included():
    proc = subprocess.Popen(
        ["bash", "-c", STUBBORN], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    child = int(proc.stdout.readline())
    assert alive(child)
    stopped, out, _ = stop_group(proc, signal.SIGTERM, timeout=1)
    assert not stopped and proc.returncode == -signal.SIGKILL
    assert gone(child)


def test_a_group_that_stops_on_the_signal_returns_its_output():
    proc = subprocess.Popen(
        ["bash", "-c", 'trap "echo bye; exit 3" INT; echo hi; while :; do sleep 0.1; done'],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout.readline() == "hi\n"
    stopped, out, err = stop_group(proc, signal.SIGINT, timeout=60)
    assert stopped and proc.returncode == 3 and out == "bye\n" and err is None


def test_given_the_leaders_pid_a_child_that_outlives_its_leader_is_killed_too():
    # The leader exits on SIGTERM; its child ignores it (an ignored signal stays ignored across
    # exec) and stays in the group: the team servers are stopped this way, by PID.
    proc = subprocess.Popen(
        ["bash", "-c", '(trap "" TERM; exec sleep 300) & echo $!; wait'],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    child = int(proc.stdout.readline())
    assert alive(child)
    assert stop_group(proc.pid, signal.SIGTERM, timeout=1) == (False, None, None)
    assert gone(child) and not alive(proc.pid)
