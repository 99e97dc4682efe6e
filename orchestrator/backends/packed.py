"""One model's weights packed into one host buffer, restored with one copy.

Measured on an H200, PCIe Gen5 x16: all of SDXL (6.46 GiB) packed into ONE pinned, 256-byte
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

from collections.abc import Iterable, Mapping, Sequence
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
    names: list[tuple[str, str, bool]]  # (component, qualified tensor name, is a parameter)


@dataclass(frozen=True)
class SlotRecord:
    """One slot of the layout as the disk cache stores it: where its bytes are, what they
    are, and every place the tensor is found (a tied weight has several)."""

    offset: int
    nbytes: int
    dtype: str  # torch's name without "torch.", e.g. "float16"
    shape: tuple[int, ...]
    places: tuple[tuple[str, str, bool], ...]  # (component, qualified name, is a parameter)


class LayoutMismatch(ValueError):
    """The modules' tensors are not the ones a stored layout describes."""


def _tensors(modules: Mapping[str, Any]) -> Iterable[tuple[str, str, Any, str, Any, bool]]:
    """(component, qualified name, module, attribute, tensor, is a parameter) of every tensor."""
    for root_name, root in modules.items():
        for path, module in root.named_modules():
            prefix = f"{path}." if path else ""
            for name, p in module._parameters.items():
                if p is not None:
                    yield root_name, prefix + name, module, name, p, True
            for name, b in module._buffers.items():
                if b is not None:
                    yield root_name, prefix + name, module, name, b, False


