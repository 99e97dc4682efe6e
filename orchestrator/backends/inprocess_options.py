"""What the in-process backends (diffusers, TTS) share before a model exists: torch imported
quietly, and the options every in-process type accepts."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.backends.options import dtype_option, no_unknown, path_option
from orchestrator.spec import BackendOptions


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Import heavy libraries without their import-time deprecation noise.

    transformers and diffusers decorate functions with ``torch.jit.script``, which torch 2.13
    deprecates with a warning at import: not ours to fix, and under ``-W error`` it would stop
    the import. Only that warning is silenced, only while importing.
    """
    # transformers also logs, once per class, that image processors fall back on PIL without
    # torchvision: noise for text-to-image and TTS, which use none of them.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        try:  # imported first: transformers sets its loggers' level when it is first imported
            import transformers
        except ImportError:
            yield
            return
        hf_logging = transformers.utils.logging
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)


def import_torch(what: str, extra: str) -> Any:
    try:
        import torch
    except ImportError:
        raise RuntimeError(f"{what} needs torch: pip install 'vram-orchestrator[{extra}]'") from None
    return torch


@dataclass(frozen=True)
class InProcessOptions(BackendOptions):
    """What every in-process model's ``backend:`` has: its local folder and the dtype."""

    path: Path
    dtype: str = "auto"

    def default_max_concurrent(self, *, device: str, total_bytes: int, gpu_name: str) -> int | None:
        return 1  # one pipeline draws one image (or speaks one text) at a time

    @staticmethod
    def common(opts: Mapping[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
        """The shared keys, checked: ``{"path": Path, "dtype": str}``."""
        no_unknown(opts, allowed)
        path = path_option(opts)
        assert path is not None
        return {"path": path, "dtype": dtype_option(opts)}
