"""What travels from a machine to the router: a ``MachineSnapshot`` of its orchestrator.

It is a frozen value built on the machine (``snapshot_of``) and sent as it is: the ledger
of each card, the leases and waiters per model, the capacity and learned switch costs of each model, the
plan request of every configured model (at the bytes that machine plans with), and the names
its config resolves. The router turns it into a ``states.routing.MachineView`` with the
requests it has sent there since (``view``). No weights, no handles, nothing of the models
themselves travel.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from orchestrator.runtime import Orchestrator
from orchestrator.spec import card_share_bytes
from states.cards import Cards
from states.ledger import Ledger
from states.plan import PlanRequest, Policy, SwitchCosts
from states.routing import MachineView, names_of


@dataclass(frozen=True)
class MachineSnapshot:
    """One machine's orchestrator, as it is at ``version`` (its count of events so far).

    ``serial`` counts the snapshots that instance has built: of two at one version, the later
    is the newer. (Two can differ at one version: a grant is an event, but its lease's id
    joins ``lease_ids`` a turn of the event loop later, when the lease's task resumes.)"""

    node: str  # the machine's name in the cluster
    instance: str  # this run of the machine's orchestrator (a restart gets a new one)
    version: int
    cards: Cards
    requests: Mapping[str, PlanRequest]
    names: Mapping[str, str]
    policy: Policy
    leases: Mapping[str, int] = field(default_factory=dict)
    waiting: Mapping[str, int] = field(default_factory=dict)
    capacity: Mapping[str, int] = field(default_factory=dict)
    costs: Mapping[str, SwitchCosts] = field(default_factory=dict)
    allowed: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # models.<m>.gpus
    spans: Mapping[str, int] = field(default_factory=dict)  # models.<m>.tensor_parallel > 1
    portable: frozenset[str] = frozenset()  # host copies that may restore onto another card
    served: Mapping[str, str] = field(default_factory=dict)  # server models: the name their server knows
    lease_ids: frozenset[str] = frozenset()  # the remote leases it holds now
    address: str = ""  # the machine's IP address, as the cluster knows it
    ray_node_id: str = ""
    states: Mapping[int, str] = field(default_factory=dict)  # each card's state (IDLE, ...)
    serial: int = 0

    def newer_than(self, other: MachineSnapshot) -> bool:
        """Whether this one was built after ``other``, by the same instance."""
        return self.instance == other.instance and (self.version, self.serial) > (other.version, other.serial)

    @property
    def ledger(self) -> Ledger:
        """The machine's totals as one ledger (one card: its ledger)."""
        return self.cards.summary()

    def view(
        self,
        *,
        alive: bool = True,
        pending: Mapping[str, int] | None = None,
        leases: Mapping[str, int] | None = None,
    ) -> MachineView:
        """The routing view, with what the router did here since the snapshot: ``pending``,
        the requests it sent here that are not granted yet (counted where they exceed the
        snapshot's waiters: a request routed a moment ago counts before the machine's next
        snapshot shows it), and ``leases``, its grants less its releases since."""
        return MachineView(
            node=self.node,
            cards=self.cards,
            requests=self.requests,
            names=self.names,
            policy=self.policy,
            leases=_plus(self.leases, leases),
            waiting=_at_least(self.waiting, pending),
            capacity=self.capacity,
            costs=self.costs,
            allowed=self.allowed,
            spans=self.spans,
            portable=self.portable,
            alive=alive,
        )


def _at_least(snapshot: Mapping[str, int], local: Mapping[str, int] | None) -> Mapping[str, int]:
    if not local:
        return snapshot
    out = dict(snapshot)
    for model, n in local.items():
        if n > out.get(model, 0):
            out[model] = n
    return out


def _plus(snapshot: Mapping[str, int], changes: Mapping[str, int] | None) -> Mapping[str, int]:
    if not changes:
        return snapshot
    out = dict(snapshot)
    for model, n in changes.items():
        out[model] = max(0, out.get(model, 0) + n)
    return {m: n for m, n in out.items() if n}


def snapshot_of(
    orch: Orchestrator,
    *,
    node: str,
    instance: str,
    version: int,
    serial: int = 0,
    lease_ids: frozenset[str] = frozenset(),
    address: str = "",
    ray_node_id: str = "",
) -> MachineSnapshot:
    """The snapshot of a running orchestrator (on its machine, in its event loop)."""
    config = orch.config
    requests = {}
    for name, spec in config.models.items():
        estimate = orch.estimate(name).estimated_vram_bytes
        if spec.tensor_parallel > 1:  # its share on each card it spans (no host copy)
            requests[name] = PlanRequest(
                model=name,
                kind=spec.kind,
                vram_bytes=card_share_bytes(estimate, spec.tensor_parallel),
                configured_bytes=spec.card_bytes,
            )
            continue
        requests[name] = PlanRequest(
            model=name,
            kind=spec.kind,
            vram_bytes=estimate,
            configured_bytes=spec.vram_bytes,
            offloadable=spec.offload and orch.backends[name].supports_host_tier,
            host_bytes=spec.host_bytes,
        )
    waiting: dict[str, int] = {}
    for model, _, _ in orch.waiting():
        waiting[model] = waiting.get(model, 0) + 1
    return MachineSnapshot(
        node=node,
        instance=instance,
        version=version,
        serial=serial,
        cards=orch.cards(),
        requests=requests,
        names=names_of(
            {n: (s.kind, tuple(s.aliases)) for n, s in config.models.items()}, dict(config.defaults)
        ),
        policy=orch.policy,
        leases=dict(orch.leases()),
        waiting=waiting,
        capacity={n: s.max_concurrent for n, s in config.models.items() if s.max_concurrent is not None},
        costs=learned_costs(orch),
        allowed={n: s.gpus for n, s in config.models.items() if s.gpus is not None},
        spans={n: s.tensor_parallel for n, s in config.models.items() if s.tensor_parallel > 1},
        portable=frozenset(n for n in config.models if orch.backends[n].host_copy_portable),
        served={n: b.served_model for n, b in orch.backends.items() if b.served_model is not None},
        lease_ids=lease_ids,
        address=address,
        ray_node_id=ray_node_id,
        states={g: st.name for g, st in orch.states().items()},
    )


def learned_costs(orch: Orchestrator) -> dict[str, SwitchCosts]:
    """The switch costs the orchestrator decides with (measured, or estimated until measured)."""
    return orch.costs()
