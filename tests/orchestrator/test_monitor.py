"""``VRAMMonitor`` on the simulated device, the NVML source over a fake ``pynvml``, the device
choice (``open_device``), ``PeakSampler``, ``wait_released`` and the module's Example 2."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

import orchestrator.device.nvml as nvml_module
from orchestrator.config import Config, load_config, parse_config
from orchestrator.device import DeviceUnavailable, ProcessUse, SimulatedDevice, open_device
from orchestrator.device.nvml import NvmlDevice, nvml_available
from orchestrator.errors import ConfigError, UnknownModel, VRAMNotReleased
from orchestrator.footprints import FootprintStore
from orchestrator.monitor import PeakSampler, VRAMMonitor, wait_released
from orchestrator.runtime import Orchestrator
from states.errors import InsufficientVRAM
from states.units import GIB, format_gib, gib_to_bytes
from tests.orchestrator.conftest import MODELS_YAML, build_config, config_yaml

ME = os.getpid()
BUDGET = gib_to_bytes(15.5)


def gib(x: float) -> int:
    return gib_to_bytes(x)


@pytest.fixture
def device() -> SimulatedDevice:
    return SimulatedDevice(16 * GIB, name="test GPU")


@pytest.fixture
def store() -> FootprintStore:
    return FootprintStore(None)


@pytest.fixture
def monitor(device: SimulatedDevice, store: FootprintStore) -> VRAMMonitor:
    return VRAMMonitor(device, build_config(), footprints=store)


def config_with(monitor_yaml: str = "", models: str = MODELS_YAML, device: str = "simulated") -> Config:
    text = config_yaml(models).replace("device: simulated", f"device: {device}")
    if monitor_yaml:
        text += "monitor:\n" + textwrap.indent(textwrap.dedent(monitor_yaml), "  ")
    return parse_config(text, source="<monitor test config>")


# -- get_snapshot ------------------------------------------------------------------------------------


def test_a_snapshot_of_an_empty_simulated_device(monitor: VRAMMonitor) -> None:
    s = monitor.get_snapshot()
    assert monitor.source == "simulated"
    assert (s.source, s.device_name) == ("simulated", "test GPU")
    assert (s.total_bytes, s.used_bytes, s.free_bytes) == (16 * GIB, 0, 16 * GIB)
    assert s.budget_bytes == BUDGET
    assert s.budget_free_bytes == BUDGET
    assert s.foreign == ()
    assert s.process_bytes is None  # this process holds nothing
    assert s.allocated_bytes is None and s.reserved_bytes is None  # no torch here


def test_a_snapshot_tells_our_memory_from_foreign_processes(
    monitor: VRAMMonitor, device: SimulatedDevice
) -> None:
    device.allocate("qwen-14b", gib(11.5))
    device.take_foreign(4242, 2 * GIB)
    device.take_foreign(77, 1 * GIB)
    s = monitor.get_snapshot()
    assert s.used_bytes == gib(14.5)
    assert s.free_bytes == gib(1.5)
    assert s.process_bytes == gib(11.5)  # ours, as NVML would list this process
    assert s.foreign == ((77, GIB), (4242, 2 * GIB))
    assert ME not in [pid for pid, _ in s.foreign]
    assert s.foreign_bytes == 3 * GIB
    assert s.budget_free_bytes == gib(1.0)  # the budget is tighter than the device here
    assert s.used_gb == 14.5 and s.free_gb == 1.5 and s.total_gb == 16.0


def test_a_snapshot_follows_the_device_live(monitor: VRAMMonitor, device: SimulatedDevice) -> None:
    device.take_foreign(9, 4 * GIB)
    assert monitor.get_snapshot().foreign == ((9, 4 * GIB),)
    device.release_foreign(9)
    s = monitor.get_snapshot()
    assert s.foreign == () and s.used_bytes == 0


# -- estimates ------------------------------------------------------------------------------------


def test_a_configured_estimate(monitor: VRAMMonitor) -> None:
    e = monitor.get_model_estimate("qwen-14b")
    assert (e.name, e.kind, e.source) == ("qwen-14b", "llm", "config")
    assert e.estimated_vram_bytes == e.configured_bytes == gib(11.5)
    assert e.learned_bytes is None and e.drift_bytes is None
    assert e.estimated_vram_gb == 11.5
    assert e.confidence == "medium"


def test_an_estimate_by_kind_is_the_kinds_default(monitor: VRAMMonitor) -> None:
    assert monitor.get_model_estimate("sdxl").name == "sdxl-base"
    assert monitor.get_model_estimate("tts").name == "gpt-sovits-small"


def test_a_larger_measurement_is_planned_with_plus_the_margin(
    monitor: VRAMMonitor, store: FootprintStore
) -> None:
    store.record("qwen-14b", gib(12.0))
    e = monitor.get_model_estimate("qwen-14b")
    assert e.source == "measured"
    assert e.learned_bytes == gib(12.0)
    assert e.configured_bytes == gib(11.5)
    assert e.estimated_vram_bytes == -(-gib(12.0) * 105 // 100)  # ceil(12 GiB * 1.05)
    assert e.drift_bytes == gib(0.5)


def test_a_smaller_measurement_leaves_the_configured_figure_without_margin(
    monitor: VRAMMonitor, store: FootprintStore
) -> None:
    store.record("qwen-14b", gib(10.0))
    e = monitor.get_model_estimate("qwen-14b")
    assert e.source == "config"
    assert e.estimated_vram_bytes == gib(11.5)  # no margin on top of the configured figure
    assert e.learned_bytes == gib(10.0)
    assert e.drift_bytes == -gib(1.5)


def test_a_measurement_equal_to_the_configured_figure_adds_no_margin(
    monitor: VRAMMonitor, store: FootprintStore
) -> None:
    store.record("qwen-14b", gib(11.5))
    e = monitor.get_model_estimate("qwen-14b")
    assert (e.source, e.estimated_vram_bytes, e.drift_bytes) == ("config", gib(11.5), 0)


def test_a_peak_counts_as_the_high_water_mark(monitor: VRAMMonitor, store: FootprintStore) -> None:
    store.record("sdxl-base", gib(10.0), kind="load")
    assert monitor.get_model_estimate("sdxl-base").source == "config"
    store.record("sdxl-base", gib(11.65), kind="peak")  # measured on an H200: the VAE decode
    e = monitor.get_model_estimate("sdxl-base")
    assert e.source == "measured"
    assert e.learned_bytes == gib(11.65)


def test_the_margin_comes_from_the_config(device: SimulatedDevice, store: FootprintStore) -> None:
    monitor = VRAMMonitor(device, config_with("footprint_margin: 0.2"), footprints=store)
    store.record("qwen-14b", 12 * GIB)
    assert monitor.get_model_estimate("qwen-14b").estimated_vram_bytes == -(-12 * GIB * 12 // 10)


def test_learn_footprints_false_ignores_learned_data(device: SimulatedDevice, store: FootprintStore) -> None:
    monitor = VRAMMonitor(device, config_with("learn_footprints: false"), footprints=store)
    store.record("qwen-14b", 14 * GIB)
    e = monitor.get_model_estimate("qwen-14b")
    assert e.source == "config"
    assert e.estimated_vram_bytes == gib(11.5)
    assert e.learned_bytes == 14 * GIB  # still reported, not planned with
    device.take_foreign(1, gib(3.5))  # room 12.0: the configured 11.5 fits, the learned 14 would not
    assert monitor.can_fit_model("qwen-14b")
    learning = VRAMMonitor(device, config_with(), footprints=store)
    assert learning.get_model_estimate("qwen-14b").source == "measured"
    assert not learning.can_fit_model("qwen-14b")


def test_an_unknown_model_is_named_with_the_choices(monitor: VRAMMonitor) -> None:
    with pytest.raises(UnknownModel, match="'qwen-99b'") as info:
        monitor.get_model_estimate("qwen-99b")
    assert "qwen-14b" in str(info.value)
    assert isinstance(info.value, LookupError)
    with pytest.raises(UnknownModel):
        monitor.can_fit_model("qwen-99b")


# -- can_fit_model ------------------------------------------------------------------------------


def test_can_fit_model_on_an_empty_device(monitor: VRAMMonitor) -> None:
    assert monitor.can_fit_model("qwen-vl-7b")  # 13.8 of 15.5
    assert monitor.can_fit_model("llm")


def test_can_fit_model_counts_what_is_already_in_use(monitor: VRAMMonitor, device: SimulatedDevice) -> None:
    device.allocate("qwen-14b", gib(11.5))  # 4.0 GiB left within the budget
    assert monitor.can_fit_model("gpt-sovits-small")  # 3.5
    assert not monitor.can_fit_model("sdxl-base")  # 10.5


def test_can_fit_model_counts_foreign_processes(monitor: VRAMMonitor, device: SimulatedDevice) -> None:
    device.take_foreign(4242, 3 * GIB)  # 12.5 GiB left within the budget
    assert monitor.can_fit_model("qwen-14b")  # 11.5
    assert not monitor.can_fit_model("qwen-vl-7b")  # 13.8


def test_can_fit_model_exactly_at_the_room(monitor: VRAMMonitor, device: SimulatedDevice) -> None:
    device.take_foreign(1, BUDGET - gib(11.5))
    assert monitor.can_fit_model("qwen-14b")
    device.take_foreign(2, 1)
    assert not monitor.can_fit_model("qwen-14b")


def test_can_fit_model_uses_the_learned_estimate(
    monitor: VRAMMonitor, device: SimulatedDevice, store: FootprintStore
) -> None:
    device.take_foreign(4242, 3 * GIB)  # 12.5 GiB of room
    assert monitor.can_fit_model("qwen-14b")
    store.record("qwen-14b", gib(12.5))  # planned at 13.125 GiB from now on
    assert not monitor.can_fit_model("qwen-14b")


def test_can_fit_model_by_alias(device: SimulatedDevice) -> None:
    models = MODELS_YAML + "sdxl-lora-controlnet: {kind: sdxl, vram_gb: 14.5, aliases: [sdxl-controlnet]}\n"
    monitor = VRAMMonitor(device, config_with(models=models), footprints=FootprintStore(None))
    e = monitor.get_model_estimate("sdxl-controlnet")
    assert e.name == "sdxl-lora-controlnet"
    assert e.estimated_vram_gb == 14.5
    assert monitor.can_fit_model("sdxl-controlnet")
    device.take_foreign(5, GIB + 1)
    assert not monitor.can_fit_model("sdxl-controlnet")


def test_the_embedded_default_knows_the_design_documents_sdxl_controlnet() -> None:
    """The Model Management Module's Example 2 asks for "sdxl-controlnet"."""
    spec = load_config(None).resolve("sdxl-controlnet")
    assert spec is not None
    assert spec.name == "sdxl-lora-controlnet"


