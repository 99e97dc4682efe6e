"""Text to speech in this process: a VITS / MMS-TTS model from transformers.

Config (``backend: {type: tts, path: DIR}``, optional ``dtype``): ``DIR`` holds a
``VitsModel`` and its tokenizer (``save_pretrained`` layout). ``lease.handle`` is a
``Speaker``: ``speaker.synthesize(text)`` returns the waveform (float32 samples in [-1, 1])
and its sampling rate; ``speaker.wav(text)`` returns a 16-bit PCM WAV file's bytes.

GPT-SoVITS runs as its own API server: use the generic server backend for it
(``configs/gpt-sovits-server.yaml``).
"""

from __future__ import annotations

import io
import threading
import wave
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.backends.base import BackendType
from orchestrator.backends.inprocess import InProcessBackend
from orchestrator.backends.inprocess_options import InProcessOptions
from orchestrator.spec import Config, ModelSpec

if TYPE_CHECKING:
    from orchestrator.device.base import Device

OPTION_KEYS = ("path", "dtype")


@dataclass(frozen=True)
class TtsOptions(InProcessOptions):
    @classmethod
    def parse(cls, opts: Mapping[str, Any]) -> TtsOptions:
        """Validate a ``type: tts`` mapping; raises ``OptionError`` naming the key."""
        return cls(**cls.common(opts, OPTION_KEYS))


class Speaker:
    """A loaded TTS model: text in, waveform out. Calls are serialized (one model, one user
    at a time, as a shared lease may have several tasks)."""

    def __init__(self, model: Any, tokenizer: Any, torch: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.sampling_rate = int(model.config.sampling_rate)
        self._torch = torch
        self._lock = threading.Lock()

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def synthesize(self, text: str, *, seed: int | None = None) -> tuple[Any, int]:
        """The waveform of ``text`` (a 1-D float32 numpy array) and its sampling rate."""
        if not text.strip():
            raise ValueError("nothing to say: the text is empty")
        torch = self._torch
        inputs = self.tokenizer(text, return_tensors="pt").to(self.device)
        if inputs["input_ids"].shape[-1] == 0:
            raise ValueError(f"the tokenizer kept nothing of {text!r}: use letters it knows")
        with self._lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model(**inputs)
        samples = out.waveform[0].float().cpu().numpy()
        return samples, self.sampling_rate

    def wav(self, text: str, *, seed: int | None = None) -> bytes:
        """``text`` spoken, as the bytes of a mono 16-bit PCM WAV file."""

        samples, rate = self.synthesize(text, seed=seed)
        return pcm16_wav(samples, rate)


def pcm16_wav(samples: Any, rate: int) -> bytes:
    """``samples`` (floats, full scale 1.0; clipped there) as a mono 16-bit PCM WAV file."""
    import numpy as np

    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


class TtsBackend(InProcessBackend):
    extra = "tts"

    def _build(self, torch: Any, dtype: Any) -> tuple[Any, dict[str, Any]]:
        try:
            import transformers
            from transformers import AutoTokenizer, VitsModel
        except ImportError:
            raise RuntimeError(
                f"model {self.name!r} uses backend: tts, which needs transformers: "
                "pip install 'vram-orchestrator[tts]'"
            ) from None
        transformers.utils.logging.disable_progress_bar()
        model = VitsModel.from_pretrained(self.path, dtype=dtype, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        return Speaker(model, tokenizer, torch), {"model": model}

    def _build_skeleton(self, torch: Any, dtype: Any) -> tuple[Any, dict[str, Any]]:
        """The VITS model from its config without weights (the disk cache fills them)."""
        from transformers import AutoTokenizer, VitsConfig, VitsModel

        from orchestrator.backends.diskread import empty_weights

        config = VitsConfig.from_pretrained(self.path, local_files_only=True)
        with empty_weights():
            model = VitsModel._from_config(config, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        return Speaker(model, tokenizer, torch), {"model": model}


def create(spec: ModelSpec, *, config: Config, device: Device, log_dir: Path) -> TtsBackend:
    return TtsBackend(spec, device, config.device_index, cache=config.cache)


BACKEND = BackendType(parse=TtsOptions.parse, create=create)
