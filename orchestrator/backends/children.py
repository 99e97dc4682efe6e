"""No orphans: the server processes an orchestrator starts do not outlive it.

Two mechanisms, because one is not enough:

1. **A parent-death signal.** Each server is started through a small launcher that asks the
   kernel (Linux ``prctl(PR_SET_PDEATHSIG)``) to send the server its stop signal when the
   orchestrator dies, even by SIGKILL, then ``exec``\\ s the server (same pid, same process
   group). Strictly, the kernel sends it when the *thread* that started the server exits: the
   event loop's thread, which lives as long as the orchestrator runs. The signal is not
   inherited: the server's own children (vLLM's engine processes) do not get it, and a server
   that ignores it lives on.
2. **A record, and reaping at the next start.** Every server started is written to a state
   file of its owner process (``<cache>/vram-orchestrator/run/owner-<pid>-<start>.json``,
   written atomically): its process group, its pid and start time, its stop signal and grace,
   and a random token that the server and all its descendants carry in their environment
   (``VRAM_ORCHESTRATOR_CHILD``). ``reap_orphans()``, called when an orchestrator (a daemon or
   a script) starts, reads every state file whose owner is dead and stops what is left of each
   server: its stop signal, its grace period (at most ``REAP_GRACE_S``), then SIGKILL; then
   it removes the file.

A process is only ever signalled when it is provably ours: the group's leader if its pid has
the recorded start time (field 22 of ``/proc/PID/stat``; a reused pid has another), and then
the members of its group (the group id is still the leader's); any other process only if its
environment carries the server's token. A file from before a reboot (another ``boot_id``)
names nothing alive and is removed. An owner is dead when its pid is gone or belongs to a
process with another start time.

Linux only (``/proc``); elsewhere servers still get their own process group and the stop at
shutdown, and ``reap_orphans`` does nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("orchestrator.children")

TOKEN_ENV = "VRAM_ORCHESTRATOR_CHILD"
REAP_GRACE_S = 5.0
POLL_S = 0.05
PROC = Path("/proc")

# The launcher: set the parent-death signal, make sure the parent did not die before that
# (then the signal would never come), and become the server. Run with ``python -I -S`` so it
# imports nothing but ctypes; ``exec`` keeps the pid, the session and the process group. The
# stop signal gets its default action back first: an ignored signal stays ignored across
# ``exec``, and a shell ignores SIGINT in the jobs it starts in the background, so a server
# started under one would never see a ``stop_signal: SIGINT`` (it would wait out its grace
# period and be killed).
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "sig, parent = int(sys.argv[1]), int(sys.argv[2])\n"
    "try:\n"
    "    signal.signal(sig, signal.SIG_DFL)\n"
    "except (OSError, ValueError):\n"
    "    pass  # SIGKILL, SIGSTOP: never ignored\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != parent:\n"
    "    sys.exit(f'vram-orchestrator: the orchestrator (pid {parent}) exited before this server started')\n"
    "os.execvp(sys.argv[3], sys.argv[3:])\n"
)


def supported() -> bool:
    return sys.platform.startswith("linux") and PROC.is_dir()


def guarded_command(argv: Sequence[str], death_signal: int) -> list[str]:
    """``argv`` started so that it gets ``death_signal`` when this process dies (Linux);
    ``argv`` unchanged elsewhere. ``argv[0]`` should be resolved already (``shutil.which``):
    the launcher cannot report a missing program as ``open_process`` does."""
    if not supported():
        return list(argv)
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(int(death_signal)), str(os.getpid()), *argv]


def new_token() -> str:
    return secrets.token_hex(16)


# -- /proc -------------------------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat``: when the process started, in clock ticks since boot.
    None when there is no such process (or it is a zombie)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # fields 3.. (the name may hold spaces)
    if len(fields) < 20 or fields[0] == "Z":
        return None
    return int(fields[19])


def boot_id() -> str:
    try:
        return (PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return ""


def carries(pid: int, token: str) -> bool:
    """Whether the process's environment holds ``VRAM_ORCHESTRATOR_CHILD=token``."""
    try:
        environ = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return False
    return f"{TOKEN_ENV}={token}".encode() in environ.split(b"\0")


