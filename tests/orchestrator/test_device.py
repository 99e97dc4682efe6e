"""The simulated GPU: owner-tagged allocations, out-of-memory, slow releases, foreign
processes and peaks, on the Model Management Module's 16 GiB card."""

from __future__ import annotations

import time

import pytest

from orchestrator.device.simulated import FOREIGN_PREFIX, SimulatedDevice, SimulatedOOM
from states.units import gib_to_bytes

TOTAL = gib_to_bytes(16)
QWEN = gib_to_bytes(11.5)
SDXL = gib_to_bytes(10.5)
TTS = gib_to_bytes(3.5)


@pytest.fixture
def device() -> SimulatedDevice:
    return SimulatedDevice(TOTAL, name="Simulated RTX 5080")


def test_a_new_device_is_empty(device: SimulatedDevice) -> None:
    assert device.name == "Simulated RTX 5080"
    assert device.source == "simulated"
    assert device.used_bytes() == 0
    assert device.free_bytes() == TOTAL
    assert device.holders() == {}
    assert device.held_by("qwen-14b") == 0
    assert (device.peak_bytes, device.peak_owned_bytes) == (0, 0)


def test_allocations_are_attributed_to_their_owner(device: SimulatedDevice) -> None:
    device.allocate("qwen-14b", QWEN)
    device.allocate("gpt-sovits-small", TTS)
    assert device.held_by("qwen-14b") == QWEN
    assert device.held_by("gpt-sovits-small") == TTS
    assert device.used_bytes() == QWEN + TTS
    assert device.free_bytes() == TOTAL - QWEN - TTS
    assert device.holders() == {"qwen-14b": QWEN, "gpt-sovits-small": TTS}
    assert device.owned_bytes() == QWEN + TTS


def test_allocations_of_one_owner_add_up(device: SimulatedDevice) -> None:
    device.allocate("sdxl-base", gib_to_bytes(6))
    device.allocate("sdxl-base", gib_to_bytes(4.5))
    assert device.held_by("sdxl-base") == SDXL


def test_free_returns_what_the_owner_held_and_releases_it(device: SimulatedDevice) -> None:
    device.allocate("qwen-14b", QWEN)
    device.allocate("gpt-sovits-small", TTS)
    assert device.free("qwen-14b") == QWEN
    assert device.held_by("qwen-14b") == 0
    assert device.used_bytes() == TTS
    assert "qwen-14b" not in device.holders()


def test_freeing_an_owner_that_holds_nothing_is_a_no_op(device: SimulatedDevice) -> None:
    device.allocate("qwen-14b", QWEN)
    assert device.free("sdxl-base") == 0
    assert device.free("sdxl-base", after_s=10.0) == 0
    assert device.used_bytes() == QWEN
    assert device.holders() == {"qwen-14b": QWEN}


def test_an_allocation_past_the_total_raises_oom_and_changes_nothing(device: SimulatedDevice) -> None:
    device.allocate("qwen-14b", QWEN)
    with pytest.raises(SimulatedOOM) as info:
        device.allocate("sdxl-base", SDXL)
    err = info.value
    assert isinstance(err, MemoryError)
    assert (err.owner, err.requested_bytes, err.free_bytes) == ("sdxl-base", SDXL, TOTAL - QWEN)
    assert str(err) == "simulated CUDA out of memory: sdxl-base needs 10.50 GiB, 4.50 GiB free on the device"
    assert device.held_by("sdxl-base") == 0
    assert device.used_bytes() == QWEN
    assert device.peak_bytes == QWEN


def test_an_allocation_that_exactly_fills_the_device_succeeds(device: SimulatedDevice) -> None:
    device.allocate("a", TOTAL - 1)
    device.allocate("b", 1)
    assert device.free_bytes() == 0
    with pytest.raises(SimulatedOOM) as info:
        device.allocate("c", 1)
    assert info.value.free_bytes == 0


def test_a_zero_allocation_is_allowed_on_a_full_device(device: SimulatedDevice) -> None:
    device.allocate("a", TOTAL)
    device.allocate("b", 0)
    assert device.used_bytes() == TOTAL


def test_a_negative_allocation_is_refused(device: SimulatedDevice) -> None:
    with pytest.raises(ValueError, match="negative"):
        device.allocate("qwen-14b", -1)
    assert device.used_bytes() == 0


def test_a_slow_release_stays_visible_until_its_deadline(device: SimulatedDevice) -> None:
    device.allocate("qwen-14b", QWEN)
    start = time.monotonic()
    assert device.free("qwen-14b", after_s=0.05) == QWEN
    # Until the deadline the bytes are still there, attributed to their owner.
    assert device.held_by("qwen-14b") == QWEN
    assert device.used_bytes() == QWEN
    assert device.holders() == {"qwen-14b": QWEN}
    assert device.owned_bytes() == QWEN
    with pytest.raises(SimulatedOOM):
        device.allocate("sdxl-base", SDXL)
    while device.held_by("qwen-14b"):
        assert time.monotonic() - start < 2.0, "the slow release never finished"
        time.sleep(0.005)
    assert time.monotonic() - start >= 0.05
    assert device.used_bytes() == 0
    assert device.holders() == {}
    device.allocate("sdxl-base", SDXL)
    assert device.held_by("sdxl-base") == SDXL


