"""Reading a packed cache entry's data file at the storage's speed, in large chunks by several
threads, each chunk's checksum checked as soon as it is in: on a GPU straight into the
(pinned) host buffer, each chunk copied to the device as soon as it arrives; on the CPU
without a host tier as a private mapping of the file whose pages are brought in and kept as
they are (``MappedRead``: nothing copied). ``orchestrator.backends.diskcache`` decides what
to read where."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import sys
import threading
import time
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
    """The bytes' 64-bit little-endian words summed modulo 2**64 (its length a multiple of 8):
    any single changed word changes it. numpy sums at 20 GB/s and more on one core, where
    zlib's CRC32 ran at 1.2-3.8 GB/s and BLAKE2b near 1 GB/s on the same machine.

    numpy's sum: one thread, no thread pool of its own (torch's OpenMP teams, one per calling
    thread, oversubscribe the cores when several reader threads check at once), and the GIL
    released while it runs.
    """
    import numpy as np

    if not len(view):
        return 0
    return int(np.frombuffer(view, dtype="<u8").sum(dtype=np.uint64))


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


CAN_MAP = hasattr(mmap, "MAP_PRIVATE")  # POSIX: the CPU's mapped load; elsewhere read_into
# Linux 5.14+: fault the range's pages in for reading (no copy-on-write copy); the number is
# the kernel's (uapi/asm-generic/mman-common.h), which Python 3.11's mmap does not export yet.
MADV_POPULATE_READ: int | None = getattr(
    mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None
)
_populate_read = MADV_POPULATE_READ  # None once the kernel said it has no such advice
PAGE_BYTES = mmap.PAGESIZE


def _find_madvise() -> Any:
    """libc's ``madvise`` through ctypes, which lets go of the GIL while it runs (the mmap
    object's own ``madvise`` holds it: a populate of 1 GiB stopped every other thread of the
    process for 0.5 s, the skeleton's construction and the other readers with it)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, TypeError):  # pragma: no cover - not a POSIX libc
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _find_madvise() if CAN_MAP else None


def _touch(view: memoryview) -> None:
    """Read one byte of every page of ``view``."""
    import numpy as np

    np.frombuffer(view, dtype=np.uint8)[::PAGE_BYTES].sum()


def _populate(mapping: mmap.mmap, base: int, view: memoryview, off: int) -> None:
    """Bring the pages of ``view`` (``mapping`` from ``off``; the mapping starts at address
    ``base``) in and map them, read-only until written (the page cache's own pages: nothing
    is copied). ``MADV_POPULATE_READ`` where the kernel has it; else ``MADV_WILLNEED`` (the
    kernel's readahead) and a read of every page."""
    global _populate_read
    option = _populate_read
    if option is not None:
        if _madvise is not None:
            failed = _madvise(base + off, len(view), option) != 0
            err = ctypes.get_errno() if failed else 0
        else:  # pragma: no cover - no ctypes libc: the mmap object's own (holds the GIL)
            try:
                mapping.madvise(option, off, len(view))
                failed, err = False, 0
            except OSError as exc:
                failed, err = True, exc.errno or 0
        if not failed:
            return
        if err != errno.EINVAL:  # EFAULT/EIO: the file ended early or cannot be read
            raise CacheCorrupt(f"its data file cannot be read at {off} bytes ({os.strerror(err)})")
        _populate_read = None  # a kernel before 5.14
    with contextlib.suppress(OSError, AttributeError):
        mapping.madvise(mmap.MADV_WILLNEED, off, len(view))
    _touch(view)


class MappedRead:
    """The file (``total`` bytes) mapped privately and brought into memory in the background.

    Its pages are the page cache's, mapped as they are (what safetensors' memory map gives
    ``from_pretrained`` on the CPU): no copy into freshly allocated memory, which on a VM
    costs as much as the read itself. Writable like any tensor: a page written to gets its
    own copy (copy-on-write; the cache never writes into a data file that exists, a new
    write of the entry goes to a new file). ``threads`` threads bring the file in
    ``chunk_bytes`` at a time, and each checks its chunk's checksum (``sums``) as soon as the
    chunk is in, while the others wait on the disk. ``result()`` waits for every chunk and
    returns the file as a uint8 tensor (which keeps the mapping alive); ``cancel()`` stops.
    """

    def __init__(
        self,
        path: Path,
        total: int,
        *,
        chunk_bytes: int = CHUNK_BYTES,
        threads: int = READ_THREADS,
        sums: Sequence[int] | None = None,
    ) -> None:
        self.started_s = time.perf_counter()
        self.done_s = self.started_s
        self.total = total
        self._mapping: mmap.mmap | None = None
        self._futures: list[Future[None]] = []
        if total == 0:
            return
        starts = range(0, total, chunk_bytes)
        if sums is not None and len(starts) != len(sums):
            raise CacheCorrupt(f"its data file has {len(starts)} chunks, the index {len(sums)} checksums")
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size != total:
                raise CacheCorrupt(f"its data file is {size} bytes, the index says {total}")
            mapping = mmap.mmap(fd, total, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._mapping = mapping
        base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))

        def one(i: int) -> None:
            off = starts[i]
            with memoryview(mapping) as whole, whole[off : off + chunk_bytes] as piece:
                _populate(mapping, base, piece, off)
                if sums is not None:
                    _check(piece, sums, i)
                else:
                    # The first read of a page just read from the disk costs something of its
                    # own (on a VM: 0.6-1.8 s for 6.46 GiB after the pages were mapped):
                    # paid here, while the other threads wait on the disk.
                    _touch(piece)
            self.done_s = max(self.done_s, time.perf_counter())

        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cache-map")
        self._futures = [pool.submit(one, i) for i in range(len(starts))]
        pool.shutdown(wait=False)  # its threads end with the last chunk

    def result(self) -> Any:
        """Wait for every chunk; the file as a uint8 tensor. ``CacheCorrupt`` when a chunk
        could not be read or does not match its checksum (the rest is cancelled first)."""
        import torch

        try:
            for fut in self._futures:
                fut.result()
        except BaseException:
            self.cancel()
            raise
        if self._mapping is None:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self._mapping, dtype=torch.uint8)

    @property
    def read_s(self) -> float:
        """From the start until the last chunk was in (and checked)."""
        return self.done_s - self.started_s

    def cancel(self) -> None:
        """Stop: chunks not begun are not read; waits for those under way."""
        for fut in self._futures:
            fut.cancel()
        for fut in self._futures:
            if not fut.cancelled():
                with contextlib.suppress(BaseException):
                    fut.result()
        self._futures = []
        self._mapping = None


def map_file(
    path: Path,
    total: int,
    *,
    chunk_bytes: int = CHUNK_BYTES,
    threads: int = READ_THREADS,
    sums: Sequence[int] | None = None,
) -> Any:
    """``MappedRead(...).result()``: the file as a writable uint8 tensor over a private
    mapping of it, every page in memory (and checked against ``sums``)."""
    return MappedRead(path, total, chunk_bytes=chunk_bytes, threads=threads, sums=sums).result()


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
