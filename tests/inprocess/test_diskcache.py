"""The packed checkpoint cache: the tiny models load from it byte-identical to a load from
their source; a changed source, a damaged entry, concurrent writers, the budget and the
``cache`` command."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator.backends.diskcache import DiskCache
from orchestrator.backends.diskread import read_into
from orchestrator.backends.inprocess import InProcessBackend
from orchestrator.backends.packed import ALIGN_BYTES, PackedWeights
from orchestrator.backends.registry import create_backend
from orchestrator.config import parse_config
from orchestrator.device.simulated import SimulatedDevice
from orchestrator.errors import ConfigError
from tests.inprocess.conftest import config_text

torch = pytest.importorskip("torch")

MODELS = ("sdxl-base", "sdxl-lora", "sdxl-lora-controlnet", "tts-small")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def cached_config(tiny: dict[str, Path], cache_dir: Path, budget_gb: float = 1.0) -> Any:
    return parse_config(config_text(tiny) + f'cache: {{path: "{cache_dir}", budget_gb: {budget_gb}}}\n')


def backend_for(tiny: dict[str, Path], cache_dir: Path, name: str) -> InProcessBackend:
    config = cached_config(tiny, cache_dir)
    b = create_backend(
        config.models[name], config=config, device=SimulatedDevice(config.total_bytes), log_dir=cache_dir
    )
    assert isinstance(b, InProcessBackend)
    return b


def run_once(b: InProcessBackend, name: str) -> tuple[Any, dict[str, Any]]:
    """Load, compute one output with a fixed seed, copy the state dicts, unload."""

    async def go() -> tuple[Any, dict[str, Any]]:
        handle = await b.load()
        with torch.no_grad():
            if name.startswith("tts"):
                out = handle.synthesize("hello there", seed=0)[0]
            else:
                kw: dict[str, Any] = {}
                if "controlnet" in name:
                    from PIL import Image

                    kw["image"] = Image.new("RGB", (64, 64), (120, 30, 200))
                out = handle(
                    "a lighthouse",
                    num_inference_steps=2,
                    height=64,
                    width=64,
                    generator=torch.Generator().manual_seed(0),
                    output_type="np",
                    **kw,
                ).images
        state = {f"{c}.{k}": v.clone() for c, m in b._modules.items() for k, v in m.state_dict().items()}
        del handle
        await b.unload()
        return out, state

    return anyio.run(go)


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def cache_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "disk cache" in r.getMessage()
    ]


@pytest.mark.parametrize("name", MODELS)
def test_a_load_from_the_cache_is_byte_identical_to_one_from_the_source(
    tiny: dict[str, Path], cache_dir: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    import numpy as np

    b = backend_for(tiny, cache_dir, name)
    assert not b.cached  # nothing written yet: the first load is the source's
    out0, state0 = run_once(b, name)
    assert b.last_load_from == "source" and "cache_write_s" in b.timings
    assert b.cached  # the next cold load comes from the cache
    entry = b.cache_entry
    assert entry is not None and entry.state() == "fresh"
    index = json.loads((entry.folder / "index.json").read_text())
    assert all(t["offset"] % ALIGN_BYTES == 0 for t in index["tensors"])
    assert (entry.folder / index["data"]).stat().st_size == index["data_bytes"]

    fresh = backend_for(tiny, cache_dir, name)  # another process's view: a new backend
    out1, state1 = run_once(fresh, name)
    assert fresh.last_load_from == "cache" and "read_s" in fresh.timings
    assert np.array_equal(out0, out1)
    assert same_state(state0, state1)
    assert not cache_warnings(caplog)


def test_tied_weights_stay_tied_and_the_host_tier_still_works(tiny: dict[str, Path], cache_dir: Path) -> None:
    from states.ledger import Tier

    run_once(backend_for(tiny, cache_dir, "sdxl-base"), "sdxl-base")
    b = backend_for(tiny, cache_dir, "sdxl-base")

    async def go() -> None:
        pipe = await b.load()
        assert b.last_load_from == "cache"
        assert b._packed is not None and b._packed.shares_one_buffer()
        te = pipe.text_encoder
        assert all(p.device.type == "cpu" for p in te.parameters())
        # offload keeps the host copy (no copy back) and a restore brings it back
        await b.offload(Tier.HOST)
        assert b.tier is Tier.HOST
        await b.restore()
        assert b._packed.shares_one_buffer()
        del pipe, te
        await b.unload()

    anyio.run(go)


def test_a_changed_source_rebuilds_the_entry(
    tiny: dict[str, Path], cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_once(backend_for(tiny, cache_dir, "sdxl-lora"), "sdxl-lora")
    run_once(backend_for(tiny, cache_dir, "sdxl-base"), "sdxl-base")
    lora_file = next(tiny["tiny-sdxl-lora"].rglob("*.safetensors"))
    st = lora_file.stat()
    try:
        os.utime(lora_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "touch"
        lora, base = backend_for(tiny, cache_dir, "sdxl-lora"), backend_for(tiny, cache_dir, "sdxl-base")
        assert not lora.cached and lora.cache_entry is not None and lora.cache_entry.state() == "stale"
        assert base.cached  # the base pipeline does not read the LoRA
        caplog.clear()
        run_once(lora, "sdxl-lora")
        assert lora.last_load_from == "source"
        warnings = cache_warnings(caplog)
        assert len(warnings) == 1 and "stale" in warnings[0] and "a source file changed" in warnings[0]
        assert lora.cached  # rewritten from the source
        again = backend_for(tiny, cache_dir, "sdxl-lora")
        run_once(again, "sdxl-lora")
        assert again.last_load_from == "cache"
    finally:
        os.utime(lora_file, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated data", "garbage index", "missing data"])
def test_a_damaged_entry_falls_back_to_the_source_with_one_warning(
    tiny: dict[str, Path], cache_dir: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    import numpy as np

    first = backend_for(tiny, cache_dir, "tts-small")
    out0, state0 = run_once(first, "tts-small")
    entry = first.cache_entry
    assert entry is not None
    index = json.loads((entry.folder / "index.json").read_text())
    data = entry.folder / index["data"]
    if damage == "flipped bytes":
        with open(data, "r+b") as f:
            f.seek(index["data_bytes"] // 2)
            f.write(b"\xff" * 64)
    elif damage == "truncated data":
        os.truncate(data, index["data_bytes"] // 2)
    elif damage == "garbage index":
        (entry.folder / "index.json").write_text('{"format": 1, "tensors": [')
    else:
        data.unlink()
    caplog.clear()
    b = backend_for(tiny, cache_dir, "tts-small")
    out1, state1 = run_once(b, "tts-small")
    assert b.last_load_from == "source"
    assert np.array_equal(out0, out1) and same_state(state0, state1)
    assert len(cache_warnings(caplog)) == 1, cache_warnings(caplog)
    again = backend_for(tiny, cache_dir, "tts-small")  # rewritten: the next load is the cache's
    out2, _ = run_once(again, "tts-small")
    assert again.last_load_from == "cache" and np.array_equal(out0, out2)


def test_a_damaged_mapped_entry_falls_back_too(
    tiny: dict[str, Path], cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a model without a host tier, on the CPU: its weights are the data file's mapped pages
    first = backend_for(tiny, cache_dir, "sdxl-lora-controlnet")
    run_once(first, "sdxl-lora-controlnet")
    entry = first.cache_entry
    assert entry is not None
    index = json.loads((entry.folder / "index.json").read_text())
    with open(entry.folder / index["data"], "r+b") as f:
        f.seek(index["data_bytes"] - 300)
        f.write(b"\x7f" * 32)
    caplog.clear()
    b = backend_for(tiny, cache_dir, "sdxl-lora-controlnet")
    run_once(b, "sdxl-lora-controlnet")
    assert b.last_load_from == "source"
    (warning,) = cache_warnings(caplog)
    assert "checksum" in warning


# -- the cache on its own: small modules, no pipelines -------------------------------------------


class Small(torch.nn.Module):  # type: ignore[misc]
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(16, width)
        self.mid = torch.nn.Linear(width, width).half()
        self.out = torch.nn.Linear(width, 16, bias=False)
        self.out.weight = self.emb.weight  # tied
        self.norm = torch.nn.BatchNorm1d(width)


@pytest.fixture
def small() -> Iterator[Small]:
    torch.manual_seed(0)
    yield Small().eval()


def empty_small(width: int = 32) -> Small:
    from orchestrator.backends.diskread import empty_weights

    with empty_weights():
        return Small(width).eval()


def test_a_skeleton_filled_from_the_cache_has_the_same_tensors(small: Small, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"weights")
    cache = DiskCache(tmp_path / "c", 1 << 30)
    entry = cache.entry("small", {"v": 1}, [src])
    want = {k: v.clone() for k, v in small.state_dict().items()}
    assert entry.write(PackedWeights({"m": small}, pin=False))
    skeleton = empty_small()
    assert skeleton.mid.weight.device.type == "meta"
    packed, _ = entry.load({"m": skeleton}, device="cpu", keep_host=False, pin=False)
    got = skeleton.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert skeleton.out.weight is skeleton.emb.weight  # tied again
    assert packed.shares_one_buffer()


def test_a_skeleton_of_another_shape_is_refused(small: Small, tmp_path: Path) -> None:
    from orchestrator.backends.packed import LayoutMismatch

    cache = DiskCache(tmp_path / "c", 1 << 30)
    entry = cache.entry("small", {"v": 1}, [])
    entry.write(PackedWeights({"m": small}, pin=False))
    with pytest.raises(LayoutMismatch, match="shape"):
        entry.load({"m": empty_small(width=8)}, device="cpu", keep_host=False, pin=False)


def test_concurrent_writers_leave_one_complete_entry(small: Small, tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c", 1 << 30)
    entry = cache.entry("small", {"v": 1}, [])
    packed = PackedWeights({"m": small}, pin=False)
    (tmp_path / "c").mkdir()
    start = threading.Barrier(6)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            start.wait()
            for _ in range(5):
                c = DiskCache(tmp_path / "c", 1 << 30).entry("small", {"v": 1}, [])
                assert c.write(packed)
                assert c.state() == "fresh"  # at every moment, what a reader finds is whole
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert entry.state() == "fresh"
    files = sorted(p.name for p in entry.folder.iterdir())
    named = json.loads((entry.folder / "index.json").read_text())["data"]
    assert named in files and all(not f.endswith(".tmp") for f in files)
    skeleton = empty_small()
    entry.load({"m": skeleton}, device="cpu", keep_host=False, pin=False)
    assert torch.equal(skeleton.mid.weight, small.mid.weight)


def test_a_half_written_file_is_never_read(small: Small, tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c", 1 << 30)
    entry = cache.entry("small", {"v": 1}, [])
    entry.write(PackedWeights({"m": small}, pin=False))
    # a writer that crashed: its data went to a .tmp name, its index never renamed
    (entry.folder / "weights-dead.bin.tmp").write_bytes(b"\0" * 100)
    (entry.folder / "index.json.dead.tmp").write_text("{")
    assert entry.state() == "fresh"
    skeleton = empty_small()
    entry.load({"m": skeleton}, device="cpu", keep_host=False, pin=False)
    assert torch.equal(skeleton.emb.weight, small.emb.weight)


def test_the_budget_removes_the_least_recently_used_entry(small: Small, tmp_path: Path) -> None:
    packed = PackedWeights({"m": small}, pin=False)
    cache = DiskCache(tmp_path / "c", 2 * packed.total_bytes)  # room for two
    a, b, c = (cache.entry(n, {"v": 1}, []) for n in ("a", "b", "c"))
    assert a.write(packed) and b.write(packed)
    os.utime(a.folder / "index.json", (1000, 1000))
    os.utime(b.folder / "index.json", (2000, 2000))
    a.load({"m": empty_small()}, device="cpu", keep_host=False, pin=False)  # a is used again
    assert c.write(packed)
    assert sorted(e.model for e in cache.entries()) == ["a", "c"]  # b was the least recent
    assert cache.used_bytes() == 2 * packed.total_bytes
    too_small = DiskCache(tmp_path / "d", packed.total_bytes - 1)
    assert not too_small.entry("x", {}, []).write(packed)  # larger than the budget: not cached


def test_reading_in_chunks_with_threads_gives_the_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 * 4096 + 123)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    host = torch.empty(len(data), dtype=torch.uint8)
    seen: list[tuple[int, int, int]] = []
    read_into(path, host, chunk_bytes=4096, threads=3, on_chunk=lambda *a: seen.append(a))
    assert bytes(host.numpy()) == data
    assert seen == [(0, 0, 4096), (1, 4096, 4096), (2, 8192, 4096), (3, 12288, 123)]  # in order


def sums_of(data: bytes, chunk: int) -> list[int]:
    from orchestrator.backends.diskread import checksum

    return [checksum(memoryview(data)[o : o + chunk]) for o in range(0, len(data), chunk)]


def test_the_checksum_is_the_words_sum_modulo_2_64() -> None:
    from orchestrator.backends.diskread import checksum

    words = [2**64 - 1, 5, 2**63]
    data = b"".join(w.to_bytes(8, "little") for w in words)
    assert checksum(memoryview(data)) == sum(words) % 2**64
    assert checksum(memoryview(b"")) == 0


@pytest.mark.parametrize("populate", ["MADV_POPULATE_READ", "a kernel without it"])
def test_a_mapped_read_gives_the_bytes_writable_and_leaves_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, populate: str
) -> None:
    from orchestrator.backends import diskread

    if populate != "MADV_POPULATE_READ":
        monkeypatch.setattr(diskread, "_populate_read", None)  # MADV_WILLNEED and a read of each page
    chunk = 4 * diskread.PAGE_BYTES
    data = os.urandom(5 * chunk + 8 * 13)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    read = diskread.MappedRead(path, len(data), chunk_bytes=chunk, threads=3, sums=sums_of(data, chunk))
    pages = read.result()
    assert bytes(pages.numpy()) == data and 0 < read.read_s
    pages[:4] = 0  # the weights are writable; the page gets its own copy, the file stays
    assert bytes(pages[:4].numpy()) == b"\0" * 4 and path.read_bytes() == data
    unchecked = diskread.map_file(path, len(data), chunk_bytes=chunk)
    assert bytes(unchecked.numpy()) == data


def test_a_mapped_read_refuses_a_damaged_file(tmp_path: Path) -> None:
    from orchestrator.backends.diskread import CacheCorrupt, MappedRead

    chunk = 16384
    data = bytearray(os.urandom(4 * chunk))
    sums = sums_of(bytes(data), chunk)
    data[3 * chunk + 100] ^= 1
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(CacheCorrupt, match="chunk 3 does not match its checksum"):
        MappedRead(path, len(data), chunk_bytes=chunk, threads=2, sums=sums).result()
    with pytest.raises(CacheCorrupt, match="the index says"):
        MappedRead(path, len(data) + 8, chunk_bytes=chunk, sums=None)
    with pytest.raises(CacheCorrupt, match="5 checksums"):
        MappedRead(path, len(data), chunk_bytes=chunk, sums=[*sums, 0])


def test_a_mapped_read_the_kernel_cannot_complete_is_corrupt_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctypes
    import errno

    from orchestrator.backends import diskread

    if diskread._madvise is None:
        pytest.skip("no libc madvise here")

    def failing(addr: int, length: int, option: int) -> int:
        ctypes.set_errno(errno.EFAULT if option == diskread.MADV_POPULATE_READ else 0)
        return -1

    monkeypatch.setattr(diskread, "_madvise", failing)
    monkeypatch.setattr(diskread, "_populate_read", diskread.MADV_POPULATE_READ or 22)
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(diskread.CacheCorrupt, match="cannot be read at 0 bytes"):
        diskread.map_file(path, 8192, chunk_bytes=4096)

    def unsupported(addr: int, length: int, option: int) -> int:
        ctypes.set_errno(errno.EINVAL)  # a kernel before 5.14
        return -1

    monkeypatch.setattr(diskread, "_madvise", unsupported)
    assert bytes(diskread.map_file(path, 8192, chunk_bytes=4096).numpy()) == path.read_bytes()
    assert diskread._populate_read is None  # asked once, then the fallback


def test_a_prefetch_is_taken_over_by_the_load_or_cancelled(small: Small, tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c", 1 << 30)
    entry = cache.entry("small", {"v": 1}, [])
    packed = PackedWeights({"m": small}, pin=False)
    assert entry.write(packed)
    assert not entry.prefetch("cpu", keep_host=True)  # the host tier reads into its own buffer
    assert entry.prefetch("cpu", keep_host=False)
    assert entry._pending is not None
    skeleton = empty_small()
    _, timings = entry.load({"m": skeleton}, device="cpu", keep_host=False, pin=False)
    assert entry._pending is None and timings["read_s"] > 0 and "read_wait_s" in timings
    assert torch.equal(skeleton.mid.weight, small.mid.weight) and skeleton.out.weight is skeleton.emb.weight
    # a load that fails (the layout is not the skeleton's) stops the read it was given
    assert entry.prefetch("cpu", keep_host=False)
    read = entry._pending[1] if entry._pending is not None else None
    from orchestrator.backends.packed import LayoutMismatch

    with pytest.raises(LayoutMismatch):
        entry.load({"m": empty_small(width=8)}, device="cpu", keep_host=False, pin=False)
    assert entry._pending is None and read is not None and read._mapping is None
    # a write replaces the entry's data file: a read started before it is dropped
    assert entry.prefetch("cpu", keep_host=False)
    assert entry.write(packed) and entry._pending is None
    entry.cancel_prefetch()  # nothing pending: nothing happens
    missing = cache.entry("other", {"v": 1}, [])
    assert not missing.prefetch("cpu", keep_host=False)  # no entry: load says why


# -- config and command ---------------------------------------------------------------------------


BASE = """\
hardware: {device: simulated, total_vram_gb: 16.0, safe_max_vram_gb: 15.5}
models:
  m: {kind: llm, vram_gb: 1}
