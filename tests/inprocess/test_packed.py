"""``PackedWeights``: one buffer, one copy, views; outputs unchanged through offload/restore."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from orchestrator.backends.packed import ALIGN_BYTES, PackedWeights  # noqa: E402


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6)
        self.mid = torch.nn.Linear(6, 6).half()
        self.out = torch.nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight  # tied: one tensor in two places
        self.norm = torch.nn.BatchNorm1d(6)  # buffers too (running stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(x).mean(1))
        h = self.mid(h.half()).float()
        return self.out(h)


@pytest.fixture
def model() -> Tied:
    torch.manual_seed(0)
    m = Tied().eval()
    with torch.no_grad():
        m.norm.running_mean.uniform_()
    return m


def test_packs_every_tensor_once_aligned(model: Tied) -> None:
    p = PackedWeights({"m": model}, pin=False)
    distinct = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    assert p.tensor_count == len(distinct)
    assert p.total_bytes % ALIGN_BYTES == 0
    assert all(s.offset % ALIGN_BYTES == 0 for s in p._slots)
    need = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert need <= p.total_bytes < need + ALIGN_BYTES * p.tensor_count
    assert p.shares_one_buffer() and not p.on_device


def test_outputs_survive_offload_and_restore(model: Tied) -> None:
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        before = model(x)
    p = PackedWeights({"m": model}, pin=False)
    for _ in range(2):
        copy_s = p.to_device("cpu")
        assert copy_s >= 0 and p.on_device
        assert p.shares_one_buffer()
        base = p.device_buffer.untyped_storage().data_ptr()
        assert model.mid.weight.untyped_storage().data_ptr() == base
        assert model.out.weight is model.emb.weight  # still tied
        with torch.no_grad():
            assert torch.equal(model(x), before)
        p.to_host()
        assert p.device_buffer is None
        assert model.mid.weight.untyped_storage().data_ptr() == p.host.untyped_storage().data_ptr()
        with torch.no_grad():
            assert torch.equal(model(x), before)


def test_offload_drops_the_device_buffer(model: Tied) -> None:
    import weakref

    p = PackedWeights({"m": model}, pin=False)
    p.to_device("cpu")
    ref = weakref.ref(p.device_buffer)
    p.to_host()
    # nothing else holds the device buffer: it is freed at once, with no gc.collect()
    assert ref() is None


def test_dtypes_and_shapes_kept(model: Tied) -> None:
    shapes = {n: (t.dtype, t.shape) for n, t in model.state_dict().items()}
    p = PackedWeights({"m": model}, pin=False)
    p.to_device("cpu")
    assert {n: (t.dtype, t.shape) for n, t in model.state_dict().items()} == shapes
    assert model.mid.weight.dtype == torch.float16
    assert model.norm.num_batches_tracked.dtype == torch.int64
