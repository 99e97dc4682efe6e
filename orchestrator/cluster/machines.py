"""The cluster's parts the router keeps per machine and per lease, and the calls it makes to a
machine's actor that need no router state (``client.py`` is the router itself)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from orchestrator.cluster.actor import machine_resource
from orchestrator.cluster.snapshot import MachineSnapshot
from orchestrator.cluster.wire import ClusterError
from states.routing import MachineView, Route

RELEASE_TIMEOUT_S = 5.0  # a release's answer given up on after this (its lease expires there)


@dataclass(frozen=True)
class Machine:
    """One machine of the cluster: its name and its config, read on that machine.

    ``num_gpus``: the GPUs its actor is scheduled with (``None``: every GPU of the Ray node
    that has the machine's resource, ``vram-machine:<name>``).
    """

    name: str
    config_path: str | None = None
    config_text: str | None = None
    num_gpus: float | None = None

    def __post_init__(self) -> None:
        if (self.config_path is None) == (self.config_text is None):
            raise ValueError(
                f"machine {self.name!r}: give its config_path or its config_text (one of the two)"
            )


@dataclass(frozen=True)
class ServerAt:
    """A cluster lease's handle for a server model: where its server is."""

    base_url: str


@dataclass(frozen=True)
class ClusterLease:
    """A granted lease on a machine of the cluster."""

    id: str
    node: str  # the machine that serves it
    model: str  # its model there ("" for a reservation of raw bytes)
    kind: str
    vram_bytes: int
    url: str | None  # the model's server, as other machines reach it (server models)
    cards: tuple[int, ...]  # the device index(es) on that machine: one, or each card it spans
    gpu_name: str
    ttl_s: float
    waited_s: float  # in the machine's queue
    address: str = ""  # the machine's address
    served_model: str | None = None  # the name the model's server knows it by (server models)
    route: Route | None = None  # why it went there

    @property
    def card(self) -> int | None:
        """The (first) card that serves it."""
        return self.cards[0] if self.cards else None

    @property
    def handle(self) -> ServerAt:
        """The server's address (``handle.base_url``), as a local lease's server handle has it.
        An in-process model's handle stays on its machine: only server models have one here."""
        if self.url is None:
            raise ClusterError(
                f"{self.model or 'a reservation'} on machine {self.node} runs in-process there: its "
                "handle does not leave that machine; serve it from a server backend to use it remotely"
            )
        return ServerAt(self.url)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], route: Route | None) -> ClusterLease:
        return cls(
            id=str(d["id"]),
            node=str(d["node"]),
            model=str(d["model"]),
            kind=str(d["kind"]),
            vram_bytes=int(d["vram_bytes"]),
            url=d.get("url"),
            cards=tuple(int(g) for g in d.get("cards") or ()),
            gpu_name=str(d.get("gpu_name") or ""),
            ttl_s=float(d["ttl_s"]),
            waited_s=float(d.get("waited_s") or 0.0),
            address=str(d.get("address") or ""),
            served_model=d.get("served_model"),
            route=route,
        )


@dataclass(eq=False)
class Held:
    lease: ClusterLease
    version: int  # the machine's version at the grant: a later snapshot without it means it ended
    renewed_at: float  # anyio time of the grant or of the last renewal
    scope: anyio.CancelScope | None = None
    lost: str | None = None
    ask_why: bool = False  # the machine ended it: ask it why


@dataclass(eq=False)
class MachineLink:
    name: str
    handle: Any
    snapshot: MachineSnapshot | None = None
    alive: bool = False
    down_reason: str = "not started yet"
    start_failed: bool = False
    instance: str | None = None
    pending: dict[str, int] = field(default_factory=dict)  # routed here, not granted yet
    # this router's grants (+1) and releases (-1) here, each at the machine's version after
    # it: those past the last snapshot's version are not in it yet
    changes: list[tuple[int, str, int]] = field(default_factory=list)
    leases: dict[str, Held] = field(default_factory=dict)
    # Releases of this router's leases here whose answer is not back yet (lease id -> its
    # model and the version of its grant): each next request here carries them, and the
    # machine does them first. Each is either ``unsent`` (its block has just ended: its own
    # release call goes out at the next turn of the event loop, unless a request here carries
    # it before), ``carried`` (by the request ``carried[id]``, whose answer answers it too),
    # or its own call is out.
    releasing: dict[str, tuple[str, int]] = field(default_factory=dict)
    unsent: dict[str, None] = field(default_factory=dict)
    carried: dict[str, str] = field(default_factory=dict)
    flush_soon: bool = False  # a flush of ``unsent`` is scheduled

    def view(self) -> MachineView | None:
        if self.snapshot is None:
            return None
        since = self.snapshot.version
        self.changes = [c for c in self.changes if c[0] > since]
        leases: dict[str, int] = {}
        for _, model, by in self.changes:
            leases[model] = leases.get(model, 0) + by
        for lease_id, (model, granted) in self.releasing.items():
            # released, its answer not back: counted here unless the snapshot has it ended
            if since < granted or lease_id in self.snapshot.lease_ids:
                leases[model] = leases.get(model, 0) - 1
        return self.snapshot.view(alive=self.alive, pending=self.pending, leases=leases)


def count(d: dict[str, int], key: str, by: int) -> None:
    n = d.get(key, 0) + by
    if n:
        d[key] = n
    else:
        d.pop(key, None)


def ray_module() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            f"the cluster needs Ray ({exc}); install it with: pip install 'vram-orchestrator[ray]'"
        ) from None
    return ray


async def why_ended_on(m: MachineLink, lease: ClusterLease, lost: str) -> str:
    ray = ray_module()
    with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT_S):
        try:
            why = await m.handle.ended.remote(lease.id)
        except ray.exceptions.RayActorError:
            return lost
        except Exception as exc:  # its orchestrator failed (a RayTaskError)
            return f"{lost} (and the machine could not say why: {first_line(exc)})"
        if why:
            return f"{lost}: {why}"
    return lost


def first_line(exc: BaseException) -> str:
    """The gist of a Ray error (its message runs to a traceback): the last line that says what
    was raised, else the first."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    raised = [x for x in lines if "Error:" in x or "Exception:" in x]
    return (raised[-1] if raised else lines[0] if lines else type(exc).__name__)[:500]


def node_gpus(ray: Any, name: str) -> float:
    """The GPUs of the Ray node that has machine ``name``'s resource."""
    resource = machine_resource(name)
    for n in ray.nodes():
        if n.get("Alive") and resource in n.get("Resources", {}):
            return float(n["Resources"].get("GPU", 0.0))
    raise ClusterError(
        f"no node of the Ray cluster has the resource {resource!r}: start machine {name} with "
        f"`ray start --address=HEAD:6379 --resources='{{\"{resource}\": 1}}'`"
    )