def live_processes() -> Iterator[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every process that is not a zombie (Linux /proc;
    nothing elsewhere)."""
    try:
        entries = os.listdir(PROC)
    except OSError:
        return
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = (PROC / entry / "stat").read_text()
        except OSError:
            continue  # it exited meanwhile
        # after the command name in parentheses: state, ppid, pgrp, ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z":
            yield int(entry), int(fields[1]), int(fields[2])


# -- the record --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Child:
    """One server process an orchestrator started."""

    model: str
    pgid: int
    pid: int
    start_time: int
    token: str
    stop_signal: int = signal.SIGTERM  # what stops it, and how long it may take
    stop_grace_s: float = REAP_GRACE_S


def runtime_dir() -> Path:
    """Where owners' state files live: next to the logs, in the user's cache folder."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vram-orchestrator" / "run"


class ChildBook:
    """This process's servers, mirrored in its state file (one per owner process). Each server
    stays in the folder it was recorded in, whatever ``XDG_CACHE_HOME`` says later."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._children: dict[int, tuple[Path, Child]] = {}

    def add(
        self,
        model: str,
        pid: int,
        token: str,
        stop_signal: int = signal.SIGTERM,
        stop_grace_s: float = REAP_GRACE_S,
    ) -> None:
        """Record a server just started (blocking file IO: call it from a worker thread)."""
        if not supported():
            return
        started = start_time(pid)
        if started is None:
            return  # it exited already: nothing to reap
        child = Child(model, pid, pid, started, token, int(stop_signal), stop_grace_s)
        with self._lock:
            directory = runtime_dir()
            self._children[pid] = (directory, child)
            self._write(directory)

    def remove(self, pid: int) -> None:
        """Forget a server that was stopped and waited for."""
        with self._lock:
            entry = self._children.pop(pid, None)
            if entry is not None:
                self._write(entry[0])

    def _write(self, directory: Path) -> None:
        me = os.getpid()
        path = owner_path(directory, me, start_time(me) or 0)
        mine = [c for d, c in self._children.values() if d == directory]
        if not mine:
            with contextlib.suppress(OSError):
                path.unlink()
            return
        record = {
            "owner": {"pid": me, "start_time": start_time(me), "argv": sys.argv[:4]},
            "boot_id": boot_id(),
            "children": [asdict(c) for c in mine],
        }
        try:
            atomic_write(path, json.dumps(record, indent=1))
        except OSError as exc:
            logger.warning("cannot record the server processes in %s (%s): a kill -9 of this process "
                           "would leave them for the next start to find by hand", path, exc)  # fmt: skip


BOOK = ChildBook()


def owner_path(directory: Path, pid: int, started: int) -> Path:
    return directory / f"owner-{pid}-{started}.json"


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- reaping -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reaped:
    """What ``reap_orphans`` stopped: a dead owner's server group and its processes."""

    owner_pid: int
    model: str
    pgid: int
    pids: tuple[int, ...]
    killed: bool  # SIGKILL was needed (the stop signal was not enough)


def ours(child: Child) -> list[int]:
    """The live processes that provably belong to ``child``: its leader if the pid still has
    the recorded start time (then the group id is still its own, and every member of the group
    is ours too), and every process that carries its token (descendants, in the group or not)."""
    leader = start_time(child.pid) == child.start_time
    return [
        pid
        for pid, _, group in live_processes()
        if (leader and (pid == child.pid or group == child.pgid))
        or (pid != child.pid and carries(pid, child.token))
    ]


def _owner_alive(owner: dict[str, object]) -> bool:
    pid, started = owner.get("pid"), owner.get("start_time")
    if not isinstance(pid, int):
        return False
    return start_time(pid) == started and started is not None


def orphan_records(directory: Path | None = None) -> list[tuple[Path, dict[str, Any], list[Child]]]:
    """The state files whose owner is dead, with their owner and children. Quick (it reads a
    few small files and signals nothing): the orchestrator calls it at start, and only when
    there is something to reap does it run ``reap_orphans`` in a worker thread."""
    if not supported():
        return []
    directory = directory or runtime_dir()
    try:
        files = sorted(directory.glob("owner-*.json"))
    except OSError:
        return []
    found = []
    for path in files:
        try:
            record = json.loads(path.read_text())
            owner = record["owner"]
            children = [Child(**c) for c in record["children"]]
        except FileNotFoundError:
            continue  # its owner removed it meanwhile
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring the unreadable state file %s (%s); remove it by hand", path, exc)
            continue
        if not _owner_alive(owner):  # a running orchestrator's servers are not ours to touch
            found.append((path, record, children))
    return found


def reap_orphans(directory: Path | None = None, *, grace_s: float | None = None) -> list[Reaped]:
    """Stop the servers that owners which died (kill -9, a crash) left running, and remove
    their state files: each group gets its recorded stop signal, its stop grace (or
    ``grace_s``, at most ``REAP_GRACE_S``), then SIGKILL. Blocking: run it in a worker thread.
    Returns what it stopped (also logged)."""
    reaped: list[Reaped] = []
    this_boot = boot_id()
    for path, record, children in orphan_records(directory):
        owner = record["owner"]
        if record.get("boot_id") == this_boot:
            for child in children:
                grace = min(REAP_GRACE_S, child.stop_grace_s if grace_s is None else grace_s)
                result = _reap_one(child, int(owner.get("pid", 0)), grace)
                if result is not None:
                    reaped.append(result)
        with contextlib.suppress(OSError):
            path.unlink()
    return reaped


def _signal(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _reap_one(child: Child, owner_pid: int, grace_s: float) -> Reaped | None:
    pids = ours(child)
    if not pids:
        return None
    logger.warning(
        "stopping what a dead orchestrator (pid %d) left of %s's server: process group %d, pids %s",
        owner_pid, child.model, child.pgid, pids,
    )  # fmt: skip
    _signal(pids, child.stop_signal)
    deadline = time.monotonic() + grace_s
    while (left := ours(child)) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    killed = bool(left)
    deadline = time.monotonic() + 5.0
    while left and time.monotonic() < deadline:
        _signal(left, signal.SIGKILL)
        time.sleep(POLL_S)
        left = ours(child)
    if left:
        logger.error("could not stop %s (left by pid %d): %s still run", child.model, owner_pid, left)
    return Reaped(owner_pid, child.model, child.pgid, tuple(pids), killed)
