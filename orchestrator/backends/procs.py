"""The processes of a program the orchestrator cooperates with, read from Linux ``/proc``:
who listens on a port, a process and everything below it, a command line. The cooperative
backends use them to find a program's pids, whose memory the device reports per process."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from orchestrator.backends.server import live_processes


def listening_pid(host: str, port: int, hint: int | None = None) -> int | None:
    """The pid of the process listening on TCP ``port`` of this machine (Linux ``/proc``);
    None when nobody listens, the host is another machine's, or it cannot be told. ``hint``
    (the pid found last time) is checked first: a scan of every process is slow on a busy
    machine."""
    if host not in ("127.0.0.1", "localhost", "0.0.0.0", "::1", "::") and not host.startswith("127."):
        return None
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    candidates = [pid for pid, _, _ in live_processes()]
    if hint is not None and hint in candidates:
        candidates.remove(hint)
        candidates.insert(0, hint)
    for pid in candidates:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    return pid
            except OSError:
                continue
    return None


def with_descendants(roots: Iterable[int]) -> set[int]:
    """``roots`` and every live process below them."""
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in live_processes():
        children.setdefault(ppid, []).append(pid)
    out: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, ()))
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
