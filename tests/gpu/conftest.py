"""GPU tests: real NVML, real CUDA memory. Skipped (with the reason) where there is no GPU."""

from __future__ import annotations

from pathlib import Path

import pytest


def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from orchestrator.device.nvml import NvmlDevice

        NvmlDevice(0).close()
    except Exception as exc:
        return f"NVML does not answer: {exc}"
    return None


REASON = _cuda_reason()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if REASON is not None:
                item.add_marker(pytest.mark.skip(reason=f"GPU test: {REASON}"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny SDXL and TTS models, built once for the GPU tests."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from orchestrator.tiny_models import build

    return build(tmp_path_factory.mktemp("tiny"), ("tiny-sdxl", "tiny-tts"))
