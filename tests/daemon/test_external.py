"""External reservations in the core (``Orchestrator.reserve``), in-process on the simulated
device: the scheduler evicts our models to make room, the ledger counts the reservation, the
program's real use is checked by pid."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from orchestrator import Orchestrator, parse_config
from orchestrator.device.simulated import SimulatedDevice
from orchestrator.errors import AcquireTimeout, LeaseDeadlock
from states.errors import InsufficientVRAM
from states.machine import State, active_state
from tests.daemon.conftest import write_config

GIB = 2**30


@pytest.fixture
def orch(tmp_path: Path) -> Orchestrator:
    config = parse_config(write_config(tmp_path).read_text())
    return Orchestrator(config, device=SimulatedDevice(config.total_bytes))


async def test_a_reservation_evicts_idle_models_and_counts_in_the_ledger(orch: Orchestrator) -> None:
    events = []
    orch.add_listener(events.append)
    async with orch:
        async with orch.acquire("llm"):
            pass
        async with orch.acquire("voice"):
            pass
        assert orch.ledger().on_gpu("qwen-14b") and orch.ledger().on_gpu("tts-small")
        async with orch.reserve(8 * GIB, pid=4242, holder="trainer") as lease:
            ledger = orch.ledger()
            assert lease.kind == "external" and lease.handle.vram_bytes == 8 * GIB
            assert ledger.external_bytes == 8 * GIB
            assert not ledger.on_gpu("qwen-14b")  # 11.5 + 8 > 15.5: the LLM had to go
            # The TTS was picked first (light before heavy), but the LLM's room alone was
            # enough: the TTS stays (3.5 + 8 <= 15.5).
            assert ledger.on_gpu("tts-small")
            assert ledger.committed_bytes <= ledger.budget_bytes
            assert orch.state is active_state(ledger)  # a reservation names no state
            assert orch.state is State.TTS_ACTIVE
            # The program uses more than it reserved: an event says so.
            device = orch.device
            assert isinstance(device, SimulatedDevice)
            device.take_foreign(4242, 9 * GIB)
            usage = orch.check_external_usage()
            assert usage[0][1] == 9 * GIB
            device.release_foreign(4242)
        assert orch.ledger().external_bytes == 0
        assert orch.external_reservations() == []
        assert "external" not in " ".join(orch.backends)
        async with orch.acquire("llm"):  # the room is ours again
            pass
    over = [e for e in events if e.kind == "external_overuse"]
    assert len(over) == 1 and "pid 4242 uses 9.00 GiB" in (over[0].detail or "")
    assert all(e.committed_bytes is None or e.committed_bytes <= e.budget_bytes for e in events)
    assert [e.kind for e in events if e.model == lease.model][-1] == "external_end"


async def hold(orch: Orchestrator, model: str, held: anyio.Event, done: anyio.Event) -> None:
    async with orch.acquire(model):
        held.set()
        await done.wait()


async def test_a_reservation_waits_for_a_busy_model_and_can_time_out(orch: Orchestrator) -> None:
    async with orch:
        with pytest.raises(LeaseDeadlock):  # this task holds what would have to leave
            async with orch.acquire("llm"), orch.reserve(8 * GIB, timeout=5):
                pass
        async with anyio.create_task_group() as tg:
            held, done = anyio.Event(), anyio.Event()
            tg.start_soon(hold, orch, "llm", held, done)
            await held.wait()
            with pytest.raises(AcquireTimeout) as info:
                async with orch.reserve(8 * GIB, timeout=0.3):
                    pass
            assert "external-" in str(info.value)
            done.set()
        assert orch.external_reservations() == [] and orch.ledger().external_bytes == 0
        # Cancelled while waiting behind another task's lease: nothing of it stays anywhere.
        async with anyio.create_task_group() as tg:
            held, done = anyio.Event(), anyio.Event()
            tg.start_soon(hold, orch, "sdxl", held, done)
            await held.wait()
            with anyio.move_on_after(0.2):
                async with orch.reserve(6 * GIB):
                    raise AssertionError("granted beside a held 10.5 GiB model")
            done.set()
        await anyio.sleep(0.05)
        assert orch.ledger().external_bytes == 0 and orch.waiting() == []
        # Two reservations side by side.
        async with orch.reserve(4 * GIB), orch.reserve(4 * GIB):
            assert orch.ledger().external_bytes == 8 * GIB
            assert orch.ledger().committed_bytes <= orch.ledger().budget_bytes


async def test_bad_reservations_are_refused(orch: Orchestrator) -> None:
    async with orch:
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match="positive number of bytes"):
                async with orch.reserve(bad):  # type: ignore[arg-type]
                    pass
        with pytest.raises(ValueError, match="pid"):
            async with orch.reserve(GIB, pid=-3):
                pass
        with pytest.raises(InsufficientVRAM, match="ask for less"):
            async with orch.reserve(orch.config.budget_bytes + 1):
                pass
        assert orch.external_reservations() == []


def test_the_daemon_section_of_the_config_is_validated(tmp_path: Path) -> None:
    from orchestrator.errors import ConfigError

    raw = json.loads(write_config(tmp_path).read_text())
    config = parse_config(json.dumps(raw))
    assert config.daemon.host == "127.0.0.1" and config.daemon.lease_ttl_s == 5
    for key, value, words in [
        ("port", 70000, "port number"),
        ("token", "short", "at least 8 characters"),
        ("lease_ttl_s", -1, "greater than 0"),
        ("max_body_bytes", 10, ">= 1024"),
        ("colour", "red", "unknown key"),
    ]:
        bad = {**raw, "daemon": {key: value}}
        with pytest.raises(ConfigError, match=words):
            parse_config(json.dumps(bad))