# -- require_free_vram --------------------------------------------------------------------------


def test_require_free_vram_passes_when_there_is_room(monitor: VRAMMonitor, device: SimulatedDevice) -> None:
    assert monitor.require_free_vram(12.0, "SDXL+ControlNet") is None
    device.take_foreign(4242, gib(3.5))  # exactly 12.0 left within the budget
    assert monitor.require_free_vram(12.0, "SDXL+ControlNet") is None


def test_require_free_vram_names_the_shortfall_and_the_foreign_pid(
    monitor: VRAMMonitor, device: SimulatedDevice
) -> None:
    device.take_foreign(4242, 6 * GIB)
    with pytest.raises(RuntimeError) as info:  # the module's users catch RuntimeError
        monitor.require_free_vram(required_gb=12.0, model_name="SDXL+ControlNet")
    err = info.value
    assert isinstance(err, InsufficientVRAM)
    assert err.model == "SDXL+ControlNet"
    assert err.required_bytes == 12 * GIB
    assert err.free_bytes == gib(9.5)  # 15.5 budget - 6 foreign
    assert err.shortfall_bytes == gib(2.5)
    msg = str(err)
    assert "'SDXL+ControlNet'" in msg
    assert "needs 12.00 GiB" in msg
    assert "short 2.50 GiB" in msg
    assert "pid 4242 holds 6.00 GiB" in msg
    assert "simulated" in msg


