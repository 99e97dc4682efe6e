"""``vram-orchestrator serve``: one owner for the GPU across processes.

An ASGI app (Starlette on uvicorn) around one running ``Orchestrator``:

- an OpenAI-compatible gateway that switches by the requested model: ``/v1/chat/completions``
  and ``/v1/completions`` are proxied (streaming included) to the model's server, and
  ``/v1/images/generations`` and ``/v1/audio/speech`` run in-process models
  (``orchestrator.media``). Each request holds a lease for exactly its own duration: until
  its response (or stream) ends, or at once when its client disconnects;
- remote leases (``/v1/leases``) for programs that use the GPU themselves: on a model (the
  answer names the model's URL for servers) or on a raw number of bytes (an external
  reservation: the scheduler evicts our models to make room, and the program's real use is
  checked by pid). The holder renews its lease; one not renewed within its ttl expires;
- ``/v1/status``, ``/v1/models``, ``/v1/models/{id}``, ``/metrics`` (Prometheus) and
  ``/v1/events`` (server-sent events of the orchestrator's events).

Every error is JSON in OpenAI's shape, ``{"error": {"message", "type", "code"}}``, and says
what is wrong and what to do. Bound to a non-loopback address, the daemon requires a bearer
token.

The modules: ``app`` (routes), ``requests`` (pure request parsing), ``errors`` (the error
shape and the status of each error), ``leases`` (remote leases), ``gateway`` (the proxy and
the media endpoints), ``asgi`` (the response that holds a lease, the body reader, auth),
``state`` (what the endpoints share), ``server`` (``serve()``, signals, uvicorn) and ``client``
(``RemoteOrchestrator``, the daemon's client, also importable as ``orchestrator.client``).
"""

from orchestrator.daemon.app import create_app
from orchestrator.daemon.errors import ApiError, api_error
from orchestrator.daemon.leases import LeaseManager, RemoteLease
from orchestrator.daemon.server import (
    TOKEN_ENV,
    PortInUse,
    ShutdownReport,
    event_loop_options,
    fast_parts,
    is_loopback,
    resolve_token,
    serve,
)
from orchestrator.daemon.state import Daemon, daemon_status

__all__ = [
    "TOKEN_ENV",
    "ApiError",
    "Daemon",
    "LeaseManager",
    "PortInUse",
    "RemoteLease",
    "ShutdownReport",
    "api_error",
    "create_app",
    "daemon_status",
    "event_loop_options",
    "fast_parts",
    "is_loopback",
    "resolve_token",
    "serve",
]
