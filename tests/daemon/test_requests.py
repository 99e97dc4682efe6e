"""The daemon's request parsing, pure: bodies, values, headers, leases, images, speech, limits."""

from __future__ import annotations

import json

import pytest

from orchestrator.daemon.errors import ApiError
from orchestrator.daemon.requests import (
    MAX_JSON_DEPTH,
    ImageRequest,
    LeaseRequest,
    SpeechRequest,
    bearer_token,
    check_image_limits,
    check_speech_limits,
    completion_limits,
    json_depth,
    lease_options,
    model_of,
    parse_image,
    parse_json,
    parse_lease,
    parse_speech,
    shorten,
)
from orchestrator.spec import RequestLimits


def refused(fn: object, *args: object, **kw: object) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args, **kw)  # type: ignore[operator]
    assert info.value.status < 500
    return info.value


def test_parse_json_takes_an_object_and_refuses_everything_else() -> None:
    assert parse_json(b'{"a": [1, 2.5, {"b": null}]}') == {"a": [1, 2.5, {"b": None}]}
    assert "empty" in refused(parse_json, b"  ").message
    assert "not valid JSON" in refused(parse_json, b"{nope").message
    assert "expected a JSON object" in refused(parse_json, b"[1]").message
    assert "not valid JSON" in refused(parse_json, b'{"a": "\xff"}').message  # not UTF-8


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e309", "-1e400"])
def test_parse_json_refuses_numbers_that_are_not_finite(number: str) -> None:
    err = refused(parse_json, f'{{"timeout": {number}}}'.encode())
    assert err.status == 400 and "not finite" in err.message


def test_parse_json_bounds_the_depth_without_recursing() -> None:
    ok = "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1)
    assert parse_json(f'{{"a": {ok}}}'.encode())["a"] is not None
    for depth in (MAX_JSON_DEPTH + 1, 5000, 200_000):  # past Python's recursion limit too
        deep = '{"a": ' + "[" * depth + "]" * depth + "}"
        assert "nests deeper" in refused(parse_json, deep.encode()).message
    # Many brackets side by side are not deep.
    wide = json.dumps({"messages": [{"role": "user", "content": str(i)} for i in range(500)]})
    assert len(parse_json(wide.encode())["messages"]) == 500
    assert json_depth({"a": [[{}]]}) == 4 and json_depth(3) == 0


def test_shorten_cuts_long_values_and_escapes_what_cannot_be_encoded() -> None:
    assert shorten("gpt-9") == "'gpt-9'"
    long = shorten("x" * 100_000)
    assert len(long) < 120 and "100000 characters" in long
    assert shorten("\ud800") == "'\\ud800'"
    shorten("\ud800").encode("ascii")


def test_model_names_are_bounded_and_valid_unicode() -> None:
    assert model_of({"model": "llm"}) == "llm"
    assert model_of({}, "sdxl") == "sdxl"
    assert '"model"' in refused(model_of, {}).message
    assert '"model"' in refused(model_of, {"model": 7}).message
    err = refused(model_of, {"model": "m" * 100_000})
    assert err.status == 404 and len(err.message) < 300 and "100000 characters" in err.message
    assert "not valid Unicode" in refused(model_of, {"model": "a\ud800"}).message


def test_header_numbers_are_finite() -> None:
    assert lease_options({}, 600.0).timeout_s == 600.0
    opts = lease_options({"x-vram-timeout": "2.5", "x-vram-priority": "3"}, 600.0)
    assert (opts.timeout_s, opts.priority) == (2.5, 3)
    for bad in ("inf", "-inf", "1e309", "nan", "high"):
        err = refused(lease_options, {"x-vram-priority": bad}, None)
        assert "X-VRAM-Priority" in err.message and "finite" in err.message
        assert "X-VRAM-Timeout" in refused(lease_options, {"x-vram-timeout": bad}, None).message
    assert ">= 0" in refused(lease_options, {"x-vram-timeout": "-1"}, None).message


def test_the_bearer_scheme_is_case_insensitive() -> None:
    assert bearer_token(b"Bearer abc") == b"abc"
    assert bearer_token(b"bearer abc") == b"abc"
    assert bearer_token(b"BEARER  abc ") == b"abc"
    assert bearer_token(b"Basic abc") is None
    assert bearer_token(b"Bearer") is None and bearer_token(b"") is None


def lease(body: dict[str, object]) -> LeaseRequest:
    return parse_lease(body, default_ttl_s=30, max_ttl_s=3600, budget_bytes=16 * 2**30)


