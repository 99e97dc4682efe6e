"""Request parsing, pure: raw bytes and mappings in, frozen request objects (or an ``ApiError``
naming what is wrong and what to do) out. No IO, no orchestrator: each parser is unit-tested
on its own.

What every client string and number passes through here:

- a body is a JSON object of at most ``daemon.max_body_bytes``, nested at most
  ``MAX_JSON_DEPTH`` deep, with finite numbers only (``NaN``, ``Infinity`` and ``1e309`` are
  refused: Python's ``json`` would accept them);
- a string that will be encoded (a prompt, a speech input, a holder, a model name) must be
  valid Unicode (no lone surrogate);
- names are bounded (``MAX_NAME_CHARS``, ``MAX_HOLDER_CHARS``) and echoed cut short;
- header numbers (``X-VRAM-Timeout``, ``X-VRAM-Priority``) are finite.

The proxy's hot path only needs a completion body's ``model`` (``model_of``); nothing here
walks a body unless its brackets say it may be deeper than the limit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.daemon.errors import ApiError, invalid
from orchestrator.spec import RequestLimits

MAX_JSON_DEPTH = 64  # deeper bodies are refused (no OpenAI body nests past a handful)
MAX_NAME_CHARS = 256  # a model name, alias or kind longer than this is no configured one
MAX_HOLDER_CHARS = 200
ECHO_CHARS = 64  # client strings are echoed in messages cut to about this many characters

DEFAULT_IMAGE_MODEL = "sdxl"
DEFAULT_SPEECH_MODEL = "tts"
MAX_IMAGE_SIDE = 4096  # the widest size parse_image accepts before a model's own limits


def shorten(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters (always ASCII-safe to encode)."""
    text = ascii(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters shown"
    return f"{text[:limit]}... ({size})"


# -- bodies ------------------------------------------------------------------------------------


class _NotFinite(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NotFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(text)
    return value


def json_depth(value: Any) -> int:
    """How deep ``value`` nests (a scalar: 0, ``[]``: 1), without recursion."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        todo.extend((child, depth + 1) for child in children)
    return deepest


def too_deep(limit: int = MAX_JSON_DEPTH) -> ApiError:
    return invalid(
        f"the request body nests deeper than {limit} levels; send a flatter JSON object", "invalid_json"
    )


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object: depth-limited, finite numbers only."""
    if not raw.strip():
        raise invalid("the request body is empty; send a JSON object", "invalid_json")
    try:
        data = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except _NotFinite as exc:
        raise invalid(
            f"the request body holds the number {shorten(str(exc))}, which is not finite; send finite ones",
            "invalid_json",
        ) from None
    except RecursionError:
        raise too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(
            f"the request body is not valid JSON ({shorten(str(exc), 200)}); send a JSON object",
            "invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise invalid(
            f"expected a JSON object, got a JSON {type(data).__name__}; send {{...}}", "invalid_json"
        )
    # Each level needs one bracket: a body with few brackets cannot be deep (the common case).
    if raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH and json_depth(data) > MAX_JSON_DEPTH:
        raise too_deep()
    return data


# -- values ------------------------------------------------------------------------------------


def text(value: Any, key: str) -> str:
    """A string that will be encoded: it must be valid Unicode."""
    if not isinstance(value, str):
        raise invalid(f"{key} must be a string, got {shorten(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid(
            f"{key} is not valid Unicode (a lone surrogate at character {exc.start}); send UTF-8 text"
        ) from None
    return value


def integer(v: Any, key: str, *, minimum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(f"{key} must be an integer, got {shorten(v)}")
    if minimum is not None and v < minimum:
        raise invalid(f"{key} must be at least {minimum}, got {v}")
    return v


def seconds(v: Any, key: str, *, allow_none: bool = True) -> float | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise invalid(
            f"{key} must be a number of seconds >= 0{' or null' if allow_none else ''}, got {shorten(v)}"
        )
    return float(v)


def model_name(value: Any, *, key: str = "model") -> str:
    """A model name, alias or kind as a client sent it: a bounded, valid string."""
    if not isinstance(value, str) or not value:
        raise invalid(f'the body needs "{key}": a configured model, alias or kind (GET /v1/models)')
    if len(value) > MAX_NAME_CHARS:
        raise ApiError(
            404,
            f"no model {shorten(value)}: no configured name is that long; GET /v1/models lists them",
            "model_not_found",
        )
    return text(value, key)


def model_of(body: Mapping[str, Any], default: str | None = None) -> str:
    """The body's ``model`` (or ``default`` when it has none)."""
    if default is not None and "model" not in body:
        return default
    return model_name(body.get("model"))


# -- headers -----------------------------------------------------------------------------------


def header_number(raw: str | None, name: str, what: str) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise invalid(f"the {name} header ({what}) must be a finite number, got {shorten(raw)}")
    return value


@dataclass(frozen=True)
class LeaseOptions:
    """A gateway request's lease: how long it waits for its model, at what priority."""

    timeout_s: float | None
    priority: int


def lease_options(headers: Mapping[str, str], default_timeout_s: float | None) -> LeaseOptions:
    timeout_s = header_number(headers.get("x-vram-timeout"), "X-VRAM-Timeout", "lease timeout, seconds")
    if timeout_s is not None and timeout_s < 0:
        raise invalid(f"the X-VRAM-Timeout header must be a number of seconds >= 0, got {timeout_s:g}")
    priority = header_number(headers.get("x-vram-priority"), "X-VRAM-Priority", "priority")
    return LeaseOptions(default_timeout_s if timeout_s is None else timeout_s, int(priority or 0))


def bearer_token(value: bytes) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme in any case)."""
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


# -- remote leases -----------------------------------------------------------------------------

LEASE_FIELDS = ("bytes", "holder", "model", "pid", "priority", "timeout", "ttl_s")


@dataclass(frozen=True)
class LeaseRequest:
    """``POST /v1/leases``: exactly one of ``model`` and ``n_bytes``."""

    model: str | None
    n_bytes: int | None
    priority: int
    timeout_s: float | None
    ttl_s: float
    pid: int | None
    holder: str


def parse_lease(
    body: Mapping[str, Any], *, default_ttl_s: float, max_ttl_s: float, budget_bytes: int
) -> LeaseRequest:
    from states.units import format_gib

    unknown = sorted(set(body) - set(LEASE_FIELDS))
    if unknown:
        names = ", ".join(shorten(k) if len(k) > ECHO_CHARS else k for k in unknown[:10])
        raise invalid(f"unknown field(s) {names}; use: {', '.join(LEASE_FIELDS)}")
    model, n_bytes = body.get("model"), body.get("bytes")
    if (model is None) == (n_bytes is None):
        raise invalid(
            "give exactly one of model (a configured model, alias or kind) and bytes (raw VRAM for "
            "a program of your own)"
        )
    if model is not None:
        if not isinstance(model, str) or not model:
            raise invalid(f"model must be a model name, alias or kind, got {shorten(model)}")
        model = model_name(model)
    if n_bytes is not None:
        n_bytes = integer(n_bytes, "bytes", minimum=1)
        if n_bytes > budget_bytes:
            raise invalid(
                f"bytes={n_bytes} ({format_gib(n_bytes)}) is more than the whole budget "
                f"({budget_bytes} bytes, {format_gib(budget_bytes)}); ask for less",
                "insufficient_vram",
            )
    priority = integer(body.get("priority", 0), "priority")
    timeout_s = seconds(body.get("timeout"), "timeout")
    ttl_s = seconds(body.get("ttl_s", default_ttl_s), "ttl_s", allow_none=False)
    assert ttl_s is not None
    if not 0 < ttl_s <= max_ttl_s:
        raise invalid(
            f"ttl_s must be more than 0 and at most {max_ttl_s:g} s (daemon.max_lease_ttl_s), "
            f"got {ttl_s:g}; renew the lease more often instead"
        )
    pid = body.get("pid")
    if pid is not None:
        pid = integer(pid, "pid", minimum=1)
    holder = body.get("holder", "")
    if not isinstance(holder, str) or len(holder) > MAX_HOLDER_CHARS:
        raise invalid(
            f"holder must be a string of at most {MAX_HOLDER_CHARS} characters, got {shorten(holder)}"
        )
    return LeaseRequest(model, n_bytes, priority, timeout_s, ttl_s, pid, text(holder, "holder"))


# -- images and speech -------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRequest:
    """``POST /v1/images/generations`` (``n`` images of ``prompt``)."""

    model: str
    prompt: str
    n: int
    width: int | None
    height: int | None
    steps: int | None
    seed: int | None


def parse_size(size: Any) -> tuple[int, int]:
    try:
        w, h = str(size).lower().split("x")
        width, height = int(w), int(h)
        if not (64 <= width <= MAX_IMAGE_SIDE and 64 <= height <= MAX_IMAGE_SIDE):
            raise ValueError
    except ValueError:
        raise invalid(f"size must be WIDTHxHEIGHT (64-{MAX_IMAGE_SIDE}), got {shorten(size)}") from None
    return width, height


def parse_image(body: Mapping[str, Any]) -> ImageRequest:
    model = model_of(body, DEFAULT_IMAGE_MODEL)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise invalid('the body needs "prompt": the text to draw')
    n = integer(body.get("n", 1), "n", minimum=1)
    fmt = body.get("response_format", "b64_json")
    if fmt != "b64_json":
        raise invalid(f"response_format {shorten(fmt)} is not supported; use b64_json")
    size = body.get("size")
    width, height = (None, None) if size is None else parse_size(size)
    steps = body.get("steps")
    seed = body.get("seed")
    return ImageRequest(
        model,
        text(prompt, "prompt"),
        n,
        width,
        height,
        None if steps is None else integer(steps, "steps", minimum=1),
        None if seed is None else integer(seed, "seed", minimum=0),
    )


@dataclass(frozen=True)
class SpeechRequest:
    """``POST /v1/audio/speech``: ``input`` spoken as a WAV file."""

    model: str
    input: str


def parse_speech(body: Mapping[str, Any]) -> SpeechRequest:
    model = model_of(body, DEFAULT_SPEECH_MODEL)
    spoken = body.get("input")
    if not isinstance(spoken, str) or not spoken:
        raise invalid('the body needs "input": the text to speak')
    fmt = body.get("response_format", "wav")
    if fmt != "wav":
        raise invalid(f"response_format {shorten(fmt)} is not supported; use wav")
    return SpeechRequest(model, text(spoken, "input"))


# -- limits (models.<name>.limits) ---------------------------------------------------------------


def over_limit(model: str, what: str, value: int, limit: int, key: str, fewer: str) -> ApiError:
    """400 naming the limit and the config key that raises it."""
    where = f"models.{model}.limits.{key}"
    return invalid(
        f"{what} is {value}, more than {model!r} allows ({limit}, {where}); {fewer}, or raise {where} "
        "in the daemon's config",
        "limit_exceeded",
    )


def check_image_limits(req: ImageRequest, limits: RequestLimits, model: str) -> None:
    """An image request within its model's limits (before anything loads)."""
    if req.n > limits.max_n:
        raise over_limit(model, "n", req.n, limits.max_n, "max_n", "make several requests")
    if req.steps is not None and req.steps > limits.max_steps:
        raise over_limit(model, "steps", req.steps, limits.max_steps, "max_steps", "ask for fewer steps")
    if req.width is not None and req.width > limits.max_width:
        raise over_limit(model, "width", req.width, limits.max_width, "max_width", "ask for a smaller size")
    if req.height is not None and req.height > limits.max_height:
        raise over_limit(
            model, "height", req.height, limits.max_height, "max_height", "ask for a smaller size"
        )


def check_speech_limits(req: SpeechRequest, limits: RequestLimits, model: str) -> None:
    """A speech request within its model's limits (before anything loads)."""
    if len(req.input) > limits.max_input_chars:
        raise over_limit(
            model,
            "the input's length in characters",
            len(req.input),
            limits.max_input_chars,
            "max_input_chars",
            "send the text in several requests",
        )


TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def completion_limits(body: Mapping[str, Any], limits: RequestLimits, model: str) -> dict[str, Any]:
    """What a completion body's token fields must become under ``limits.max_tokens``: a value
    over the limit is refused, a missing one is set to the limit (the server would otherwise
    choose). Nothing when the model has no such limit (its server caps it)."""
    limit = limits.max_tokens
    if limit is None:
        return {}
    given = {k: body[k] for k in TOKEN_FIELDS if body.get(k) is not None}
    for key, value in given.items():
        n = integer(value, key, minimum=1)
        if n > limit:
            raise over_limit(model, key, n, limit, "max_tokens", "ask for fewer tokens")
    return {} if given else {"max_tokens": limit}
