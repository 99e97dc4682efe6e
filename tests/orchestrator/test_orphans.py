"""No orphans: a SIGKILLed orchestrator's servers die with it or are reaped by the next one,
and a process that is not provably ours (a reused pid) is never signalled."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import Orchestrator, parse_config
from orchestrator.backends import children
from orchestrator.backends.children import Child, reap_orphans, start_time
from orchestrator.backends.server import free_port, live_processes, port_taken
from tests.fixtures.shared_device import alive_after
from tests.orchestrator.conftest import config_yaml, wait_until

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not children.supported(), reason="parent-death signals and /proc are Linux's"),
]

ROOT = Path(__file__).resolve().parents[2]
FAKE_SERVER = str(ROOT / "tests" / "fixtures" / "fake_openai_server.py")
ENGINE_RE = re.compile(r"engine child pid (\d+)")

HOLDER = textwrap.dedent(
    """\
    import sys, anyio
    from orchestrator import Orchestrator, parse_config

    async def main() -> None:
        config = parse_config(open(sys.argv[1]).read(), source=sys.argv[1])
        async with Orchestrator(config) as orch:
            async with orch.acquire("llm") as lease:
                print("HOLDING", lease.handle.pid, lease.handle.base_url, flush=True)
                await anyio.sleep_forever()

    anyio.run(main)
    """
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder of the test's own: state files (and logs) go there, for this process and
    for the processes it starts."""
    path = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(path))
    return path


def server_config(tmp_path: Path, port: int, *flags: str) -> str:
    backend = {
        "type": "server",
        "command": [sys.executable, FAKE_SERVER, "--port", "{port}", "--host", "{host}", *flags],
        "port": port,
        "log_dir": str(tmp_path / "logs"),
        "start_timeout_s": 20,
        "stop_grace_s": 0.5,
    }
    models = "srv: " + json.dumps({"kind": "llm", "vram_gb": 11.5, "backend": backend}) + "\n"
    return config_yaml(models, "llm: srv\n", load_timeout_s=30.0, unload_timeout_s=10.0) + (
        "monitor: {sample_hz: 0, footprints_path: null}\n"
    )


def group(pgid: int) -> list[int]:
    return [pid for pid, _, g in live_processes() if g == pgid]


def gone(pid: int) -> bool:
    return start_time(pid) is None


def wait_gone(pid: int, within_s: float) -> bool:
    return not alive_after([pid], within_s)


def engine_pid(log: Path) -> int:
    found = ENGINE_RE.findall(log.read_text())
    assert found, log.read_text()
    return int(found[-1])


