"""The server backend: a real (fake) OpenAI-compatible server process per model.

Every test starts tests/fixtures/fake_openai_server.py through the orchestrator (or itself, for
attach mode) and ends by checking that no process of it is left: the server pids and the
"engine child" pids it logs are collected from the per-model log and must be gone (absent, or
a zombie waiting for init) when the test ends.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from orchestrator import BackendCrashed, ConfigError, LoadFailed, Orchestrator, parse_config
from orchestrator.backends.server import ServerBackend, ServerHandle, live_processes
from states.ledger import Tier
from states.machine import State, active_state
from tests.orchestrator.conftest import config_yaml, wait_until

pytestmark = pytest.mark.anyio

FAKE_SERVER = str(Path(__file__).resolve().parents[1] / "fixtures" / "fake_openai_server.py")
GRACE_S = 0.3  # stop_grace_s: the SIGTERM-ignoring child is SIGKILLed after this
PID_RE = re.compile(r"(?:fake server pid|engine child pid) (\d+)")

MODELS_TAIL = """\
sdxl-base: {kind: sdxl, vram_gb: 10.5}
voice: {kind: tts, vram_gb: 3.5, simulation: {load_s: 1500}}
"""
DEFAULTS = "llm: srv\nsdxl: sdxl-base\ntts: voice\n"
SWITCHING = {"load_timeout_s": 30.0, "unload_timeout_s": 10.0, "retry_backoff_s": 0.05, "max_wait_s": 10.0}


# -- helpers -----------------------------------------------------------------------------------


def fake_cmd(*extra: str) -> list[str]:
    return [sys.executable, FAKE_SERVER, "--port", "{port}", "--host", "{host}", *extra]


def config_text(backend: dict[str, Any], **switching: Any) -> str:
    b = {"type": "server", **backend}
    models = "srv: " + json.dumps({"kind": "llm", "vram_gb": 11.5, "backend": b}) + "\n" + MODELS_TAIL
    return config_yaml(models, DEFAULTS, **{**SWITCHING, **switching}) + "monitor: {sample_hz: 0}\n"


def make_orch(tmp_path: Path, backend: dict[str, Any], **switching: Any) -> Orchestrator:
    """An orchestrator whose llm "srv" is a server model (logging under ``tmp_path``)."""
    opts = {"log_dir": str(tmp_path), "stop_grace_s": GRACE_S, "start_timeout_s": 10, **backend}
    return Orchestrator(parse_config(config_text(opts, **switching), source="<server test config>"))


def server_of(orch: Orchestrator) -> ServerBackend:
    b = orch.backends["srv"]
    assert isinstance(b, ServerBackend)
    return b


def logged_pids(tmp_path: Path) -> set[int]:
    """The server and engine-child pids the fake servers logged under ``tmp_path``."""
    pids: set[int] = set()
    for log in tmp_path.glob("*.log"):
        pids |= {int(p) for p in PID_RE.findall(log.read_text(errors="replace"))}
    return pids


def child_pids(log: Path) -> list[int]:
    return [int(p) for p in re.findall(r"engine child pid (\d+)", log.read_text(errors="replace"))]


def gone(pid: int) -> bool:
    """No such process, or only a zombie (killed, not yet reaped by init)."""
    if not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"


def alive(pids: set[int] | list[int]) -> list[int]:
    return sorted(p for p in pids if not gone(p))


async def assert_all_gone(tmp_path: Path, within: float = 5.0, expect_some: bool = True) -> None:
    pids = logged_pids(tmp_path)
    if expect_some:
        assert pids, "the fake server logged no pid"
    await wait_until(lambda: not alive(pids), within, f"processes left: {alive(pids)}")


def my_children() -> list[int]:
    """Live direct children of this test process."""
    me = os.getpid()
    return [pid for pid, parent, _ in live_processes() if parent == me]


def consistent(orch: Orchestrator) -> bool:
    return active_state(orch.ledger()) is orch.state


async def chat(handle: ServerHandle, text: str) -> str:
    r = await handle.client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]}
    )
    r.raise_for_status()
    return str(r.json()["choices"][0]["message"]["content"])


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    """Safety net: a test that leaks a fake server fails here, and the leak is killed."""
    yield
    pids = logged_pids(tmp_path)
    deadline = time.monotonic() + 3.0
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    left = alive(pids)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"fake server processes left behind: {left}"


# -- start, serve, stop ------------------------------------------------------------------------


async def test_start_ready_completion_handle_and_shutdown_stops_the_group(tmp_path: Path) -> None:
    orch = make_orch(
        tmp_path,
        {
            # {model} is the served model name: /v1/models lists it only if it was substituted
            "command": fake_cmd("--child", "--ignore-sigterm", "--ready-after", "0.2", "--model", "{model}"),
            "served_model": "fake-x",
        },
    )
    backend = server_of(orch)
    async with orch:
        async with orch.acquire("llm") as lease:
            h = lease.handle
            assert isinstance(h, ServerHandle)
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+", h.base_url)
            assert isinstance(h.pid, int) and not gone(h.pid)
            assert h.log_path == tmp_path / "srv.log"
            assert str(h.client.base_url).rstrip("/") == h.base_url
            assert await chat(h, "hello") == "echo: hello"
            models = (await h.client.get("/v1/models")).json()
            assert [m["id"] for m in models["data"]] == ["fake-x"]
            assert orch.state is State.LLM_ACTIVE and orch.ledger().on_gpu("srv")
            status = backend.status()
            assert status["running"] is True and status["pid"] == h.pid and status["url"] == h.base_url
            assert status["log"] == str(tmp_path / "srv.log")
            pid = h.pid
        children = child_pids(tmp_path / "srv.log")
        assert len(children) == 1 and not gone(children[0])
        assert f"fake server pid {pid} starting" in (tmp_path / "srv.log").read_text()
    # Leaving `async with orch` stops the server and its SIGTERM-ignoring child (SIGKILL after
    # the grace period), and waits for them: gone at once.
    assert gone(pid) and gone(children[0])
    assert backend.tier is Tier.DISK and backend.pid is None and not backend.is_alive()
    assert orch.statistics().state is State.IDLE and not orch.ledger().residents
    await assert_all_gone(tmp_path)


async def test_eviction_by_another_exclusive_model_stops_the_whole_group(tmp_path: Path) -> None:
    orch = make_orch(tmp_path, {"command": fake_cmd("--child", "--ignore-sigterm")})
    backend = server_of(orch)
    async with orch:
        async with orch.acquire("llm") as lease:
            pid = lease.handle.pid
            assert await chat(lease.handle, "hi") == "echo: hi"
        (child,) = child_pids(tmp_path / "srv.log")
        assert not gone(pid) and not gone(child)
        t0 = time.monotonic()
        async with orch.acquire("sdxl"):
            # The stop waited for every member of the group: both gone already.
            assert gone(pid) and gone(child)
            assert time.monotonic() - t0 >= GRACE_S  # nothing answered SIGTERM: SIGKILL after grace
            assert orch.state is State.SDXL_ACTIVE and consistent(orch)
            assert orch.ledger().get("srv") is None and not orch.ledger().on_gpu("srv")
            assert orch.ledger().on_gpu("sdxl-base")
            assert backend.tier is Tier.DISK and backend.handle is None and backend.pid is None
            assert backend.status()["running"] is False
    await assert_all_gone(tmp_path)


@pytest.mark.parametrize(
    ("sig", "ignored_here"), [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)]
)
async def test_a_server_that_honours_the_stop_signal_is_not_held_for_the_grace_period(
    tmp_path: Path, sig: signal.Signals, ignored_here: bool
) -> None:
    # ignored_here: a shell ignores SIGINT in the jobs it starts in the background (``cmd &``
    # in a script), and an ignored signal stays ignored in every child: the server would wait
    # out its grace period and be killed. It is started with the signal's default action back.
    orch = make_orch(tmp_path, {"command": fake_cmd(), "stop_grace_s": 5, "stop_signal": sig.name})
    previous = signal.getsignal(sig)
    if ignored_here:
        signal.signal(sig, signal.SIG_IGN)
    try:
        async with orch:
            async with orch.acquire("llm") as lease:
                pid = lease.handle.pid
            t0 = time.monotonic()
            async with orch.acquire("sdxl"):
                assert gone(pid)
                assert time.monotonic() - t0 < 2.5
            assert server_of(orch).exit_code == -sig  # the configured signal ended it
    finally:
        signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    await assert_all_gone(tmp_path)


# -- failed starts -----------------------------------------------------------------------------


async def test_start_timeout_gives_load_failed_with_the_log_tail_and_leaves_nothing(tmp_path: Path) -> None:
    orch = make_orch(
        tmp_path, {"command": fake_cmd("--child", "--ready-after", "30"), "start_timeout_s": 0.6}
    )
    async with orch:
        with pytest.raises(LoadFailed) as ei:
            async with orch.acquire("llm"):
                pytest.fail("granted a server that never got ready")
        msg = str(ei.value)
        assert ei.value.model == "srv"
        assert "did not answer 200 within start_timeout_s=0.6" in msg
        assert f"last lines of {tmp_path / 'srv.log'}" in msg
        assert "fake server pid" in msg and "engine child pid" in msg
        assert '"GET /health HTTP/1.1" 503' in msg
        # The cleanup after the failed start stopped the group before the error came out.
        pids = logged_pids(tmp_path)
        assert len(pids) == 2 and not alive(pids)
        assert orch.ledger().get("srv") is None and orch.state is State.IDLE and consistent(orch)
        assert server_of(orch).tier is Tier.DISK
        assert orch.last_errors()["srv"] is ei.value
    await assert_all_gone(tmp_path)


async def test_exit_before_ready_names_the_exit_code_and_the_fatal_line(tmp_path: Path) -> None:
    orch = make_orch(tmp_path, {"command": fake_cmd("--exit-before-ready", "7"), "start_timeout_s": 20})
    async with orch:
        t0 = time.monotonic()
        with pytest.raises(LoadFailed) as ei:
            async with orch.acquire("llm"):
                pytest.fail("granted a server that exited")
        assert time.monotonic() - t0 < 5  # noticed at once, not at start_timeout_s
        msg = str(ei.value)
        assert "exited with code 7 before it was ready" in msg
        assert "fatal: model weights not found (on purpose)" in msg
        assert orch.ledger().get("srv") is None and consistent(orch)
    await assert_all_gone(tmp_path)


async def test_load_timeout_shorter_than_start_timeout_stops_the_start(tmp_path: Path) -> None:
    orch = make_orch(
        tmp_path,
        {"command": fake_cmd("--child", "--ready-after", "30"), "start_timeout_s": 20},
        load_timeout_s=0.5,
    )
    async with orch:
        with pytest.raises(LoadFailed) as ei:
            async with orch.acquire("llm"):
                pytest.fail("granted a server that never got ready")
        assert "did not finish within load_timeout_s=0.5" in str(ei.value)
        pids = logged_pids(tmp_path)
        assert len(pids) == 2 and not alive(pids)
        assert orch.ledger().get("srv") is None and consistent(orch)
    await assert_all_gone(tmp_path)


async def test_a_command_that_does_not_exist_cannot_start(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-server")
    orch = make_orch(tmp_path, {"command": [missing, "--port", "{port}"]})
    async with orch:
        with pytest.raises(LoadFailed) as ei:
            async with orch.acquire("llm"):
                pytest.fail("granted a server that cannot start")
        assert f"cannot start {missing!r}" in str(ei.value)
        assert orch.ledger().get("srv") is None and consistent(orch)
        assert server_of(orch).tier is Tier.DISK and server_of(orch).pid is None
        assert not my_children()
    await assert_all_gone(tmp_path, expect_some=False)


async def test_a_missing_cwd_is_named_in_the_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    orch = make_orch(tmp_path, {"command": fake_cmd(), "cwd": str(missing)})
    try:
        async with orch:
            with pytest.raises(LoadFailed) as ei:
                async with orch.acquire("llm"):
                    pytest.fail("granted a server that cannot start")
            assert str(missing) in str(ei.value), str(ei.value)
    finally:
        assert not my_children()
        await assert_all_gone(tmp_path, expect_some=False)


async def test_a_fixed_port_already_taken_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        orch = make_orch(tmp_path, {"command": fake_cmd(), "port": port})
        async with orch:
            with pytest.raises(LoadFailed) as ei:
                async with orch.acquire("llm"):
                    pytest.fail("granted a server on a taken port")
            msg = str(ei.value)
            assert f"port {port} on 127.0.0.1 is taken" in msg and "port: auto" in msg
            assert not (tmp_path / "srv.log").exists()  # no process was started
            assert not my_children()
            assert orch.ledger().get("srv") is None and consistent(orch)
    await assert_all_gone(tmp_path, expect_some=False)


async def test_served_model_mismatch_is_never_ready(tmp_path: Path) -> None:
    orch = make_orch(
        tmp_path,
        {
            "command": fake_cmd("--child", "--model", "other"),
            "served_model": "wanted",
            "start_timeout_s": 0.6,
        },
    )
    async with orch:
        with pytest.raises(LoadFailed) as ei:
            async with orch.acquire("llm"):
                pytest.fail("granted a server that does not serve the model")
        assert "within start_timeout_s=0.6" in str(ei.value)
        assert '"GET /v1/models HTTP/1.1" 200' in (tmp_path / "srv.log").read_text()
        assert not alive(logged_pids(tmp_path))
        assert orch.ledger().get("srv") is None and consistent(orch)
    await assert_all_gone(tmp_path)


async def test_served_model_mismatch_message_names_the_served_model(tmp_path: Path) -> None:
    orch = make_orch(
        tmp_path,
        {"command": fake_cmd("--model", "other"), "served_model": "wanted", "start_timeout_s": 0.4},
    )
    try:
        async with orch:
            with pytest.raises(LoadFailed) as ei:
                async with orch.acquire("llm"):
                    pytest.fail("granted a server that does not serve the model")
            msg = str(ei.value)
            assert "'wanted'" in msg or "served_model" in msg, msg
            assert "did not answer 200" not in msg, msg
    finally:
        await assert_all_gone(tmp_path)


# -- crashes -----------------------------------------------------------------------------------


async def check_restart(orch: Orchestrator, tmp_path: Path, *, wait_for_reaper: bool) -> None:
    """The reaper stops what is left of the crashed group; the next acquire starts a new
    server (never before the old group is gone) and it works."""
    old = logged_pids(tmp_path)
    if wait_for_reaper:
        await wait_until(lambda: not alive(old), 5.0, f"the crashed group reaped: {alive(old)}")
        await wait_until(lambda: server_of(orch).tier is Tier.DISK, 5.0, "the backend unloaded")
    async with orch.acquire("llm") as lease:
        assert lease.handle.pid not in old and not gone(lease.handle.pid)
        assert not alive(old)  # reaped before the restart
        assert await chat(lease.handle, "again") == "echo: again"
        assert orch.state is State.LLM_ACTIVE and consistent(orch)
    assert "srv" not in orch.last_errors()


async def test_a_crash_during_a_lease_raises_backend_crashed_and_restarts(tmp_path: Path) -> None:
    orch = make_orch(tmp_path, {"command": fake_cmd("--child")})
    crashes: list[Any] = []
    orch.add_listener(lambda e: crashes.append(e) if e.kind == "crash" else None)
    async with orch:
        with pytest.raises(BackendCrashed) as ei:
            async with orch.acquire("llm") as lease:
                pid = lease.handle.pid
                with pytest.raises(httpx.HTTPError):
                    await chat(lease.handle, "crash")
                await anyio.sleep(10)
                pytest.fail("the lease block was not interrupted by the crash")
        # At once: the ledger and the state are true again.
        assert ei.value.model == "srv"
        assert "'srv'" in str(ei.value) and f"server process {pid} exited with code 3" in str(ei.value)
        assert orch.state is State.IDLE and consistent(orch)
        assert orch.ledger().get("srv") is None and not orch.ledger().on_gpu("srv")
        assert orch.leases() == {}
        assert isinstance(orch.last_errors()["srv"], BackendCrashed)
        assert [e.model for e in crashes] == ["srv"]
        assert gone(pid)
        await check_restart(orch, tmp_path, wait_for_reaper=False)  # acquire at once
    await assert_all_gone(tmp_path)


async def test_kill_9_of_the_server_raises_in_every_lease_and_restarts(tmp_path: Path) -> None:
    orch = make_orch(tmp_path, {"command": fake_cmd("--child")})
    errors: list[BaseException] = []
    held = anyio.Event()
    pids: list[int] = []

    async def hold() -> None:
        try:
            async with orch.acquire("llm") as lease:
                pids.append(lease.handle.pid)
                if len(pids) == 2:
                    held.set()
                await anyio.sleep(10)
        except BackendCrashed as exc:
            errors.append(exc)

    async with orch:
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            tg.start_soon(hold)
            with anyio.fail_after(10):
                await held.wait()
            assert pids[0] == pids[1]
            (child,) = child_pids(tmp_path / "srv.log")
            os.kill(pids[0], signal.SIGKILL)
        assert len(errors) == 2
        for exc in errors:
            assert isinstance(exc, BackendCrashed) and exc.model == "srv"
            assert f"exited with code {-signal.SIGKILL}" in str(exc)
        assert orch.state is State.IDLE and consistent(orch)
        assert orch.ledger().get("srv") is None and orch.leases() == {}
        # The child ignores SIGTERM and outlived the server: the reaper kills it.
        await wait_until(lambda: gone(child), 5.0, "the engine child reaped")
        await check_restart(orch, tmp_path, wait_for_reaper=True)
    await assert_all_gone(tmp_path)


async def test_a_crash_of_an_idle_resident_is_noticed_and_reaped(tmp_path: Path) -> None:
    orch = make_orch(tmp_path, {"command": fake_cmd("--child")})
    async with orch:
        async with orch.acquire("llm") as lease:
            pid = lease.handle.pid
        assert orch.ledger().on_gpu("srv")
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: orch.ledger().get("srv") is None, 5.0, "the crash noticed")
        assert orch.state is State.IDLE and consistent(orch)
        assert isinstance(orch.last_errors()["srv"], BackendCrashed)
        await wait_until(lambda: not alive(logged_pids(tmp_path)), 5.0, "the crashed group reaped")
        await wait_until(lambda: server_of(orch).tier is Tier.DISK, 5.0, "the backend unloaded")
    await assert_all_gone(tmp_path)


async def test_a_crash_frees_the_gpu_for_a_model_waiting_on_the_lease(tmp_path: Path) -> None:
    orch = make_orch(tmp_path, {"command": fake_cmd()})
    got_sdxl = anyio.Event()
    crashed: list[BaseException] = []

    async def want_sdxl() -> None:
        async with orch.acquire("sdxl"):
            got_sdxl.set()

    async with orch, anyio.create_task_group() as tg:
        try:
            async with orch.acquire("llm") as lease:
                pid = lease.handle.pid
                tg.start_soon(want_sdxl)
                await anyio.sleep(0.1)
                assert not got_sdxl.is_set()  # it waits for the lease to end
                os.kill(pid, signal.SIGKILL)
                await anyio.sleep(10)
                pytest.fail("the lease block was not interrupted by the crash")
        except BackendCrashed as exc:
            crashed.append(exc)
        assert len(crashed) == 1
        with anyio.fail_after(5):
            await got_sdxl.wait()
        assert orch.state is State.SDXL_ACTIVE and consistent(orch)
        assert orch.ledger().get("srv") is None
    await assert_all_gone(tmp_path)


async def test_a_crash_while_another_model_loads_ends_consistent(tmp_path: Path) -> None:
    orch = make_orch(tmp_path, {"command": fake_cmd("--child")})

    async def want_voice() -> None:
        async with orch.acquire("tts"):
            pass

    async with orch, anyio.create_task_group() as tg:
        with pytest.raises(BackendCrashed):
            async with orch.acquire("llm") as lease:
                pid = lease.handle.pid
                tg.start_soon(want_voice)  # a light model loads beside it (1.5 s)
                await wait_until(lambda: orch.state is State.SWITCHING, 2.0, "the voice switch")
                os.kill(pid, signal.SIGKILL)
                await anyio.sleep(10)
        await wait_until(lambda: orch.state is not State.SWITCHING, 5.0, "the voice switch done")
        assert consistent(orch) and orch.state is State.TTS_ACTIVE
        assert orch.ledger().get("srv") is None and orch.ledger().on_gpu("voice")
        await wait_until(lambda: not alive(logged_pids(tmp_path)), 5.0, "the crashed group reaped")
    await assert_all_gone(tmp_path)


# -- cancellation ------------------------------------------------------------------------------


async def cancel_once_started(scope: anyio.CancelScope, tmp_path: Path) -> None:
    """Cancel ``scope`` once the server and its child have started (and are not ready)."""
    await wait_until(lambda: len(logged_pids(tmp_path)) == 2, 10.0, "the server and its child started")
    await anyio.sleep(0.2)
    scope.cancel()


async def test_cancelled_mid_start_then_shutdown_leaves_no_process(tmp_path: Path) -> None:
    orch = make_orch(tmp_path, {"command": fake_cmd("--child", "--ready-after", "30"), "start_timeout_s": 20})
    async with orch:
        with anyio.move_on_after(10) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_once_started, scope, tmp_path)
                async with orch.acquire("llm"):
                    pytest.fail("granted a server that is not ready")
        assert scope.cancel_called and orch.running
        pids = logged_pids(tmp_path)
        assert len(pids) == 2  # started: the server and its child logged their pids
        assert alive(pids) == sorted(pids)  # still starting: the scheduler goes on with it
    assert not alive(pids)  # shutdown cancelled the start and stopped the group
    assert orch.state is State.IDLE and not orch.ledger().residents
    assert server_of(orch).tier is Tier.DISK
    await assert_all_gone(tmp_path)


async def test_the_whole_orchestrator_cancelled_mid_start_leaves_no_process(tmp_path: Path) -> None:
    orch = make_orch(tmp_path, {"command": fake_cmd("--child", "--ready-after", "30"), "start_timeout_s": 20})
    with anyio.move_on_after(10) as scope:
        async with orch, anyio.create_task_group() as tg:
            tg.start_soon(cancel_once_started, scope, tmp_path)
            async with orch.acquire("llm"):
                pytest.fail("granted a server that is not ready")
    assert scope.cancel_called
    pids = logged_pids(tmp_path)
    assert len(pids) == 2 and not alive(pids)
    assert not orch.running and not orch.ledger().residents
    await assert_all_gone(tmp_path)


# -- attach mode -------------------------------------------------------------------------------


async def test_attach_mode_uses_the_server_and_never_kills_it(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (tmp_path / "external.log").open("wb") as out:  # scanned for pids by no_leftovers
        ext = await anyio.open_process(
            [sys.executable, FAKE_SERVER, "--port", str(port), "--model", "ext", "--ready-after", "0.2"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        orch = make_orch(tmp_path, {"base_url": url + "/", "served_model": "ext"})
        backend = server_of(orch)
        assert backend.attached
        async with orch:
            async with orch.acquire("llm") as lease:
                h = lease.handle
                assert h.base_url == url and h.pid is None and h.log_path is None
                assert await chat(h, "attached") == "echo: attached"
                assert orch.state is State.LLM_ACTIVE and consistent(orch)
            async with orch.acquire("sdxl"):  # evicted: detached from, not killed
                assert ext.returncode is None
                assert orch.ledger().get("srv") is None and consistent(orch)
            async with orch.acquire("llm") as lease:
                assert await chat(lease.handle, "back") == "echo: back"
        # After leaving `async with orch`: still alive and serving.
        assert ext.returncode is None and not gone(ext.pid)
        assert not (tmp_path / "srv.log").exists()
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/health")).status_code == 200
    finally:
        ext.kill()
        await ext.wait()
        await ext.aclose()
    assert gone(ext.pid)
    await assert_all_gone(tmp_path)


async def test_attach_mode_to_nothing_fails_on_timeout(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    orch = make_orch(tmp_path, {"base_url": f"http://127.0.0.1:{port}", "start_timeout_s": 0.3})
    async with orch:
        with pytest.raises(LoadFailed) as ei:
            async with orch.acquire("llm"):
                pytest.fail("attached to nothing")
        assert f"http://127.0.0.1:{port}/health did not answer 200" in str(ei.value)
        assert consistent(orch) and orch.ledger().get("srv") is None
    assert not my_children()


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "key"),
    [
        ({"command": ["x"], "bogus": 1}, "bogus"),
        ({"command": 5}, "command"),
        ({"command": []}, "command"),
        ({"command": ["x", 1]}, "command"),
        ({}, "command"),
        ({"health_path": "/health"}, "command"),
        ({"command": ["x"], "port": 0}, "port"),
        ({"command": ["x"], "port": 70000}, "port"),
        ({"command": ["x"], "port": "eighty"}, "port"),
        ({"command": ["x"], "port": True}, "port"),
        ({"command": ["x"], "stop_signal": "SIGFOO"}, "stop_signal"),
        ({"command": ["x"], "start_timeout_s": 0}, "start_timeout_s"),
        ({"command": ["x"], "stop_grace_s": -1}, "stop_grace_s"),
        ({"command": ["x"], "env": ["A=1"]}, "env"),
    ],
)
def test_config_errors_name_the_backend_key(backend: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(config_text(backend), source="<bad server config>")
    assert ei.value.key == f"models.srv.backend.{key}"
    assert f"models.srv.backend.{key}" in str(ei.value)


def test_an_unknown_backend_type_names_the_type_key() -> None:
    text = config_text({"command": ["x"]}).replace('"type": "server"', '"type": "srvr"')
    with pytest.raises(ConfigError) as ei:
        parse_config(text, source="<bad server config>")
    assert ei.value.key == "models.srv.backend.type"


def test_valid_server_configs_parse() -> None:
    for backend in (
        {"command": "python -m my_server --port {port}", "port": "auto", "stop_signal": "SIGINT"},
        {"command": ["x", "--port", "{port}"], "port": 8000, "env": {"A": 1}, "served_model": "m"},
        {"base_url": "http://127.0.0.1:8000"},
    ):
        cfg = parse_config(config_text(backend), source="<server config>")
        assert cfg.models["srv"].backend == "server"
