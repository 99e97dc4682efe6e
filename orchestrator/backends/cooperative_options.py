"""Options of the cooperative program types (``ollama``, ``llamacpp_router``, ``comfyui``,
``sglang``, ``lmstudio``): what every one of them takes (the program's model name, a URL to
attach to or a command to start it, how its release is verified), parsed once into a frozen
``CooperativeOptions``; each type adds its own keys (``extra``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from orchestrator.backends.options import OptionError, no_unknown, positive_seconds
from orchestrator.backends.server import ServerOptions
from orchestrator.spec import BackendOptions
from states.units import GIB

COMMON_KEYS = (
    "model", "url", "command", "host", "port", "env", "cwd", "log_dir", "start_timeout_s",
    "stop_grace_s", "stop_signal", "release_timeout_s", "poll_s", "idle_gb",
)  # fmt: skip


@dataclass(frozen=True)
class CooperativeOptions(BackendOptions):
    """A cooperative program type's options: the program, the model's name in it, how the
    program is started or attached to (``server``), and how its release is verified."""

    program: str
    model: str
    server: ServerOptions
    release_timeout_s: float | None = None  # None: 0.4 x switching.unload_timeout_s
    poll_s: float = 0.5
    idle_bytes: int = 0
    extra: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    @property
    def attached(self) -> bool:
        return self.server.command is None


def parse_cooperative(
    opts: Mapping[str, Any],
    *,
    program: str,
    health_path: str,
    default_command: tuple[str, ...] | None,
    reserved_env: Mapping[str, str] = MappingProxyType({}),
    extra_keys: tuple[str, ...] = (),
    model_example: str | None = None,
    model_required: bool = True,
) -> CooperativeOptions:
    """Parse the options every cooperative program shares (see the module); the program's
    own keys (``extra_keys``) are left for its parser, in ``extra``.

    ``reserved_env`` is what the orchestrator sets in a started program's environment (with
    ``{host}`` and ``{port}`` filled in at start): a config may not set those keys itself.
    Without ``model_example`` the program has no model names (``model`` is no key of it).
    """
    keys = tuple(k for k in COMMON_KEYS if model_example is not None or k != "model") + extra_keys
    no_unknown(opts, keys)
    model = opts.get("model", "")
    if (
        model_example is not None
        and (model_required or "model" in opts)
        and (not isinstance(model, str) or not model)
    ):
        raise OptionError(
            "model", f"missing: give the model's name as {program} knows it (e.g. {model_example})"
        )
    url, command = opts.get("url"), opts.get("command")
    if url is not None and command is not None:
        raise OptionError("url", f"give url (attach to a running {program}) or command (start one), not both")
    if url is not None:
        parts = urlsplit(str(url))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OptionError("url", f"expected http://host:port of a running {program}, got {url!r}")
    elif command is None:
        if default_command is None:
            raise OptionError(
                "url", f"missing: give the url of a running {program}, or the command to start it"
            )
        command = list(default_command)
    env = opts.get("env") or {}
    if not isinstance(env, Mapping):
        raise OptionError("env", f"expected a mapping, got {env!r}")
    for k in env:
        if k in reserved_env:
            raise OptionError(
                f"env.{k}",
                f"set by the orchestrator ({k}={reserved_env[k]}) so that {program} never frees or "
                "moves memory on its own; remove it",
            )
    server_keys = ("host", "port", "cwd", "log_dir", "start_timeout_s", "stop_grace_s", "stop_signal")
    server = ServerOptions.parse(
        {
            **{k: opts[k] for k in server_keys if k in opts},
            "command": command if url is None else None,
            "base_url": url,
            "health_path": health_path,
            "env": {**{str(k): str(v) for k, v in env.items()}, **(reserved_env if url is None else {})},
        }
    )
    release = opts.get("release_timeout_s")
    idle_gb = opts.get("idle_gb", 0.0)
    if isinstance(idle_gb, bool) or not isinstance(idle_gb, int | float) or idle_gb < 0:
        raise OptionError("idle_gb", f"expected a number of GiB >= 0, got {idle_gb!r}")
    return CooperativeOptions(
        program=program,
        model=str(model),
        server=server,
        release_timeout_s=None if release is None else positive_seconds(opts, "release_timeout_s", 30.0),
        poll_s=positive_seconds(opts, "poll_s", 0.5),
        idle_bytes=int(idle_gb * GIB),
        extra=MappingProxyType({k: opts[k] for k in extra_keys if k in opts}),
    )