def hold_in_a_script(config: Path, timeout_s: float = 30.0) -> tuple[subprocess.Popen[bytes], int, str]:
    """A Python script that runs an Orchestrator and holds a lease on its server model:
    (the script, the server's pid, its URL)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            out += line
            if line.startswith(b"HOLDING"):
                _, pid, url = line.decode().split()
                return proc, int(pid), url
            if not line:
                break
    proc.kill()
    proc.wait()
    proc.stdout.close()
    raise AssertionError(f"the script did not hold a lease within {timeout_s} s:\n{out.decode()}")


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Pids to SIGKILL at the end whatever happened (so a failing test leaves nothing)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not gone(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("flags", [("--child",), ("--child", "--ignore-sigterm")], ids=["honours", "ignores"])
async def test_a_sigkilled_script_leaves_nothing_and_the_next_orchestrator_serves_on_the_port(
    tmp_path: Path, cache: Path, leftovers: list[int], flags: tuple[str, ...]
) -> None:
    """``--child``: the server has an engine child (its process group, ignoring SIGTERM, and
    no parent-death signal of its own); ``--ignore-sigterm``: the server ignores its stop
    signal too, so only the reaper's SIGKILL ends it."""
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(server_config(tmp_path, port, *flags))
    script, server, url = hold_in_a_script(config)
    leftovers.append(server)
    assert url == f"http://127.0.0.1:{port}"
    engine = engine_pid(tmp_path / "logs" / "srv.log")
    leftovers.append(engine)
    state = list((cache / "vram-orchestrator" / "run").glob(f"owner-{script.pid}-*.json"))
    assert len(state) == 1, state
    recorded = json.loads(state[0].read_text())
    assert [c["pid"] for c in recorded["children"]] == [server]
    assert recorded["owner"]["pid"] == script.pid

    os.kill(script.pid, signal.SIGKILL)
    script.wait(timeout=10)
    assert script.stdout is not None
    script.stdout.close()
    if "--ignore-sigterm" in flags:
        assert not gone(server)  # it ignored the parent-death signal: the reaper must end it
    else:
        # the parent-death signal (SIGTERM) ends the server
        assert wait_gone(server, within_s=10), "the server did not get its parent-death signal"
    assert not gone(engine)  # the engine child outlived it: only reaping ends it
    assert port_taken("127.0.0.1", port) == ("--ignore-sigterm" in flags)

    orch = Orchestrator(parse_config(server_config(tmp_path, port, "--child"), source="<t>"))
    async with orch:
        assert group(server) == [] and gone(server) and gone(engine)  # nothing of the old group
        assert not state[0].exists()  # the dead owner's state file is removed
        async with orch.acquire("llm") as lease:
            assert lease.handle.base_url == url  # the same fixed port
            r = await lease.handle.client.post(
                "/v1/chat/completions",
                json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "echo: hi"
            new_server = lease.handle.pid
            assert new_server is not None and new_server != server
            leftovers.append(new_server)
    await wait_until(lambda: gone(new_server) and group(new_server) == [], within=10, what="stopped")
    assert list((cache / "vram-orchestrator" / "run").glob("owner-*.json")) == []  # all stopped


def sleeper() -> subprocess.Popen[bytes]:
    """A process that is not ours to kill (in a session of its own, like a server's)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)


def write_state(
    directory: Path, owner_pid: int, owner_start: int, child: Child, boot: str | None = None
) -> Path:
    path = children.owner_path(directory, owner_pid, owner_start)
    record = {
        "owner": {"pid": owner_pid, "start_time": owner_start},
        "boot_id": children.boot_id() if boot is None else boot,
        "children": [child.__dict__],
    }
    children.atomic_write(path, json.dumps(record))
    return path


def dead_owner() -> tuple[int, int]:
    """A pid with a start time that no live process has (this process's pid, a start time
    from before it started: the owner whose pid was reused)."""
    me = os.getpid()
    started = start_time(me)
    assert started is not None
    return me, started - 1


def as_child(proc: subprocess.Popen[bytes], *, start_delta: int = 0, token: str = "not-its-token") -> Child:
    started = start_time(proc.pid)
    assert started is not None
    return Child("m", proc.pid, proc.pid, started + start_delta, token, int(signal.SIGTERM), 0.2)


def test_a_reused_pid_is_never_killed(tmp_path: Path) -> None:
    """The state file of a dead owner names a live process whose start time differs (its pid
    was reused after the recorded server died): it is left alone, the stale file removed."""
    victim = sleeper()
    try:
        path = write_state(tmp_path, *dead_owner(), as_child(victim, start_delta=-7))
        assert reap_orphans(tmp_path) == []
        assert victim.poll() is None and not gone(victim.pid)
        assert not path.exists()
    finally:
        victim.kill()
        victim.wait()


def test_the_recorded_process_of_a_dead_owner_is_killed(tmp_path: Path) -> None:
    """The same file with the right start time: the process is the recorded server, reaped."""
    victim = sleeper()
    try:
        path = write_state(tmp_path, *dead_owner(), as_child(victim))
        reaped = reap_orphans(tmp_path)
        assert [r.pids for r in reaped] == [(victim.pid,)] and not reaped[0].killed  # SIGTERM sufficed
        assert victim.wait(timeout=5) == -signal.SIGTERM
        assert not path.exists()
    finally:
        victim.kill()
        victim.wait()


def test_a_process_that_carries_the_token_is_killed_even_outside_the_group(tmp_path: Path) -> None:
    """A descendant that left the group (its leader long gone) is found by its token."""
    token = children.new_token()
    env = {**os.environ, children.TOKEN_ENV: token}
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
        "time.sleep(120)"
    )
    stray = subprocess.Popen(
        [sys.executable, "-c", code], env=env, start_new_session=True, stdout=subprocess.PIPE
    )
    bystander = sleeper()  # same kind of process, without the token
    try:
        assert stray.stdout is not None
        assert stray.stdout.readline() == b"ready\n"  # SIGTERM is ignored from here on
        gone_leader = Child("m", 1 << 22, 1 << 22, 1, token, int(signal.SIGTERM), 0.2)
        write_state(tmp_path, *dead_owner(), gone_leader)
        reaped = reap_orphans(tmp_path)
        assert [r.pids for r in reaped] == [(stray.pid,)] and reaped[0].killed  # it ignored SIGTERM
        assert stray.wait(timeout=5) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for p in (stray, bystander):
            p.kill()
            p.wait()
        assert stray.stdout is not None
        stray.stdout.close()


def test_a_live_owners_servers_are_left_alone(tmp_path: Path) -> None:
    victim = sleeper()
    try:
        me = os.getpid()
        started = start_time(me)
        assert started is not None
        path = write_state(tmp_path, me, started, as_child(victim))
        assert reap_orphans(tmp_path) == []
        assert victim.poll() is None and path.exists()
    finally:
        victim.kill()
        victim.wait()


def test_a_state_file_from_before_a_reboot_is_removed_and_nothing_killed(tmp_path: Path) -> None:
    victim = sleeper()
    try:
        path = write_state(tmp_path, *dead_owner(), as_child(victim), boot="another-boot")
        assert reap_orphans(tmp_path) == []
        assert victim.poll() is None and not path.exists()
    finally:
        victim.kill()
        victim.wait()


def test_an_unreadable_state_file_is_left_and_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "owner-1-1.json"
    path.write_text("{not json")
    assert reap_orphans(tmp_path) == []
    assert path.exists() and str(path) in caplog.text


def test_a_port_whose_server_is_gone_is_free_despite_its_closed_connections() -> None:
    """A server killed with connections open leaves them in TIME_WAIT on its port for a
    minute; a restarted server binds with SO_REUSEADDR, so the port counts as free."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    assert port_taken("127.0.0.1", port)  # listened on
    conn.close()  # the server side closes first: its end goes to TIME_WAIT
    client.recv(1)
    client.close()
    listener.close()
    assert not port_taken("127.0.0.1", port)


def test_the_book_keeps_each_server_in_the_folder_it_was_recorded_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    book = children.ChildBook()
    victim = sleeper()
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a"))
        book.add("m", victim.pid, "t0k3n", int(signal.SIGINT), 1.5)
        files = list((tmp_path / "a" / "vram-orchestrator" / "run").glob(f"owner-{os.getpid()}-*.json"))
        assert len(files) == 1
        record = json.loads(files[0].read_text())
        assert record["owner"] == {
            "pid": os.getpid(),
            "start_time": start_time(os.getpid()),
            "argv": sys.argv[:4],
        }
        assert record["boot_id"] == children.boot_id() != ""
        [child] = record["children"]
        assert child == {
            "model": "m", "pgid": victim.pid, "pid": victim.pid, "start_time": start_time(victim.pid),
            "token": "t0k3n", "stop_signal": int(signal.SIGINT), "stop_grace_s": 1.5,
        }  # fmt: skip
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
        book.remove(victim.pid)
        assert not files[0].exists()  # removed where it was written, not under the new folder
        assert not (tmp_path / "b").exists()
    finally:
        victim.kill()
        victim.wait()
