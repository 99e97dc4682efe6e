"""Images and speech from a lease's handle, as file bytes (PNG, WAV).

The daemon's ``/v1/images/generations`` and ``/v1/audio/speech`` and the demo call these with
``lease.handle``. The work runs in a worker thread; the caller holds the lease around the call.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import anyio


class MediaUnsupported(Exception):
    """The model behind the handle cannot make this (a simulated model, an LLM asked to draw)."""


def _describe(handle: Any) -> str:
    name = getattr(handle, "name", None)
    kind = getattr(handle, "kind", None)
    if name and kind:
        return f"{name!r} (simulated {kind})"
    return type(handle).__name__


def _check_size(value: int | None, what: str) -> None:
    if value is not None and (not isinstance(value, int) or value < 8 or value % 8):
        raise ValueError(f"{what} must be a multiple of 8 pixels and at least 8, got {value!r}")


def render_image(
    handle: Any,
    prompt: str,
    *,
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    seed: int | None = None,
    control_image: Any = None,
) -> bytes:
    """Run a diffusers pipeline (blocking) and return the first image as PNG bytes."""
    if not hasattr(handle, "vram_orchestrator_steps"):
        raise MediaUnsupported(
            f"{_describe(handle)} makes no images: give the model backend: diffusers with the path "
            "of a local pipeline (python -m orchestrator.tiny_models DIR builds a tiny one)"
        )
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty")
    _check_size(width, "width")
    _check_size(height, "height")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a whole number of at least 1, got {steps!r}")
    import torch

    kwargs: dict[str, Any] = {
        "prompt": prompt,
        "num_inference_steps": steps or handle.vram_orchestrator_steps,
        "output_type": "pil",
    }
    if width is not None:
        kwargs["width"] = width
    if height is not None:
        kwargs["height"] = height
    if seed is not None:
        kwargs["generator"] = torch.Generator(device="cpu").manual_seed(seed)
    if "controlnet" in getattr(handle, "components", {}):
        if control_image is None:
            from PIL import Image

            # No control image given: a blank one (no structure to follow) of the output size.
            side = handle.unet.config.sample_size * handle.vae_scale_factor
            control_image = Image.new("RGB", (width or side, height or side))
        kwargs["image"] = control_image
    lock = getattr(handle, "vram_orchestrator_lock", None) or contextlib.nullcontext()
    with lock:  # one generation at a time per pipeline (a shared lease has several tasks)
        image = handle(**kwargs).images[0]
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


async def generate_image(
    handle: Any,
    prompt: str,
    *,
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    seed: int | None = None,
    control_image: Any = None,
) -> bytes:
    """``render_image`` in a worker thread: PNG bytes of ``prompt`` drawn by the pipeline."""
    return await anyio.to_thread.run_sync(
        lambda: render_image(
            handle, prompt, width=width, height=height, steps=steps, seed=seed, control_image=control_image
        )
    )


async def synthesize_speech(handle: Any, text: str, *, seed: int | None = None) -> bytes:
    """``text`` spoken by a TTS model's ``Speaker``, as WAV bytes (in a worker thread)."""
    if not callable(getattr(handle, "wav", None)):
        raise MediaUnsupported(
            f"{_describe(handle)} speaks no audio: give the model backend: tts with the path of a "
            "local VITS model (python -m orchestrator.tiny_models DIR builds a tiny one)"
        )
    return await anyio.to_thread.run_sync(lambda: handle.wav(text, seed=seed))
