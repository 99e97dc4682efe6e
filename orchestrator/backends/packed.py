"""One model's weights packed into one host buffer, restored with one copy.

FIELD-NOTES section 1: on an H200, all of SDXL (6.46 GiB) packed into ONE pinned, 256-byte
aligned host buffer and restored with one copy into one device buffer reached 99% of the pinned
link (0.126 s); per-parameter copies reached 63%, pageable memory about 10%. Inference weights
never change, so once the host copy exists an offload only re-points the parameters at it and
drops the device buffer: nothing is copied back, and no ``gc.collect()`` is needed (the device
buffer's last reference goes, its memory is freed at once).

``PackedWeights`` owns that layout for a set of ``torch.nn.Module``\\ s (a pipeline's UNet, VAE
and text encoders; a TTS model): each distinct tensor (parameters and buffers; tied weights
once) gets an aligned slice of the buffer, and the modules' tensors become views into either
the host buffer (offloaded) or the device buffer (resident).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ALIGN_BYTES = 256  # CUDA's allocation granularity for views; also aligns every dtype


def _align(n: int) -> int:
    return (n + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


@dataclass
class _Slot:
    offset: int
    nbytes: int
    dtype: Any
    shape: tuple[int, ...]
    places: list[tuple[Any, str, bool]]  # (module, attribute name, is a parameter)


def _tensors(modules: Iterable[Any]) -> Iterable[tuple[Any, str, Any, bool]]:
    for root in modules:
        for module in root.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    yield module, name, p, True
            for name, b in module._buffers.items():
                if b is not None:
                    yield module, name, b, False


class PackedWeights:
    """The tensors of ``modules``, packed into one (pinned, where possible) host buffer.

    ``pack`` copies every tensor into the host buffer once (from wherever it is now).
    ``to_device`` makes one device buffer, copies the whole host buffer into it with one
    asynchronous copy, waits for it, and re-points every tensor at a view of it.
    ``to_host`` re-points every tensor at its host view and drops the device buffer.
    """

    def __init__(self, modules: Mapping[str, Any], *, pin: bool) -> None:
        import torch

        self._torch = torch
        self.names = tuple(modules)
        slots: dict[int, _Slot] = {}
        offset = 0
        for module, name, t, is_param in _tensors(modules.values()):
            key = id(t)  # a tied weight is one tensor object in several places
            if key in slots:
                slots[key].places.append((module, name, is_param))
                continue
            nbytes = t.numel() * t.element_size()
            slots[key] = _Slot(offset, nbytes, t.dtype, tuple(t.shape), [(module, name, is_param)])
            offset += _align(max(nbytes, 1))
        self._slots = list(slots.values())
        self.total_bytes = offset
        # One allocation of exactly this size; pinning is the slow part (FIELD-NOTES: 10.2 s
        # for 12 GiB), paid once per load. Not torch's pin_memory=True: its host allocator
        # rounds each block up to a power of two (6.46 GiB pins 8) and keeps freed blocks
        # pinned in its cache; registering our own buffer pins what we use and unpins it
        # when we let go.
        self.host = torch.empty(self.total_bytes, dtype=torch.uint8)
        self._registered = False
        self.pinned = False
        if pin:
            self._pin()
        self.device_buffer: Any = None
        self.device: Any = None
        # The host views never change: made once, filled once, an offload only assigns them.
        self._host_views = self._views(self.host)
        for slot, view in zip(self._slots, self._host_views, strict=True):
            module, name, is_param = slot.places[0]
            src = (module._parameters if is_param else module._buffers)[name]
            view.copy_(src.detach().reshape(slot.shape))
        self._point(self._host_views)

    def _pin(self) -> None:
        torch = self._torch
        try:
            # flags 1 = cudaHostRegisterPortable (as torch's own cuda/_pin_memory_utils.py)
            rc = torch.cuda.cudart().cudaHostRegister(self.host.data_ptr(), self.total_bytes, 1)
            self._registered = int(rc) == 0
        except Exception:  # pragma: no cover - a torch without the cudart binding
            self._registered = False
        if not self._registered:  # fall back on torch's pinned allocator
            self.host = torch.empty(self.total_bytes, dtype=torch.uint8, pin_memory=True)
        self.pinned = True

    def _unpin(self) -> None:
        if self._registered and self.host is not None:
            try:
                self._torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr())
            except Exception:  # pragma: no cover - the driver is going away
                pass
            self._registered = False

    @property
    def tensor_count(self) -> int:
        return len(self._slots)

    @property
    def on_device(self) -> bool:
        return self.device_buffer is not None

    def _views(self, buf: Any) -> list[Any]:
        """Every slot's view of ``buf``: one typed view of the buffer per dtype, then one
        ``as_strided`` per tensor (thousands of tensors in SDXL: keep it to one op each)."""
        typed: dict[Any, Any] = {}
        out = []
        for slot in self._slots:
            whole = typed.get(slot.dtype)
            if whole is None:
                whole = typed[slot.dtype] = buf.view(slot.dtype)
            size = whole.element_size()
            stride, acc = [], 1
            for dim in reversed(slot.shape):
                stride.append(acc)
                acc *= dim
            out.append(whole.as_strided(slot.shape, tuple(reversed(stride)), slot.offset // size))
        return out

    def _point(self, views: list[Any]) -> None:
        torch = self._torch
        for slot, view in zip(self._slots, views, strict=True):
            for module, name, is_param in slot.places:
                if is_param:
                    p = module._parameters[name]
                    if isinstance(p, torch.nn.Parameter):
                        p.data = view
                    else:  # pragma: no cover - a plain tensor registered as a parameter
                        module._parameters[name] = torch.nn.Parameter(view, requires_grad=False)
                else:
                    module._buffers[name] = view

    def to_device(self, device: Any) -> float:
        """Copy the host buffer to ``device`` with one copy; returns the copy's seconds."""
        import time

        torch = self._torch
        device = torch.device(device)
        if self.device_buffer is not None and self.device == device:
            return 0.0
        buf = torch.empty(self.total_bytes, dtype=torch.uint8, device=device)
        t0 = time.perf_counter()
        buf.copy_(self.host, non_blocking=self.pinned)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        copy_s = time.perf_counter() - t0
        self.device_buffer, self.device = buf, device
        self._point(self._views(buf))
        return copy_s

    def to_host(self) -> None:
        """Point every tensor back at the host copy and drop the device buffer (no copy)."""
        self._point(self._host_views)
        self.device_buffer = None
        self.device = None

    def shares_one_buffer(self) -> bool:
        """Whether every tensor of the modules is a view into the current buffer (a check)."""
        buf = self.device_buffer if self.device_buffer is not None else self.host
        base = buf.untyped_storage().data_ptr()
        for slot in self._slots:
            for module, name, is_param in slot.places:
                t = (module._parameters if is_param else module._buffers)[name]
                if t.untyped_storage().data_ptr() != base:
                    return False
        return True

    def release(self) -> None:
        """Drop both buffers (the modules are about to be dropped too) and unpin."""
        self.device_buffer = None
        self.device = None
        self._unpin()
        self.host = None
        self._host_views = []
        self._slots = []
