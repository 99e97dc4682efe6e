"""The learned-footprint store: high-water semantics, persistence, concurrent writers, corrupt
files, the learned times kept beside the footprints; and the unit conversions between bytes
(inside) and GiB (messages, ``*_gb``)."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.config import parse_config
from orchestrator.device.simulated import SimulatedDevice
from orchestrator.footprints import FORMAT_VERSION, Footprint, FootprintStore, default_path
from orchestrator.monitor import ModelEstimate, VRAMMonitor, VRAMSnapshot, open_store
from states.errors import InsufficientVRAM
from states.units import GIB, MIB, format_gib, gib_to_bytes
from tests.orchestrator.conftest import build_config, config_yaml

LOGGER = "orchestrator.footprints"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "footprints.json"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# -- record / get: high-water semantics ----------------------------------------------------------


def test_an_empty_store_knows_nothing(path: Path) -> None:
    store = FootprintStore(path)
    assert store.get("qwen-14b") is None
    assert store.all() == {}
    assert not path.exists()  # reading an absent file creates nothing


def test_a_first_load_sets_load_and_peak(path: Path) -> None:
    fp = FootprintStore(path).record("qwen-14b", 5 * GIB, kind="load")
    assert (fp.model, fp.load_bytes, fp.peak_bytes, fp.samples) == ("qwen-14b", 5 * GIB, 5 * GIB, 1)
    assert fp.high_water_bytes == 5 * GIB


def test_a_first_peak_leaves_the_load_unknown(path: Path) -> None:
    fp = FootprintStore(path).record("sdxl-base", 7 * GIB, kind="peak")
    assert fp.load_bytes == 0
    assert fp.peak_bytes == 7 * GIB
    assert fp.high_water_bytes == 7 * GIB


def test_the_load_is_a_high_water_mark(path: Path) -> None:
    store = FootprintStore(path)
    store.record("m", 5 * GIB, kind="load")
    fp = store.record("m", 3 * GIB, kind="load")
    assert fp.load_bytes == 5 * GIB  # a smaller load does not lower it
    assert fp.peak_bytes == 5 * GIB
    fp = store.record("m", 6 * GIB, kind="load")
    assert (fp.load_bytes, fp.peak_bytes) == (6 * GIB, 6 * GIB)
    assert fp.samples == 3


def test_a_peak_raises_the_peak_but_not_the_load(path: Path) -> None:
    store = FootprintStore(path)
    store.record("m", 5 * GIB, kind="load")
    fp = store.record("m", 8 * GIB, kind="peak")
    assert (fp.load_bytes, fp.peak_bytes, fp.high_water_bytes) == (5 * GIB, 8 * GIB, 8 * GIB)
    fp = store.record("m", 2 * GIB, kind="peak")  # a lower peak changes nothing but the count
    assert (fp.load_bytes, fp.peak_bytes, fp.samples) == (5 * GIB, 8 * GIB, 3)
    assert store.get("m") == fp


def test_a_load_above_an_earlier_peak_raises_both(path: Path) -> None:
    store = FootprintStore(path)
    store.record("m", 4 * GIB, kind="peak")
    fp = store.record("m", 9 * GIB, kind="load")
    assert (fp.load_bytes, fp.peak_bytes) == (9 * GIB, 9 * GIB)


def test_high_water_is_the_larger_of_load_and_peak() -> None:
    assert Footprint("m", 9, 3, 1, 0.0).high_water_bytes == 9
    assert Footprint("m", 3, 9, 1, 0.0).high_water_bytes == 9


def test_models_are_kept_apart(path: Path) -> None:
    store = FootprintStore(path)
    store.record("a", 1 * GIB)
    store.record("b", 2 * GIB)
    assert store.get("a").high_water_bytes == 1 * GIB  # type: ignore[union-attr]
    assert store.get("b").high_water_bytes == 2 * GIB  # type: ignore[union-attr]
    assert sorted(store.all()) == ["a", "b"]


def test_a_negative_measurement_is_rejected_and_nothing_is_written(path: Path) -> None:
    store = FootprintStore(path)
    with pytest.raises(ValueError, match="negative"):
        store.record("m", -1)
    assert store.get("m") is None
    assert not path.exists()


def test_a_zero_measurement_is_accepted(path: Path) -> None:
    fp = FootprintStore(path).record("m", 0)
    assert fp.high_water_bytes == 0


def test_forget_removes_a_model_from_the_file(path: Path) -> None:
    store = FootprintStore(path)
    store.record("a", 1 * GIB)
    store.record("b", 2 * GIB)
    store.forget("a")
    assert store.get("a") is None
    assert sorted(read_json(path)["models"]) == ["b"]
    assert FootprintStore(path).get("a") is None


def test_all_returns_a_copy(path: Path) -> None:
    store = FootprintStore(path)
    store.record("a", GIB)
    snapshot = store.all()
    store.record("b", GIB)
    assert "b" not in snapshot


# -- persistence ---------------------------------------------------------------------------------


def test_footprints_persist_across_instances(path: Path) -> None:
    FootprintStore(path).record("qwen-14b", 12 * GIB, kind="load")
    FootprintStore(path).record("qwen-14b", 13 * GIB, kind="peak")
    fp = FootprintStore(path).get("qwen-14b")
    assert fp is not None
    assert (fp.load_bytes, fp.peak_bytes, fp.samples) == (12 * GIB, 13 * GIB, 2)


def test_the_file_is_versioned_json_in_bytes(path: Path) -> None:
    FootprintStore(path).record("sdxl-base", gib_to_bytes(11.65), kind="peak")
    raw = read_json(path)
    assert raw["version"] == FORMAT_VERSION
    entry = raw["models"]["sdxl-base"]
    assert entry["peak_bytes"] == gib_to_bytes(11.65) == 12509092250
    assert isinstance(entry["peak_bytes"], int)
    assert entry["load_bytes"] == 0
    assert entry["samples"] == 1
    assert isinstance(entry["updated"], float)
    assert "model" not in entry  # the key is the model


def test_a_store_merges_what_another_instance_wrote_meanwhile(path: Path) -> None:
    first, second = FootprintStore(path), FootprintStore(path)
    first.record("a", 1 * GIB)
    second.record("b", 2 * GIB)  # reads the file again under the lock: keeps "a"
    assert sorted(second.all()) == ["a", "b"]
    assert sorted(read_json(path)["models"]) == ["a", "b"]


def test_times_persist_beside_the_footprints(path: Path) -> None:
    store = FootprintStore(path)
    store.note_time("qwen-14b", "load_s", 31.5)
    store.note_time("qwen-14b", "hold_s", 2.0)
    store.note_time("qwen-14b", "hold_s", 2.5)  # a running estimate: the latest stands
    assert store.times("qwen-14b") == {"load_s": 31.5, "hold_s": 2.5}  # before any flush
    assert store.pending == 2 and not path.exists()
    store.record("qwen-14b", 12 * GIB)  # one write takes both
    assert read_json(path)["times"] == {"qwen-14b": {"hold_s": 2.5, "load_s": 31.5}}
    again = FootprintStore(path)
    assert again.times("qwen-14b") == {"load_s": 31.5, "hold_s": 2.5}
    assert again.times("sdxl-base") == {}
    assert again.get("qwen-14b") is not None


def test_a_file_without_times_is_read_as_before_and_gains_them(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"version": FORMAT_VERSION, "models": {"m": GOOD_ENTRY}}))
    store = FootprintStore(path)
    assert store.get("m") is not None and store.times("m") == {}
    store.note_time("m", "unload_s", 4.0)
    store.flush()
    raw = read_json(path)
    assert raw["models"]["m"]["peak_bytes"] == 2 and raw["times"] == {"m": {"unload_s": 4.0}}


@pytest.mark.parametrize(("what", "seconds"), [("warmup_s", 1.0), ("load_s", -0.5), ("hold_s", math.nan)])
def test_a_time_is_one_the_store_knows_in_finite_seconds(path: Path, what: str, seconds: float) -> None:
    store = FootprintStore(path)
    with pytest.raises(ValueError, match="time"):
        store.note_time("m", what, seconds)
    assert store.times("m") == {} and store.pending == 0


def test_times_merge_with_what_another_instance_wrote_meanwhile(path: Path) -> None:
    first, second = FootprintStore(path), FootprintStore(path)
    first.note_time("a", "load_s", 10.0)
    first.flush()
    second.note_time("a", "hold_s", 3.0)
    second.note_time("b", "load_s", 1.0)
    second.flush()  # reads the file again under the lock: keeps the first's load_s
    assert read_json(path)["times"] == {"a": {"hold_s": 3.0, "load_s": 10.0}, "b": {"load_s": 1.0}}
    assert second.times("a") == {"load_s": 10.0, "hold_s": 3.0}


def test_forget_removes_a_models_times(path: Path) -> None:
    store = FootprintStore(path)
    store.note_time("a", "load_s", 10.0)
    store.note_time("b", "load_s", 5.0)
    store.flush()
    store.forget("a")
    assert store.times("a") == {} and FootprintStore(path).times("a") == {}
    assert FootprintStore(path).times("b") == {"load_s": 5.0}


def test_no_temporary_files_are_left_behind(path: Path) -> None:
    store = FootprintStore(path)
    for i in range(5):
        store.record(f"m{i}", i * GIB)
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_an_in_memory_store_writes_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    store = FootprintStore(None)
    assert store.path is None
    store.record("m", 3 * GIB)
    store.record("m", 4 * GIB, kind="peak")
    fp = store.get("m")
    assert fp is not None and (fp.load_bytes, fp.peak_bytes, fp.samples) == (3 * GIB, 4 * GIB, 2)
    store.note_time("m", "hold_s", 2.0)
    assert store.times("m") == {"hold_s": 2.0} and store.pending == 0  # nothing to persist
    store.forget("m")
    assert store.get("m") is None and store.times("m") == {}
    assert list(tmp_path.rglob("*")) == []
    assert FootprintStore(None).get("m") is None  # nothing shared between instances


# -- concurrent writers ---------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """\
    import sys
    from orchestrator.footprints import FootprintStore
    path, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = FootprintStore(path)
    for i in range(n):
        for m in range(3):
            store.record(f"{prefix}-{m}", (i + 1) * 1024 + m, kind="load" if i % 2 else "peak")
    """
)


def test_concurrent_writers_from_several_processes_lose_nothing(path: Path) -> None:
    writers, rounds = 4, 25
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), f"w{w}", str(rounds)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(writers)
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    raw = read_json(path)  # valid JSON: no torn write
    assert raw["version"] == FORMAT_VERSION
    expected = {f"w{w}-{m}" for w in range(writers) for m in range(3)}
    assert set(raw["models"]) == expected  # no writer overwrote another's models
    for name, entry in raw["models"].items():
        m = int(name.rsplit("-", 1)[1])
        assert entry["samples"] == rounds, name  # no lost update within a model
        assert entry["peak_bytes"] == rounds * 1024 + m
        assert entry["load_bytes"] == (rounds if rounds % 2 == 0 else rounds - 1) * 1024 + m
    store = FootprintStore(path)
    assert set(store.all()) == expected
    assert not list(path.parent.glob("*.tmp"))
    assert not list(path.parent.glob("*.corrupt"))


# -- corrupt files ---------------------------------------------------------------------------------

GOOD_ENTRY = {"load_bytes": 1, "peak_bytes": 2, "samples": 1, "updated": 0.0}

CORRUPT = {
    "garbage": "this is not json {",
    "empty": "",
    "top-level list": json.dumps([1, 2, 3]),
    "wrong version": json.dumps({"version": 99, "models": {"m": GOOD_ENTRY}}),
    "no version": json.dumps({"models": {"m": GOOD_ENTRY}}),
    "negative load": json.dumps({"version": 1, "models": {"m": {**GOOD_ENTRY, "load_bytes": -5}}}),
    "negative peak": json.dumps({"version": 1, "models": {"m": {**GOOD_ENTRY, "peak_bytes": -1}}}),
    "string bytes": json.dumps({"version": 1, "models": {"m": {**GOOD_ENTRY, "load_bytes": "lots"}}}),
    "null bytes": json.dumps({"version": 1, "models": {"m": {**GOOD_ENTRY, "peak_bytes": None}}}),
    "models a list": json.dumps({"version": 1, "models": [GOOD_ENTRY]}),
    "entry a number": json.dumps({"version": 1, "models": {"m": 12}}),
    "missing key": json.dumps({"version": 1, "models": {"m": {"load_bytes": 1}}}),
    "no models": json.dumps({"version": 1}),
    "negative time": json.dumps({"version": 1, "models": {}, "times": {"m": {"load_s": -1.0}}}),
    "unknown time": json.dumps({"version": 1, "models": {}, "times": {"m": {"warmup_s": 1.0}}}),
    "string time": json.dumps({"version": 1, "models": {}, "times": {"m": {"hold_s": "long"}}}),
    "infinite time": json.dumps({"version": 1, "models": {}, "times": {"m": {"hold_s": math.inf}}}),
    "times a list": json.dumps({"version": 1, "models": {}, "times": [1.0]}),
}


@pytest.mark.parametrize("content", list(CORRUPT.values()), ids=list(CORRUPT))
def test_a_corrupt_file_is_moved_aside_and_learning_starts_again(
    path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        store = FootprintStore(path)
    assert store.all() == {}
    aside = path.with_name(path.name + ".corrupt")
    assert aside.read_text() == content  # kept for a look, not lost
    assert not path.exists()
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "corrupt" in warnings[0].getMessage()
    assert str(aside) in warnings[0].getMessage()
    # Learning starts again and writes a good file.
    store.record("m", 3 * GIB)
    assert read_json(path)["models"]["m"]["load_bytes"] == 3 * GIB
    assert FootprintStore(path).get("m") is not None


def test_a_file_corrupted_between_records_is_set_aside_on_the_next_record(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FootprintStore(path)
    store.record("a", 1 * GIB)
    path.write_text("{ torn")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        fp = store.record("b", 2 * GIB)
    assert fp.samples == 1
    assert path.with_name(path.name + ".corrupt").read_text() == "{ torn"
    assert set(read_json(path)["models"]) == {"b"}
    assert any("corrupt" in r.getMessage() for r in caplog.records)


def test_a_good_file_logs_no_warning(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    FootprintStore(path).record("m", GIB)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert FootprintStore(path).get("m") is not None
    assert not [r for r in caplog.records if r.name == LOGGER]
    assert not path.with_name(path.name + ".corrupt").exists()


# -- where the file lives --------------------------------------------------------------------------


def test_default_path_honours_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_path() == tmp_path / "xdg" / "vram-orchestrator" / "footprints.json"


@pytest.mark.parametrize("xdg", [None, ""])
def test_default_path_falls_back_to_dot_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, xdg: str | None
) -> None:
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_path() == tmp_path / "home" / ".cache" / "vram-orchestrator" / "footprints.json"


def test_a_real_device_config_stores_in_the_cache_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    config = parse_config(config_yaml().replace("device: simulated", "device: auto"))
    assert config.footprints_path == "default"
    store = open_store(config)
    assert store.path == tmp_path / "xdg" / "vram-orchestrator" / "footprints.json"


def test_a_simulated_config_keeps_footprints_in_memory() -> None:
    config = build_config()
    assert config.footprints_path is None
    assert open_store(config).path is None


def test_an_explicit_footprints_path_is_used(path: Path) -> None:
    config = parse_config(config_yaml() + f"monitor:\n  footprints_path: {json.dumps(str(path))}\n")
    store = open_store(config)
    assert store.path == path
    store.record("qwen-14b", GIB)
    assert path.exists()


def test_a_path_with_a_tilde_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    store = FootprintStore("~/fp/footprints.json")
    store.record("m", GIB)
    assert (tmp_path / "fp" / "footprints.json").exists()


# -- units: bytes inside, GiB outside --------------------------------------------------------------


def test_model_estimate_reports_gib_from_bytes() -> None:
    e = ModelEstimate("qwen-14b", "llm", gib_to_bytes(11.5), gib_to_bytes(11.5), None, "high", "config")
    assert e.estimated_vram_gb == 11.5
    assert e.drift_bytes is None
    e = ModelEstimate("m", "llm", 3 * GIB + 512 * MIB, 3 * GIB, 3 * GIB + 256 * MIB, "low", "measured")
    assert e.estimated_vram_gb == 3.5
    assert e.drift_bytes == 256 * MIB


def test_a_negative_drift_says_the_config_overestimates() -> None:
    e = ModelEstimate("m", "llm", 4 * GIB, 4 * GIB, 3 * GIB, "low", "config")
    assert e.drift_bytes == -GIB


def test_snapshot_gb_properties_are_binary_gigabytes() -> None:
    s = VRAMSnapshot(
        source="simulated",
        device_name="d",
        total_bytes=16 * GIB,
        used_bytes=6 * GIB + 512 * MIB,
        free_bytes=9 * GIB + 512 * MIB,
        budget_bytes=gib_to_bytes(15.5),
        process_bytes=None,
        allocated_bytes=None,
        reserved_bytes=None,
        foreign=((11, 2 * GIB), (12, GIB)),
    )
    assert (s.total_gb, s.used_gb, s.free_gb) == (16.0, 6.5, 9.5)
    # Without torch, allocated/reserved fall back to the device's used bytes.
    assert s.allocated_gb == 6.5
    assert s.reserved_gb == 6.5
    assert s.foreign_bytes == 3 * GIB
    assert s.budget_free_bytes == 9 * GIB  # 15.5 budget - 6.5 used


def test_snapshot_uses_torch_figures_when_present() -> None:
    s = VRAMSnapshot("torch", "d", 16 * GIB, 8 * GIB, 8 * GIB, 15 * GIB, None, 3 * GIB, 4 * GIB, ())
    assert s.allocated_gb == 3.0
    assert s.reserved_gb == 4.0


def test_budget_free_is_never_more_than_the_device_has_free_nor_negative() -> None:
    s = VRAMSnapshot("nvml", "d", 16 * GIB, 2 * GIB, 1 * GIB, 15 * GIB, None, None, None, ())
    assert s.budget_free_bytes == 1 * GIB  # the device has less free than the budget leaves
    over = VRAMSnapshot("nvml", "d", 16 * GIB, 15 * GIB + 1, GIB - 1, 15 * GIB, None, None, None, ())
    assert over.budget_free_bytes == 0


def test_gib_conversions_round_trip() -> None:
    assert gib_to_bytes(1) == GIB == 1073741824
    assert gib_to_bytes(11.5) == 12348030976
    assert format_gib(gib_to_bytes(11.65)) == "11.65 GiB"
    assert format_gib(-GIB // 2) == "-0.50 GiB"


def test_a_learned_footprint_in_bytes_shows_as_gib_in_the_estimate() -> None:
    store = FootprintStore(None)
    store.record("qwen-14b", gib_to_bytes(12.0))
    monitor = VRAMMonitor(SimulatedDevice(16 * GIB), build_config(), footprints=store)
    e = monitor.get_model_estimate("qwen-14b")
    assert e.learned_bytes == 12 * GIB
    assert e.estimated_vram_gb == pytest.approx(12.0 * 1.05)
    assert e.drift_bytes == GIB // 2


def test_an_insufficient_vram_message_gives_gib() -> None:
    err = InsufficientVRAM("m", gib_to_bytes(12.0), gib_to_bytes(9.5), gib_to_bytes(15.5))
    assert err.shortfall_bytes == gib_to_bytes(2.5)
    assert "needs 12.00 GiB" in str(err)
    assert "only 9.50 GiB of the 15.50 GiB budget" in str(err)
    assert "short 2.50 GiB" in str(err)