def test_require_free_vram_counts_our_own_models_too(monitor: VRAMMonitor, device: SimulatedDevice) -> None:
    device.allocate("qwen-14b", gib(11.5))
    with pytest.raises(InsufficientVRAM) as info:
        monitor.require_free_vram(4.5)
    assert info.value.shortfall_bytes == gib(0.5)
    assert "other processes:" not in str(info.value)  # our own memory is not foreign
    assert "pid" not in str(info.value)


# -- reports --------------------------------------------------------------------------------------

STAT_KEYS = {
    "source",
    "device",
    "total_bytes",
    "used_bytes",
    "free_bytes",
    "budget_bytes",
    "budget_free_bytes",
    "process_bytes",
    "allocated_bytes",
    "reserved_bytes",
    "foreign_processes",
    "models",
}
MODEL_STAT_KEYS = {
    "kind",
    "estimate_bytes",
    "configured_bytes",
    "learned_bytes",
    "drift_bytes",
    "source",
    "confidence",
    "fits_now",
}


def test_detailed_stats(monitor: VRAMMonitor, device: SimulatedDevice, store: FootprintStore) -> None:
    device.allocate("gpt-sovits-small", gib(3.5))
    device.take_foreign(4242, 2 * GIB)
    store.record("qwen-14b", 12 * GIB)
    s = monitor.get_detailed_stats()
    assert set(s) == STAT_KEYS
    assert (s["source"], s["device"]) == ("simulated", "test GPU")
    assert s["used_bytes"] == gib(5.5)
    assert s["budget_free_bytes"] == 10 * GIB
    assert s["process_bytes"] == gib(3.5)
    assert s["foreign_processes"] == [{"pid": 4242, "bytes": 2 * GIB}]
    assert set(s["models"]) == set(build_config().models)
    for m in s["models"].values():
        assert set(m) == MODEL_STAT_KEYS
    q = s["models"]["qwen-14b"]
    assert (q["source"], q["learned_bytes"], q["drift_bytes"]) == ("measured", 12 * GIB, gib(0.5))
    assert q["fits_now"] is False  # 12.6 GiB planned, 10 GiB of room
    assert s["models"]["sdxl-base"]["fits_now"] is False  # 10.5 GiB
    assert s["models"]["gpt-sovits-small"]["fits_now"] is True
    assert s["models"]["sdxl-base"]["learned_bytes"] is None


