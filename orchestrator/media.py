"""Images and speech from a lease's handle, as file bytes (PNG, WAV).

The daemon's ``/v1/images/generations`` and ``/v1/audio/speech`` and the demo call these with
``lease.handle``. The work runs in a worker thread; the caller holds the lease around the call.

Cancelling the awaiting task (its client left, its deadline passed, the daemon is stopping)
sets the work's cancellation flag: a diffusers pipeline checks it after every denoising step
(``callback_on_step_end``) and speech between its pieces, so the model is free within one step.
The awaiting task returns only once the thread has let go of the model: the lease around the
call is never released while the model still works.

Speech is made piece by piece (``speech_pieces``: sentences, at most ``SPEECH_PIECE_CHARS``
each): VITS's working memory grows with the square of its input's length (its alignment is
text length x frames), so pieces keep the peak that of one piece, whatever the input's length.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

SPEECH_PIECE_CHARS = 200  # the longest piece of text spoken at once (about two sentences)


class MediaUnsupported(Exception):
    """The model behind the handle cannot make this (a simulated model, an LLM asked to draw)."""


class MediaCancelled(Exception):
    """The work was cancelled through its flag (between two steps, or two pieces of speech)."""


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise MediaCancelled("cancelled")


async def run_cancellable(fn: Callable[[], T], cancel: threading.Event | None) -> T:
    """``fn()`` in a worker thread. Cancelled, it sets ``cancel`` (which ``fn`` checks) and
    waits, shielded, until the thread has returned, then re-raises the cancellation."""
    flag = cancel if cancel is not None else threading.Event()
    finished = threading.Event()

    def run() -> T:
        try:
            return fn()
        finally:
            finished.set()

    try:
        return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        flag.set()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(finished.wait)
        raise


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
    cancel: threading.Event | None = None,
) -> bytes:
    """Run a diffusers pipeline (blocking) and return the first image as PNG bytes. ``cancel``
    set: ``MediaCancelled`` after the step running then."""
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
    if cancel is not None:

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            _check(cancel)
            return tensors

        kwargs["callback_on_step_end"] = on_step_end
    lock = getattr(handle, "vram_orchestrator_lock", None) or contextlib.nullcontext()
    with lock:  # one generation at a time per pipeline (a shared lease has several tasks)
        _check(cancel)
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
    cancel: threading.Event | None = None,
) -> bytes:
    """``render_image`` in a worker thread: PNG bytes of ``prompt`` drawn by the pipeline.
    Cancelled, the pipeline stops after its current step (see the module docstring)."""
    flag = cancel if cancel is not None else threading.Event()
    return await run_cancellable(
        lambda: render_image(
            handle,
            prompt,
            width=width,
            height=height,
            steps=steps,
            seed=seed,
            control_image=control_image,
            cancel=flag,
        ),
        flag,
    )


_SENTENCE_END = re.compile(r"(?<=[.!?;:\n])\s+")


def speech_pieces(text: str, limit: int = SPEECH_PIECE_CHARS) -> list[str]:
    """``text`` cut into pieces of at most ``limit`` characters: at sentence ends where it can,
    else at spaces, else anywhere. A piece with no letter or digit joins the one before it."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        while len(sentence) > limit:
            cut = sentence.rfind(" ", 0, limit + 1)
            cut = cut if cut > 0 else limit
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if not sentence:
            continue
        if pieces and len(pieces[-1]) + 1 + len(sentence) <= limit:
            pieces[-1] = f"{pieces[-1]} {sentence}"
        elif pieces and not any(c.isalnum() for c in sentence):
            pieces[-1] = f"{pieces[-1]} {sentence}"  # punctuation alone says nothing
        else:
            pieces.append(sentence)
    return [p for p in pieces if p]


def speak(handle: Any, text: str, *, seed: int | None = None, cancel: threading.Event | None = None) -> bytes:
    """``text`` spoken piece by piece (blocking), as the bytes of a mono 16-bit WAV file."""
    import numpy as np

    from orchestrator.backends.tts import pcm16_wav

    waves = []
    rate = 16000
    for piece in speech_pieces(text):
        _check(cancel)
        samples, rate = handle.synthesize(piece, seed=seed)
        waves.append(samples)
    _check(cancel)
    samples = np.concatenate(waves) if waves else np.zeros(0, dtype="float32")
    return pcm16_wav(samples, rate)


async def synthesize_speech(
    handle: Any, text: str, *, seed: int | None = None, cancel: threading.Event | None = None
) -> bytes:
    """``text`` spoken by a TTS model's ``Speaker``, as WAV bytes (in a worker thread, piece by
    piece: see the module docstring). Cancelled, it stops after the piece being spoken."""
    if not callable(getattr(handle, "synthesize", None)):
        raise MediaUnsupported(
            f"{_describe(handle)} speaks no audio: give the model backend: tts with the path of a "
            "local VITS model (python -m orchestrator.tiny_models DIR builds a tiny one)"
        )
    if not text.strip():
        raise ValueError("nothing to say: the text is empty")
    flag = cancel if cancel is not None else threading.Event()
    return await run_cancellable(lambda: speak(handle, text, seed=seed, cancel=flag), flag)