"""


def test_the_cache_key_is_checked() -> None:
    assert parse_config(BASE).cache is None
    c = parse_config(BASE + "cache: {path: /x, budget_gb: 2, verify: false}").cache
    assert c is not None and (c.path, c.budget_bytes, c.verify) == ("/x", 2 << 30, False)
    d = parse_config(BASE + "cache: {budget_gb: 2}").cache
    assert d is not None and d.path.endswith("vram-orchestrator/checkpoints")
    for bad, key in (
        ("cache: {path: /x}", "cache.budget_gb"),
        ("cache: {path: /x, budget_gb: 0}", "cache.budget_gb"),
        ("cache: {path: 3, budget_gb: 1}", "cache.path"),
        ("cache: {path: /x, budget_gb: 1, verify: 1}", "cache.verify"),
        ("cache: {path: /x, budget_gb: 1, size: 1}", "cache.size"),
        ("cache: [1]", "cache"),
    ):
        with pytest.raises(ConfigError) as exc:
            parse_config(BASE + bad)
        assert exc.value.key == key, (bad, str(exc.value))


def test_the_cache_command_lists_and_clears(
    tiny: dict[str, Path], cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator.cli import main

    run_once(backend_for(tiny, cache_dir, "tts-small"), "tts-small")
    run_once(backend_for(tiny, cache_dir, "sdxl-base"), "sdxl-base")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config_text(tiny) + f'cache: {{path: "{cache_dir}", budget_gb: 1}}\n')
    assert main(["cache", "list", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and "tts-small" in out and "sdxl-base" in out and "fresh" in out
    assert main(["cache", "list", "--json", "--config", str(cfg)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {e["model"] for e in report["entries"]} == {"tts-small", "sdxl-base"}
    assert report["used_bytes"] == sum(e["bytes"] for e in report["entries"]) > 0
    assert main(["status", "--json", "--config", str(cfg)]) == 0
    status = json.loads(capsys.readouterr().out)
    cached = {m["name"]: m["cached"] for m in status["models"]}
    assert cached["tts-small"] and cached["sdxl-base"] and not cached["sdxl-lora"]
    assert main(["cache", "clear", "--model", "tts-small", "--config", str(cfg)]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert [e.model for e in DiskCache(cache_dir, 1 << 30).entries()] == ["sdxl-base"]
    assert main(["cache", "clear", "--config", str(cfg)]) == 0
    assert DiskCache(cache_dir, 1 << 30).entries() == []
    nocache = tmp_path / "n.yaml"
    nocache.write_text(BASE)
    assert main(["cache", "list", "--config", str(nocache)]) == 1
    assert "has no cache" in capsys.readouterr().err


def test_the_orchestrator_learns_the_cache_load_as_its_own_cost(
    tiny: dict[str, Path], cache_dir: Path
) -> None:
    from orchestrator.runtime import Orchestrator

    async def go() -> None:
        async with Orchestrator(cached_config(tiny, cache_dir)) as orch:
            loads: list[str] = []

            def seen(e: Any) -> None:
                if e.kind == "load":
                    loads.append(e.detail or "")
                    durations.append(float(e.duration_s))

            orch.add_listener(seen)
            for _ in range(2):
                async with orch.acquire("tts-small"):
                    pass
                await orch.unload("tts-small")
            assert loads == ["from disk", "from disk (packed cache)"]
            backend = orch.backend("tts-small")
            assert isinstance(backend, InProcessBackend) and backend.last_load_from == "cache"
            # the estimate is the cache load's own figure, not a blend with the source load
            assert orch._ctx.costs["tts-small"].load_s == pytest.approx(durations[-1], abs=0.01)

    durations: list[float] = []
    anyio.run(go)


def test_a_load_from_elsewhere_replaces_the_learned_cost() -> None:
    from orchestrator.runtime import Orchestrator

    ctx = Orchestrator(parse_config(BASE))._ctx
    ctx.learn_cost("m", "load_s", 10.0, origin="source")
    assert ctx.costs["m"].load_s == 10.0
    ctx.learn_cost("m", "load_s", 1.0, origin="cache")  # the cache's first: replaces
    assert ctx.costs["m"].load_s == 1.0
    ctx.learn_cost("m", "load_s", 2.0, origin="cache")  # then blends as before
    assert ctx.costs["m"].load_s == pytest.approx(1.3)
    ctx.learn_cost("m", "unload_s", 4.0)
    ctx.learn_cost("m", "unload_s", 2.0)  # no origin: blends
    assert ctx.costs["m"].unload_s == pytest.approx(3.4)
