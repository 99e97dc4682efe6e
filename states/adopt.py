"""Adopting a model that is on the GPU already: a pure function from (request, ledger, held
bytes, policy) to the ledger with the model resident, or None.

A program the orchestrator cooperates with (Ollama, llama.cpp's router) may hold one of the
config's models that the orchestrator never loaded: loaded by hand (``ollama run``), or there
already when the orchestrator attached. Such a copy is recorded as resident in place, with no
load, when the ledger with it obeys the planner's rules; otherwise the orchestrator gives it
back through the program's own release call, as for any memory a backend holds outside the
ledger. The rules:

1. It is not in the ledger already, and no load is in progress (a load owns the bytes it
   committed: the two would be counted against each other).
2. Exclusive ("heavy") kinds never co-reside (``plan``'s rule 2): an exclusive model is not
   adopted beside another exclusive model.
3. It is counted at what it holds, or at its estimate when that is larger (what a load of it
   would commit), and the ledger with it must fit: what it holds is no longer foreign memory,
   and the rest must fit in the room the other processes leave (``Ledger.fits``).
"""

from __future__ import annotations

from states.ledger import Ledger, Resident
from states.plan import PlanRequest, Policy


def adoption(request: PlanRequest, ledger: Ledger, held_bytes: int, policy: Policy) -> Ledger | None:
    """The ledger with ``request.model`` a GPU resident, most recently used, at
    ``max(held_bytes, request.vram_bytes)``, and ``held_bytes`` less foreign memory; None when
    the rules (see the module) do not allow it.

    :raises ValueError: ``held_bytes`` is not positive, or the request is a reservation (a
        reservation has no copy of its own to adopt).
    """
    if held_bytes <= 0:
        raise ValueError(f"held_bytes must be > 0, got {held_bytes}")
    if request.external:
        raise ValueError(f"{request.model!r} is a reservation: there is nothing of it to adopt")
    if ledger.get(request.model) is not None or ledger.loading is not None:
        return None
    exclusive = policy.is_exclusive(request.kind)
    if exclusive and any(r.exclusive for r in ledger.gpu_residents):
        return None
    resident = Resident(
        model=request.model,
        kind=request.kind,
        vram_bytes=max(held_bytes, request.vram_bytes),
        exclusive=exclusive,
        offloadable=request.offloadable,
        host_bytes=request.host_bytes,
        configured_bytes=request.configured_bytes,
    )
    after = ledger.with_foreign(ledger.foreign_bytes - held_bytes).begin_load(resident).finish_load()
    return after if after.fits() else None