class PackedWeights:
    """The tensors of ``modules``, packed into one (pinned, where possible) host buffer.

    ``pack`` copies every tensor into the host buffer once (from wherever it is now).
    ``to_device`` makes one device buffer, copies the whole host buffer into it with one
    asynchronous copy, waits for it, and re-points every tensor at a view of it.
    ``to_host`` re-points every tensor at its host view and drops the device buffer.
    """

    def __init__(self, modules: Mapping[str, Any], *, pin: bool) -> None:
        import torch

        slots: dict[int, _Slot] = {}
        offset = 0
        for root, qual, module, name, t, is_param in _tensors(modules):
            key = id(t)  # a tied weight is one tensor object in several places
            if key in slots:
                slots[key].places.append((module, name, is_param))
                slots[key].names.append((root, qual, is_param))
                continue
            nbytes = t.numel() * t.element_size()
            slots[key] = _Slot(
                offset, nbytes, t.dtype, tuple(t.shape), [(module, name, is_param)], [(root, qual, is_param)]
            )
            offset += _align(max(nbytes, 1))
        self._setup(torch, tuple(modules), list(slots.values()), offset, pin=pin)
        for slot, view in zip(self._slots, self._host_views, strict=True):
            module, name, is_param = slot.places[0]
            src = (module._parameters if is_param else module._buffers)[name]
            view.copy_(src.detach().reshape(slot.shape))
        self._fresh_params = True
        self._point(self._host_views)

    @classmethod
    def for_layout(
        cls,
        modules: Mapping[str, Any],
        layout: Sequence[SlotRecord],
        total_bytes: int,
        *,
        pin: bool,
        host: bool,
    ) -> PackedWeights:
        """Modules built without their weights (a skeleton: parameters on the meta device),
        bound to a stored ``layout``; the buffer is allocated but neither filled nor pointed at.

        Fill ``host`` (with ``host=True``; pinned with ``pin``) or give the filled buffer to
        ``adopt_device_buffer``, then call ``point``. A ``LayoutMismatch`` when the modules'
        tensors (names, parameter or buffer, shapes) are not exactly the layout's.
        """
        import torch

        found = {
            (root, qual, is_param): (module, name, t)
            for root, qual, module, name, t, is_param in _tensors(modules)
        }
        wanted = {place for rec in layout for place in rec.places}
        if set(found) != wanted:
            missing = sorted(q for _, q, _ in wanted - set(found))[:3]
            extra = sorted(q for _, q, _ in set(found) - wanted)[:3]
            raise LayoutMismatch(
                f"the model's tensors differ from the stored ones (missing {missing}, extra {extra})"
            )
        slots = []
        end = 0
        for rec in layout:
            dtype = getattr(torch, rec.dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise LayoutMismatch(f"unknown dtype {rec.dtype!r}")
            numel = 1
            for d in rec.shape:
                numel *= d
            if numel * dtype.itemsize != rec.nbytes or rec.offset % ALIGN_BYTES or rec.offset < end:
                raise LayoutMismatch(f"slot at offset {rec.offset} is inconsistent")
            end = rec.offset + rec.nbytes
            places = []
            for place in rec.places:
                module, name, t = found[place]
                if tuple(t.shape) != rec.shape:
                    raise LayoutMismatch(f"{place[0]}.{place[1]}: shape {tuple(t.shape)}, stored {rec.shape}")
                places.append((module, name, place[2]))
            slots.append(_Slot(rec.offset, rec.nbytes, dtype, rec.shape, places, list(rec.places)))
        if end > total_bytes:
            raise LayoutMismatch(f"the slots end at {end} bytes, past the data's {total_bytes}")
        self = cls.__new__(cls)
        self._setup(torch, tuple(modules), slots, total_bytes, pin=pin and host, host=host)
        return self

    def _setup(
        self,
        torch: Any,
        names: tuple[str, ...],
        slots: list[_Slot],
        total_bytes: int,
        *,
        pin: bool,
        host: bool = True,
    ) -> None:
        self._torch = torch
        self.names = names
        self._slots = slots
        self.total_bytes = total_bytes
        self._fresh_params = False
        # One allocation of exactly this size; pinning is the slow part (10.2 s for 12 GiB,
        # measured on an H200 host), paid once per load. Not torch's pin_memory=True: its host allocator
        # rounds each block up to a power of two (6.46 GiB pins 8) and keeps freed blocks
        # pinned in its cache; registering our own buffer pins what we use and unpins it
        # when we let go.
        self.host: Any = torch.empty(self.total_bytes, dtype=torch.uint8) if host else None
        self._registered = False
        self.pinned = False
        if pin and host:
            self._pin()
        self.device_buffer: Any = None
        self.device: Any = None
        # The host views never change: made once, filled once, an offload only assigns them.
        self._host_views: list[Any] = self._views(self.host) if host else []

    def layout(self) -> list[SlotRecord]:
        """The slots as the disk cache stores them."""
        return [
            SlotRecord(s.offset, s.nbytes, str(s.dtype).removeprefix("torch."), s.shape, tuple(s.names))
            for s in self._slots
        ]

    def adopt_device_buffer(self, buf: Any, device: Any) -> None:
        """``buf`` (``total_bytes`` on ``device``, already filled) is the device copy."""
        self.device_buffer, self.device = buf, self._torch.device(device)

    def point(self) -> None:
        """Point every tensor at the device buffer if there is one, else at the host buffer.

        The first call after ``for_layout`` makes each slot one new parameter shared by all
        its places (a skeleton's parameters are on the meta device and cannot take data):
        tied weights are tied again.
        """
        views = self._views(self.device_buffer) if self.device_buffer is not None else self._host_views
        if not self._fresh_params:
            torch = self._torch
            for slot, view in zip(self._slots, views, strict=True):
                shared: Any = None
                for module, name, is_param in slot.places:
                    if is_param:
                        if shared is None:
                            old = module._parameters[name]
                            shared = torch.nn.Parameter(view, requires_grad=bool(old.requires_grad))
                        module._parameters[name] = shared
                    else:
                        module._buffers[name] = view
            self._fresh_params = True
            return
        self._point(views)

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
        if self.host is None:
            raise RuntimeError("this model's weights have no host copy (it was loaded without one)")
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