def test_an_owner_can_allocate_again_while_its_old_memory_is_releasing(device: SimulatedDevice) -> None:
    device.allocate("sdxl-base", gib_to_bytes(4))
    device.free("sdxl-base", after_s=60.0)
    device.allocate("sdxl-base", gib_to_bytes(5))
    assert device.held_by("sdxl-base") == gib_to_bytes(9)
    # A second (immediate) free only returns what is held outright; the release goes on.
    assert device.free("sdxl-base") == gib_to_bytes(5)
    assert device.held_by("sdxl-base") == gib_to_bytes(4)


def test_foreign_allocations_are_tagged_and_released_by_pid(device: SimulatedDevice) -> None:
    device.allocate("qwen-14b", QWEN)
    device.take_foreign(4242, gib_to_bytes(2))
    device.take_foreign(4343, gib_to_bytes(1))
    assert device.holders()[f"{FOREIGN_PREFIX}4242"] == gib_to_bytes(2)
    assert device.used_bytes() == QWEN + gib_to_bytes(3)
    assert device.owned_bytes() == QWEN
    assert device.held_by("qwen-14b") == QWEN
    assert device.release_foreign(4242) == gib_to_bytes(2)
    assert device.used_bytes() == QWEN + gib_to_bytes(1)
    assert device.release_foreign(4242) == 0


def test_a_foreign_allocation_can_run_the_device_out_of_memory(device: SimulatedDevice) -> None:
    device.allocate("qwen-14b", QWEN)
    with pytest.raises(SimulatedOOM) as info:
        device.take_foreign(7, gib_to_bytes(5))
    assert info.value.owner == f"{FOREIGN_PREFIX}7"
    assert device.used_bytes() == QWEN


def test_foreign_memory_leaves_less_room_for_our_models(device: SimulatedDevice) -> None:
    device.take_foreign(1, gib_to_bytes(6))
    with pytest.raises(SimulatedOOM):
        device.allocate("sdxl-base", SDXL)
    device.release_foreign(1)
    device.allocate("sdxl-base", SDXL)


def test_peak_owned_bytes_excludes_foreign_memory(device: SimulatedDevice) -> None:
    device.allocate("qwen-14b", QWEN)
    device.take_foreign(1, gib_to_bytes(4))
    assert device.peak_bytes == QWEN + gib_to_bytes(4)
    assert device.peak_owned_bytes == QWEN


def test_peaks_remember_the_highest_point(device: SimulatedDevice) -> None:
    device.allocate("qwen-14b", QWEN)
    device.free("qwen-14b")
    device.allocate("gpt-sovits-small", TTS)
    assert device.used_bytes() == TTS
    assert device.peak_bytes == QWEN
    assert device.peak_owned_bytes == QWEN


def test_peaks_count_memory_that_is_still_releasing(device: SimulatedDevice) -> None:
    device.allocate("qwen-14b", gib_to_bytes(8))
    device.free("qwen-14b", after_s=60.0)
    device.allocate("sdxl-base", gib_to_bytes(7))
    assert device.peak_owned_bytes == gib_to_bytes(15)
    assert device.peak_bytes == gib_to_bytes(15)


def test_reset_peaks_starts_again_from_what_is_held_now(device: SimulatedDevice) -> None:
    device.allocate("qwen-14b", QWEN)
    device.free("qwen-14b")
    device.allocate("gpt-sovits-small", TTS)
    device.take_foreign(9, gib_to_bytes(1))
    device.reset_peaks()
    assert device.peak_bytes == TTS + gib_to_bytes(1)
    assert device.peak_owned_bytes == TTS
    device.free("gpt-sovits-small")
    device.reset_peaks()
    assert device.peak_owned_bytes == 0
    assert device.peak_bytes == gib_to_bytes(1)


def test_reset_peaks_counts_releasing_memory(device: SimulatedDevice) -> None:
    device.allocate("qwen-14b", QWEN)
    device.free("qwen-14b", after_s=60.0)
    device.reset_peaks()
    assert device.peak_owned_bytes == QWEN


def test_held_by_live_only_leaves_out_memory_that_is_releasing(device: SimulatedDevice) -> None:
    device.allocate("sdxl-base", gib_to_bytes(4))
    device.free("sdxl-base", after_s=60.0)
    device.allocate("sdxl-base", gib_to_bytes(5))
    assert device.held_by("sdxl-base", live_only=True) == gib_to_bytes(5)
    assert device.held_by("sdxl-base") == gib_to_bytes(9)