def test_parse_lease() -> None:
    req = lease({"model": "llm", "priority": 2, "timeout": 5, "holder": "me"})
    assert req == lease({"holder": "me", "timeout": 5.0, "priority": 2, "model": "llm"})
    assert req.ttl_s == 30.0 and req.n_bytes is None
    assert lease({"bytes": 5, "pid": 42}).n_bytes == 5
    cases = [
        ({"model": "llm", "colour": "red"}, "unknown field(s) colour"),
        ({}, "exactly one of model"),
        ({"model": "llm", "bytes": 1}, "exactly one of model"),
        ({"bytes": 0}, "bytes must be at least 1"),
        ({"bytes": True}, "bytes must be an integer"),
        ({"bytes": 17 * 2**30}, "more than the whole budget"),
        ({"model": "llm", "ttl_s": 0}, "ttl_s must be more than 0"),
        ({"model": "llm", "ttl_s": 10**6}, "daemon.max_lease_ttl_s"),
        ({"model": "llm", "timeout": -1}, "timeout"),
        ({"model": "llm", "pid": 0}, "pid must be at least 1"),
        ({"model": "llm", "holder": "h" * 201}, "at most 200 characters"),
        ({"model": "llm", "holder": "\ud800"}, "holder is not valid Unicode"),
        ({"model": "llm", "holder": ["x"]}, "holder must be a string"),
    ]
    for body, words in cases:
        assert words in refused(lease, body).message, body
    long_key = refused(lease, {"model": "llm", "k" * 10_000: 1}).message
    assert len(long_key) < 400 and "10000 characters" in long_key


def test_parse_image_and_speech() -> None:
    req = parse_image({"prompt": "a fox", "size": "64X128", "n": 2, "steps": 3, "seed": 1})
    assert req == ImageRequest("sdxl", "a fox", 2, 64, 128, 3, 1)
    assert parse_image({"model": "flux", "prompt": "p"}).width is None
    for body, words in [
        ({}, '"prompt"'),
        ({"prompt": "p", "size": "big"}, "WIDTHxHEIGHT"),
        ({"prompt": "p", "size": "60000x64"}, "WIDTHxHEIGHT"),
        ({"prompt": "p", "n": 0}, "n must be at least 1"),
        ({"prompt": "p", "steps": 2.5}, "steps must be an integer"),
        ({"prompt": "p", "response_format": "url"}, "b64_json"),
        ({"prompt": "a \udc80 fox"}, "prompt is not valid Unicode"),
    ]:
        assert words in refused(parse_image, body).message, body
    assert parse_speech({"input": "hi"}) == SpeechRequest("tts", "hi")
    assert '"input"' in refused(parse_speech, {"input": ""}).message
    assert "wav" in refused(parse_speech, {"input": "hi", "response_format": "mp3"}).message
    assert "not valid Unicode" in refused(parse_speech, {"input": "\ud800"}).message


def test_limits_name_the_limit_and_the_key_that_raises_it() -> None:
    limits = RequestLimits(max_input_chars=10, max_steps=20, max_width=256, max_height=128, max_n=2)
    check_image_limits(ImageRequest("sdxl-base", "p", 2, 256, 128, 20, None), limits, "sdxl-base")
    check_image_limits(ImageRequest("sdxl-base", "p", 1, None, None, None, None), limits, "sdxl-base")
    for req, key in [
        (ImageRequest("sdxl-base", "p", 3, None, None, None, None), "max_n"),
        (ImageRequest("sdxl-base", "p", 1, None, None, 400, None), "max_steps"),
        (ImageRequest("sdxl-base", "p", 1, 512, None, None, None), "max_width"),
        (ImageRequest("sdxl-base", "p", 1, None, 256, None, None), "max_height"),
    ]:
        err = refused(check_image_limits, req, limits, "sdxl-base")
        assert err.status == 400 and f"models.sdxl-base.limits.{key}" in err.message, err.message
    check_speech_limits(SpeechRequest("tts-small", "x" * 10), limits, "tts-small")
    err = refused(check_speech_limits, SpeechRequest("tts-small", "x" * 11), limits, "tts-small")
    assert "models.tts-small.limits.max_input_chars" in err.message and "11" in err.message


def test_completion_limits() -> None:
    assert completion_limits({"max_tokens": 10**6}, RequestLimits(), "llm") == {}  # the server caps it
    limits = RequestLimits(max_tokens=100)
    assert completion_limits({}, limits, "llm") == {"max_tokens": 100}
    assert completion_limits({"max_tokens": 100}, limits, "llm") == {}
    err = refused(completion_limits, {"max_completion_tokens": 101}, limits, "llm")
    assert "models.llm.limits.max_tokens" in err.message
    assert "integer" in refused(completion_limits, {"max_tokens": "many"}, limits, "llm").message
