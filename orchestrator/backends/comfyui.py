"""ComfyUI as a model: its slot on the card, freed through ``POST /free``.

ComfyUI (``server.py``, ``main.py``) loads the models a prompt needs when the prompt runs and
keeps them cached afterwards; it has no call to load one. Its slot in the ledger is the
memory its prompts take (the config's ``vram_gb``, then what was measured). Loading it does
nothing (its next prompt loads what it needs); evicting it is ``POST /free`` with
``{"unload_models": true, "free_memory": true}``, which ComfyUI applies when its queue
worker next runs, between prompts, never during one; the orchestrator then waits until
ComfyUI's process holds no more than its idle memory (``idle_gb``: its CUDA context, what
``/system_stats`` shows when nothing is loaded). ``GET /queue`` (``queue_running``,
``queue_pending``) says whether it is busy: ComfyUI's queue is its demand. While prompts are
queued or running there (sent to ComfyUI directly, not through the orchestrator), the
orchestrator holds ComfyUI's slot on its behalf (evicting what must go, an LLM through its own
API), and lets go when the queue is empty.

What cannot be closed through ComfyUI's API: a prompt sent to ComfyUI directly can start
before the lease on its behalf is granted. ComfyUI's queue worker takes a prompt the moment it
is queued when it is idle, and its API (``server.py``) has no way to hold the queue: ``POST
/queue`` with ``delete`` removes only pending prompts, ``POST /interrupt`` (``{"prompt_id"}``
since 2025) stops a running one and loses its progress, and a pause of the queue was asked for
(ComfyUI issue 1032) but not added. The window lasts from the prompt's start until the
orchestrator has seen it (``poll_s``) and evicted what must go (an LLM's verified release);
ComfyUI moves its models to the GPU only when a node needs them there (its checkpoint is read
from disk first), and it sizes that move by the free memory it reads from the device
(``comfy/model_management.py`` ``load_models_gpu``: in its default mode a model that does not
fit is loaded in part), so a prompt that reaches the GPU within the window runs with part of
its model on the card instead of failing. Meanwhile the orchestrator counts what ComfyUI holds
as another program's memory, so nothing of its own is loaded into it, and gives idle models
back as soon as it sees the card over its room (it looks at the device at least once a second
while models are resident). To take the window away,
queue prompts under a lease (``orch.acquire("comfyui")``, or the daemon's ``POST /v1/leases``
``{"model": "comfyui"}`` and ``DELETE /v1/leases/{id}`` once the prompt is done); to keep the
card's margin above the budget even within it, start ComfyUI with ``--reserve-vram`` (memory
it leaves free for other software) at least the card's total less ``safe_max_vram_gb``.

Config::

    backend:
      type: comfyui
      url: http://127.0.0.1:8188           # attach; or, to start it:
      # command: [python, main.py, --listen, "{host}", --port, "{port}"]
      # cwd: ~/ComfyUI
      idle_gb: 0.4
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

from orchestrator.backends.base import BackendType
from orchestrator.backends.cooperative import CooperativeBackend, check_status
from orchestrator.backends.cooperative_options import CooperativeOptions, parse_cooperative
from orchestrator.backends.options import options_of
from orchestrator.errors import UnloadFailed
from orchestrator.spec import Config, ModelSpec

if TYPE_CHECKING:
    from orchestrator.device.base import Device


def parse(opts: Mapping[str, Any]) -> CooperativeOptions:
    return parse_cooperative(opts, program="comfyui", health_path="/system_stats", default_command=None)


class ComfyUIBackend(CooperativeBackend):
    VIEW: ClassVar[str] = "GET /queue"
    RELEASE: ClassVar[str] = 'POST /free {"unload_models": true, "free_memory": true}'

    async def read_view(self, client: httpx.AsyncClient) -> dict[str, Any]:
        r = await client.get("/queue")
        r.raise_for_status()
        q = r.json()
        return {"running": len(q.get("queue_running") or ()), "pending": len(q.get("queue_pending") or ())}

    def holds_outside(self) -> bool:
        return False  # its prompts are its demand (has_demand), not a leftover to release

    def has_demand(self, view: Any) -> bool:
        return bool(view and (view.get("running") or view.get("pending")))

    async def request_release(self, client: httpx.AsyncClient) -> None:
        r = await client.post("/free", json={"unload_models": True, "free_memory": True})
        check_status(r, "comfyui's POST /free", self.name, UnloadFailed)

    def release_hint(self, view: Any) -> str:
        if view and (view.get("running") or view.get("pending")):
            return (
                f"ComfyUI applies /free between prompts, and it has {view['running']} running and "
                f"{view['pending']} pending"
            )
        return "ComfyUI did not free its models (is idle_gb, its memory with nothing loaded, too low?)"


def create(spec: ModelSpec, *, config: Config, device: Device, log_dir: Path) -> ComfyUIBackend:
    return ComfyUIBackend(
        spec, config=config, device=device, log_dir=log_dir, options=options_of(spec, CooperativeOptions)
    )


BACKEND = BackendType(parse=parse, create=create)