def test_print_summary_is_a_table_of_every_model(
    monitor: VRAMMonitor, device: SimulatedDevice, store: FootprintStore
) -> None:
    device.take_foreign(4242, 2 * GIB)
    store.record("qwen-14b", gib(12.5))
    store.record("sdxl-base", gib(9.5))
    out = io.StringIO()
    monitor.print_summary(out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "test GPU (simulated)"
    assert "budget 15.50 GiB" in lines[1]
    assert any("other process pid 4242: 2.00 GiB" in line for line in lines)
    header = next(line for line in lines if line.split()[:1] == ["model"])
    assert header.split() == ["model", "kind", "estimate", "configured", "measured", "drift", "fits", "now"]
    rows = {line.split()[0]: line for line in lines[lines.index(header) + 1 :]}
    assert set(rows) == set(build_config().models)
    qwen = rows["qwen-14b"]
    est = monitor.get_model_estimate("qwen-14b").estimated_vram_bytes
    assert format_gib(est) in qwen
    assert "11.50 GiB" in qwen  # configured
    assert "12.50 GiB" in qwen  # measured
    assert "+1.00 GiB" in qwen  # drift
    assert qwen.rstrip().endswith("yes")  # 13.1 planned, 13.5 of room
    assert "-1.00 GiB" in rows["sdxl-base"]  # the config overestimates it
    assert rows["qwen-vl-7b"].split()[-1] == "no"  # 13.8 > 13.5
    assert " - " in rows["gpt-sovits-small"]  # not measured: no measured figure, no drift
    # The columns line up: every value starts under its heading.
    for heading in ("kind", "estimate", "configured", "measured"):
        col = header.index(heading)
        for row in rows.values():
            assert row[col - 2 : col] == "  " and row[col] != " ", (heading, row)


def test_print_summary_writes_to_stdout_by_default(
    monitor: VRAMMonitor, capsys: pytest.CaptureFixture[str]
) -> None:
    monitor.print_summary()
    out = capsys.readouterr().out
    assert "qwen-14b" in out and "sdxl-base" in out and "gpt-sovits-small" in out


# -- the NVML source over a fake pynvml ----------------------------------------------------------


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """Enough of nvidia-ml-py's ``pynvml`` module for ``NvmlDevice``."""

    NVMLError = FakeNVMLError

    def __init__(
        self,
        *,
        count: int = 1,
        name: bytes | str = b"NVIDIA GeForce RTX 5080",
        total: int = 16 * GIB,
        used: int = 5 * GIB,
        compute: list[Any] | None = None,
        graphics: list[Any] | Exception | None = None,
        driver: bool = True,
    ) -> None:
        self.count, self.name, self.total, self.used = count, name, total, used
        self.compute = compute or []
        self.graphics = graphics if graphics is not None else []
        self.driver = driver
        self.inits = self.shutdowns = 0

    def nvmlInit(self) -> None:
        if not self.driver:
            raise FakeNVMLError("Driver Not Loaded")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> tuple[str, int]:
        assert 0 <= index < self.count
        return ("handle", index)

    def nvmlDeviceGetName(self, handle: Any) -> bytes | str:
        return self.name

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> SimpleNamespace:
        return SimpleNamespace(total=self.total, used=self.used, free=self.total - self.used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        return list(self.compute)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[Any]:
        if isinstance(self.graphics, Exception):
            raise self.graphics
        return list(self.graphics)


def proc(pid: int, used: int | None) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, usedGpuMemory=used)


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install a fake ``pynvml``; ``fake_nvml(**kw)`` replaces it with another."""
    monkeypatch.setattr(nvml_module, "_init_count", 0)

    def install(**kw: Any) -> FakeNvml:
        fake = FakeNvml(**kw)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake

    return install


@pytest.fixture
def no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError


def test_nvml_reads_name_total_used_free(fake_nvml: Any) -> None:
    fake_nvml(used=6 * GIB)
    dev = NvmlDevice(0)
    try:
        assert dev.source == "nvml"
        assert dev.name == "NVIDIA GeForce RTX 5080"  # decoded from bytes
        assert dev.index == 0
        assert dev.total_bytes == 16 * GIB
        r = dev.read()
        assert (r.source, r.total_bytes, r.used_bytes, r.free_bytes) == ("nvml", 16 * GIB, 6 * GIB, 10 * GIB)
        assert r.processes == ()
        assert dev.used_bytes() == 6 * GIB
    finally:
        dev.close()


def test_nvml_accepts_a_str_name(fake_nvml: Any) -> None:
    fake_nvml(name="NVIDIA H200")
    dev = NvmlDevice(0)
    assert dev.name == "NVIDIA H200"
    dev.close()


def test_nvml_lists_processes_sorted_by_pid(fake_nvml: Any) -> None:
    fake_nvml(compute=[proc(300, 3 * GIB), proc(100, GIB)], graphics=[proc(200, 2 * GIB)])
    dev = NvmlDevice(0)
    r = dev.read()
    assert r.processes == (ProcessUse(100, GIB), ProcessUse(200, 2 * GIB), ProcessUse(300, 3 * GIB))
    dev.close()


def test_nvml_merges_a_pid_listed_as_compute_and_graphics(fake_nvml: Any) -> None:
    fake_nvml(compute=[proc(100, 2 * GIB)], graphics=[proc(100, GIB), proc(101, GIB)])
    dev = NvmlDevice(0)
    assert dev.read().processes == (ProcessUse(100, 3 * GIB), ProcessUse(101, GIB))
    dev.close()


def test_nvml_keeps_a_process_whose_bytes_it_cannot_read(fake_nvml: Any) -> None:
    fake_nvml(compute=[proc(100, 2 * GIB), proc(200, None)])
    dev = NvmlDevice(0)
    assert dev.read().processes == (ProcessUse(100, 2 * GIB), ProcessUse(200, None))
    dev.close()


def test_nvml_merges_unknown_bytes_with_known_ones(fake_nvml: Any) -> None:
    fake_nvml(compute=[proc(200, None)], graphics=[proc(200, 2 * GIB)])
    dev = NvmlDevice(0)
    assert dev.read().processes == (ProcessUse(200, 2 * GIB),)
    dev.close()


def test_nvml_keeps_known_bytes_when_the_second_listing_has_none(fake_nvml: Any) -> None:
    fake_nvml(compute=[proc(300, 4 * GIB)], graphics=[proc(300, None)])
    dev = NvmlDevice(0)
    try:
        assert dev.read().processes == (ProcessUse(300, 4 * GIB),)
    finally:
        dev.close()


def test_nvml_reads_the_compute_list_when_the_graphics_list_fails(fake_nvml: Any) -> None:
    fake_nvml(compute=[proc(100, GIB)], graphics=FakeNVMLError("Not Supported"))
    dev = NvmlDevice(0)
    assert dev.read().processes == (ProcessUse(100, GIB),)
    dev.close()


def test_nvml_an_index_out_of_range_is_unavailable_and_shuts_nvml_down(fake_nvml: Any) -> None:
    fake = fake_nvml(count=1)
    with pytest.raises(DeviceUnavailable, match=r"GPU index 1 does not exist.*1 GPU"):
        NvmlDevice(1)
    assert fake.inits == 1 and fake.shutdowns == 1
    assert nvml_module._init_count == 0


def test_nvml_init_failing_is_unavailable(fake_nvml: Any) -> None:
    fake = fake_nvml(driver=False)
    with pytest.raises(DeviceUnavailable, match=r"no NVIDIA driver answers.*Driver Not Loaded"):
        NvmlDevice(0)
    assert fake.shutdowns == 0
    assert nvml_module._init_count == 0
    assert not nvml_available()


def test_nvml_available_with_a_driver(fake_nvml: Any) -> None:
    fake = fake_nvml()
    assert nvml_available()
    assert fake.inits == fake.shutdowns == 1  # left as it was found


def test_nvml_shuts_down_once_when_the_last_device_closes(fake_nvml: Any) -> None:
    fake = fake_nvml(count=2)
    a, b = NvmlDevice(0), NvmlDevice(1)
    a.close()
    a.close()  # closing twice counts once
    assert fake.shutdowns == 0  # b still uses NVML
    b.close()
    assert fake.shutdowns == 1


def test_open_device_auto_picks_nvml_when_the_driver_answers(
    fake_nvml: Any, no_torch: None, caplog: pytest.LogCaptureFixture
) -> None:
    fake_nvml()
    with caplog.at_level(logging.WARNING, logger="orchestrator.device"):
        dev = open_device("auto", 0, total_bytes=16 * GIB)
    assert isinstance(dev, NvmlDevice)
    assert dev.source == "nvml"
    assert not [r for r in caplog.records if "simulated" in r.getMessage()]
    dev.close()


def test_open_device_auto_falls_back_to_the_simulated_device_with_a_warning(
    fake_nvml: Any, no_torch: None, caplog: pytest.LogCaptureFixture
) -> None:
    fake_nvml(driver=False)
    with caplog.at_level(logging.WARNING, logger="orchestrator.device"):
        dev = open_device("auto", 0, total_bytes=16 * GIB, name="fallback GPU")
    assert isinstance(dev, SimulatedDevice)
    assert (dev.source, dev.name, dev.total_bytes) == ("simulated", "fallback GPU", 16 * GIB)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "no GPU found" in msg and "simulated device" in msg
    assert "no NVIDIA driver answers" in msg and "torch" in msg  # says why, for both sources


def test_open_device_nvml_without_a_driver_raises_instead_of_falling_back(fake_nvml: Any) -> None:
    fake_nvml(driver=False)
    with pytest.raises(DeviceUnavailable, match="no NVIDIA driver"):
        open_device("nvml", 0, total_bytes=16 * GIB)


def test_open_device_nvml_with_the_real_pynvml_and_no_driver() -> None:
    if nvml_available():
        pytest.skip("an NVIDIA driver answers on this machine")
    with pytest.raises(DeviceUnavailable):
        open_device("nvml", 0, total_bytes=16 * GIB)


def test_open_device_torch_without_torch_raises(no_torch: None) -> None:
    with pytest.raises(DeviceUnavailable, match="torch"):
        open_device("torch", 0, total_bytes=16 * GIB)


def test_open_device_simulated_and_unknown_kinds() -> None:
    dev = open_device("simulated", 0, total_bytes=8 * GIB, name="sim")
    assert isinstance(dev, SimulatedDevice) and dev.total_bytes == 8 * GIB
    with pytest.raises(ValueError, match="unknown device kind 'tpu'"):
        open_device("tpu", 0, total_bytes=8 * GIB)


def test_an_orchestrator_asked_for_nvml_without_a_driver_is_a_config_error(fake_nvml: Any) -> None:
    fake_nvml(driver=False)
    with pytest.raises(ConfigError, match=r"hardware\.device"):
        Orchestrator(config_with(device="nvml"))


def test_monitor_on_nvml_tells_this_process_from_others(fake_nvml: Any, no_torch: None) -> None:
    fake_nvml(
        used=9 * GIB,
        compute=[proc(ME, 5 * GIB), proc(4242, 3 * GIB), proc(31337, None)],
        graphics=[proc(1000, GIB)],
    )
    monitor = VRAMMonitor(0, config_with(device="auto"), footprints=FootprintStore(None))
    try:
        assert monitor.source == "nvml"
        s = monitor.get_snapshot()
        assert (s.source, s.device_name) == ("nvml", "NVIDIA GeForce RTX 5080")
        assert s.process_bytes == 5 * GIB
        assert s.foreign == ((1000, GIB), (4242, 3 * GIB))
        assert s.budget_free_bytes == gib(6.5)
        with pytest.raises(InsufficientVRAM, match=r"pid 4242 holds 3\.00 GiB"):
            monitor.require_free_vram(7.0, "big")
    finally:
        monitor.close()
    assert nvml_module._init_count == 0


def test_monitor_asked_for_nvml_without_a_driver_raises(fake_nvml: Any) -> None:
    fake_nvml(driver=False)
    with pytest.raises(DeviceUnavailable):
        VRAMMonitor(0, config_with(device="nvml"), footprints=FootprintStore(None))


def test_monitor_without_any_gpu_uses_the_simulated_device_and_says_so(
    fake_nvml: Any, no_torch: None, caplog: pytest.LogCaptureFixture
) -> None:
    fake_nvml(driver=False)
    with caplog.at_level(logging.WARNING, logger="orchestrator.device"):
        monitor = VRAMMonitor()  # the embedded default config, GPU 0
    assert monitor.source == "simulated"
    assert any("no GPU found" in r.getMessage() for r in caplog.records)
    assert monitor.get_snapshot().total_bytes == 16 * GIB


# -- PeakSampler ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_sampler_records_a_timeline_per_owner(device: SimulatedDevice) -> None:
    clock = Clock()
    sampler = PeakSampler(device, 50, clock=clock)
    s0 = sampler.sample()
    assert (s0.time_s, s0.used_bytes, s0.by_owner) == (0.0, 0, {})
    device.allocate("qwen-14b", gib(11.5))
    device.take_foreign(4242, GIB)
    clock.t += 1.5
    s1 = sampler.sample()
    assert s1.time_s == 1.5
    assert s1.used_bytes == gib(12.5)
    assert s1.by_owner == {"qwen-14b": gib(11.5), "foreign:4242": GIB}
    assert list(sampler.timeline) == [s0, s1]
    assert sampler.peak_bytes == gib(12.5)


def test_sampler_peak_since_a_mark(device: SimulatedDevice) -> None:
    clock = Clock()
    sampler = PeakSampler(device, 50, clock=clock)
    device.allocate("a", 6 * GIB)
    sampler.sample()  # 6 GiB, before the mark
    device.shrink("a", 4 * GIB)
    clock.t += 1
    sampler.mark("use")
    device.allocate("b", 3 * GIB)
    clock.t += 1
    sampler.sample()  # 5 GiB
    device.free("b")
    clock.t += 1
    assert sampler.peak_since("use") == 5 * GIB  # not the 6 GiB from before the mark
    assert sampler.peak_bytes == 6 * GIB  # the all-time peak
    clock.t += 1
    sampler.mark("later")
    assert sampler.peak_since("later") == 2 * GIB  # a fresh sample is taken
    assert len(sampler.timeline) == 4


def test_sampler_history_is_bounded(device: SimulatedDevice) -> None:
    sampler = PeakSampler(device, 50, history=3, clock=Clock())
    for _ in range(5):
        device.allocate("m", GIB)
        sampler.sample()
    assert [s.used_bytes for s in sampler.timeline] == [3 * GIB, 4 * GIB, 5 * GIB]
    assert sampler.peak_bytes == 5 * GIB


def test_sampler_on_nvml_keys_owners_by_pid(fake_nvml: Any) -> None:
    fake_nvml(used=4 * GIB, compute=[proc(ME, 3 * GIB), proc(7, None)])
    dev = NvmlDevice(0)
    try:
        s = PeakSampler(dev, 50).sample()
        assert s.used_bytes == 4 * GIB
        assert s.by_owner == {f"pid {ME}": 3 * GIB, "pid 7": 0}
    finally:
        dev.close()


@pytest.mark.anyio
async def test_sampler_run_samples_at_its_rate(device: SimulatedDevice) -> None:
    sampler = PeakSampler(device, 200)
    device.allocate("m", GIB)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sampler.run)
        await anyio.sleep(0.05)
        device.allocate("m", 2 * GIB)
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    n = len(sampler.timeline)
    assert 5 <= n <= 40  # about 20 in 0.1 s at 200 Hz: it samples, and does not spin
    assert sampler.peak_bytes == 3 * GIB
    times = [s.time_s for s in sampler.timeline]
    assert times == sorted(times)


@pytest.mark.anyio
async def test_sampler_run_at_zero_hz_is_off(device: SimulatedDevice) -> None:
    sampler = PeakSampler(device, 0)
    with anyio.fail_after(1):
        await sampler.run()
    assert len(sampler.timeline) == 0


# -- wait_released --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_wait_released_returns_when_nothing_is_held() -> None:
    calls = 0

    def probe() -> list[tuple[str, int]]:
        nonlocal calls
        calls += 1
        return [("sdxl-base", 0)]

    with anyio.fail_after(1):
        await wait_released(probe, timeout_s=0.5)
    assert calls == 1


@pytest.mark.anyio
async def test_wait_released_polls_until_the_memory_is_back(device: SimulatedDevice) -> None:
    device.allocate("sdxl-base", gib(10.5))
    device.free("sdxl-base", after_s=0.05)  # a slow release, as a dying process's
    t0 = time.monotonic()
    await wait_released(lambda: [("sdxl-base", device.held_by("sdxl-base"))], timeout_s=2, poll_s=0.002)
    assert time.monotonic() - t0 >= 0.04
    assert device.used_bytes() == 0


@pytest.mark.anyio
async def test_wait_released_names_who_still_holds_memory_after_the_timeout() -> None:
    def probe() -> list[tuple[str, int]]:
        return [("qwen-14b", 0), ("sdxl-base", 2 * GIB), ("pid 4242", GIB)]

    t0 = time.monotonic()
    with pytest.raises(VRAMNotReleased) as info:
        await wait_released(probe, timeout_s=0.05, poll_s=0.005, what="stopping the server")
    assert time.monotonic() - t0 >= 0.05
    err = info.value
    assert err.model == "sdxl-base"
    msg = str(err)
    assert "sdxl-base still holds 2.00 GiB" in msg
    assert "pid 4242 still holds 1.00 GiB" in msg
    assert "qwen-14b" not in msg  # it gave its memory back
    assert "0.05 s after stopping the server" in msg
    assert isinstance(err, RuntimeError)


@pytest.mark.anyio
async def test_wait_released_with_zero_timeout_still_looks_once() -> None:
    with pytest.raises(VRAMNotReleased, match="unloading"):
        await wait_released(lambda: [("m", 1)], timeout_s=0)
    await wait_released(lambda: [], timeout_s=0)


# -- the Model Management Module's Example 2 ------------------------------------------------------

EXAMPLE_2 = """\
from orchestrator import VRAMMonitor

monitor = VRAMMonitor()

# Check VRAM before loading
models_to_check = ["qwen-14b", "sdxl-base", "sdxl-controlnet"]

for model_name in models_to_check:
    if monitor.can_fit_model(model_name):
        estimate = monitor.get_model_estimate(model_name)
        print(f"✓ {model_name}: Can fit (~{estimate.estimated_vram_gb:.1f}GB)")
    else:
        print(f"✗ {model_name}: Insufficient VRAM")

# Require specific VRAM before proceeding
try:
    monitor.require_free_vram(required_gb=12.0, model_name="SDXL+ControlNet")
    print("✓ Sufficient VRAM available")
except RuntimeError as e:
    print(f"✗ Error: {e}")
    # Handle insufficient VRAM (e.g., unload other models)
"""


def test_design_example_2_runs(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "PYTHONIOENCODING": "utf-8",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "HOME": str(tmp_path),
    }
    r = subprocess.run(
        [sys.executable, "-c", EXAMPLE_2],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=60,
    )
    out, err = r.stdout.decode("utf-8"), r.stderr.decode("utf-8")
    assert r.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 4, out
    for line, name in zip(lines, ["qwen-14b", "sdxl-base", "sdxl-controlnet"], strict=False):
        assert line.startswith(("✓ ", "✗ ")) and name in line
    if "simulated device" in err:  # no GPU here: the module's 16 GiB card, empty
        assert lines == [
            "✓ qwen-14b: Can fit (~11.5GB)",
            "✓ sdxl-base: Can fit (~10.5GB)",
            "✓ sdxl-controlnet: Can fit (~14.5GB)",
            "✓ Sufficient VRAM available",
        ]
