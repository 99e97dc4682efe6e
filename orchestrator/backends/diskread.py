"""Reading a packed cache entry's data file at the storage's speed: large chunks read by
several threads straight into the (pinned) host buffer, each chunk's checksum checked, and on
a GPU each chunk copied to the device as soon as it arrives (``orchestrator.backends.
diskcache`` decides what to read where)."""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

CHUNK_BYTES = 64 << 20  # large sequential reads; also the unit of the pipelined device copy
READ_THREADS = 4


class CacheCorrupt(ValueError):
    """An entry that cannot be used as it is (unreadable, truncated, inconsistent)."""


def _pread_full(fd: int, out: memoryview, offset: int) -> None:
    got = 0
    while got < len(out):
        n = os.preadv(fd, [out[got:]], offset + got)
        if n <= 0:
            raise CacheCorrupt(f"its data file ended early (at {offset + got} bytes)")
        got += n


def checksum(view: memoryview) -> int:
    """The bytes' 64-bit little-endian words summed modulo 2**64 (its length a multiple of 8)."""
    import torch

    if not len(view):
        return 0
    return int(torch.frombuffer(view, dtype=torch.int64).sum(dtype=torch.int64)) % (1 << 64)


def _check(view: memoryview, sums: Sequence[int] | None, i: int) -> None:
    if sums is not None and checksum(view) != sums[i]:
        raise CacheCorrupt(f"its data file is damaged (chunk {i} does not match its checksum)")


def read_into(
    path: Path,
    host: Any,
    *,
    chunk_bytes: int = CHUNK_BYTES,
    threads: int = READ_THREADS,
    sums: Sequence[int] | None = None,
    on_chunk: Callable[[int, int, int], None] | None = None,
) -> None:
    """Read the file ``path`` into the uint8 tensor ``host`` (its whole size) in chunks of
    ``chunk_bytes`` with ``threads`` readers; ``on_chunk(i, offset, nbytes)`` is called in
    order, in this thread, as each chunk has arrived (the pipelined device copy)."""
    total = int(host.numel())
    view = memoryview(host.numpy())
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, 0, total, os.POSIX_FADV_SEQUENTIAL)
        starts = list(range(0, total, chunk_bytes))

        def one(i: int) -> None:
            off = starts[i]
            piece = view[off : off + chunk_bytes]
            _pread_full(fd, piece, off)
            _check(piece, sums, i)

        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cache-read") as pool:
            futures = [pool.submit(one, i) for i in range(len(starts))]
            try:
                for i, fut in enumerate(futures):
                    fut.result()
                    if on_chunk is not None:
                        on_chunk(i, starts[i], min(chunk_bytes, total - starts[i]))
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    finally:
        os.close(fd)


MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux


def map_file(path: Path) -> Any:
    """The file as a writable uint8 tensor over a private (copy-on-write) mapping of it, its
    pages read in by the kernel before this returns (``MAP_POPULATE``)."""
    import torch

    fd = os.open(path, os.O_RDONLY)
    try:
        mapping = mmap.mmap(
            fd, 0, flags=mmap.MAP_PRIVATE | MAP_POPULATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
    finally:
        os.close(fd)
    return torch.frombuffer(mapping, dtype=torch.uint8)  # the tensor keeps the mapping alive


def verify(data: Any, chunk: int, sums: Sequence[int], threads: int = READ_THREADS) -> None:
    """Check every chunk of the uint8 tensor ``data`` against its checksum, in threads."""
    view = memoryview(data.numpy())
    starts = range(0, len(view), chunk)
    if len(starts) != len(sums):
        raise CacheCorrupt(f"its data file has {len(starts)} chunks, the index {len(sums)} checksums")
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cache-verify") as pool:
        list(pool.map(lambda i: _check(view[starts[i] : starts[i] + chunk], sums, i), range(len(starts))))


def _read_to_device(path: Path, host: Any, buf: Any, chunk: int, sums: Sequence[int] | None) -> None:
    """Read into the pinned ``host`` copy; each chunk goes on to ``buf`` (on the GPU) on a
    side stream as soon as it has arrived, while the next chunks are read."""
    import torch

    stream = torch.cuda.Stream(device=buf.device)

    def copy(i: int, off: int, n: int) -> None:
        with torch.cuda.stream(stream):
            buf[off : off + n].copy_(host[off : off + n], non_blocking=True)

    read_into(path, host, chunk_bytes=chunk, sums=sums, on_chunk=copy)
    stream.synchronize()


def _stream_to_device(path: Path, buf: Any, chunk: int, sums: Sequence[int] | None) -> None:
    """Read the file to ``buf`` (on the GPU) through a ring of pinned staging chunks: a
    chunk's slot is read into again only once its copy to the device is done."""
    import torch

    total = int(buf.numel())
    slots_n = 2 * READ_THREADS
    ring = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(slots_n)]
    views = [memoryview(r.numpy()) for r in ring]
    done = [torch.cuda.Event() for _ in range(slots_n)]
    stream = torch.cuda.Stream(device=buf.device)
    starts = list(range(0, total, chunk))
    fd = os.open(path, os.O_RDONLY)
    lock = threading.Lock()
    try:

        def one(i: int) -> None:
            n = min(chunk, total - starts[i])
            piece = views[i % slots_n][:n]
            _pread_full(fd, piece, starts[i])
            _check(piece, sums, i)

        with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="cache-read") as pool:
            futures: dict[int, Future[None]] = {}
            for i in range(min(slots_n, len(starts))):
                futures[i] = pool.submit(one, i)
            for i in range(len(starts)):
                futures.pop(i).result()
                s, n = i % slots_n, min(chunk, total - starts[i])
                with lock, torch.cuda.stream(stream):
                    buf[starts[i] : starts[i] + n].copy_(ring[s][:n], non_blocking=True)
                    done[s].record(stream)
                nxt = i + slots_n
                if nxt < len(starts):
                    done[s].synchronize()  # the slot's copy is done: it may be read into again
                    futures[nxt] = pool.submit(one, nxt)
        stream.synchronize()
    finally:
        os.close(fd)


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules without allocating or initialising their parameters (meta device):
    accelerate's ``init_empty_weights`` (buffers stay real; the cache overwrites them)."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate is a dependency of the extras
        raise CacheCorrupt(
            "building a model without its weights needs accelerate (pip install accelerate)"
        ) from None
    with init_empty_weights(include_buffers=False):
        yield
