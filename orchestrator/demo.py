"""The demo: the Model Management Module's Example 1 workflow, for several agents at once.

Each agent does LLM plans -> SDXL draws -> TTS speaks -> LLM reviews through one
orchestrator. Switches are shown as they run; at the end a summary (switches, time switching
versus working, peak VRAM against the budget) is printed and the outputs are written to a
folder (the event log as JSON lines, the summary, each agent's transcript, the images and
speech of real models and, when matplotlib is installed, the VRAM timeline chart).

Each step uses whatever the config's default model of its kind is: a simulated model sleeps
for the step's work time; a ``diffusers`` model draws a real PNG; a ``tts`` model speaks a
real WAV; an LLM served by ``vllm`` or a ``server`` backend answers the prompt through its
OpenAI-compatible API. The tiny models (``--tiny-models``) have random weights: their images
and speech are noise, by design. A config whose models point at real folders gives real ones.
"""

from __future__ import annotations

import io
import json
import random
import sys
import time
import wave
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anyio

from orchestrator.backends.simulated import SimulatedModel
from orchestrator.backends.synthetic import SyntheticHandle
from orchestrator.chart import render_timeline
from orchestrator.config import Config
from orchestrator.demo_setup import (
    TINY_HINT,
)
from orchestrator.device.simulated import SimulatedDevice
from orchestrator.events import Event
from orchestrator.media import MediaUnsupported, generate_image
from orchestrator.progress import StatusLine, Ticker
from orchestrator.runtime import Orchestrator
from orchestrator.timeline import CHARTS_HINT, ChartsUnavailable
from orchestrator.tiny_models import MODELS as TINY_MODEL_NAMES
from states.units import format_gib

SCENES = [
    "Luca running on the beach at sunset",
    "a lighthouse in a storm, oil painting",
    "a robot reading a book in a library",
    "a fox in a snowy forest at dawn",
    "a street market in the rain at night",
    "a paper boat on a river of stars",
]

# Work per step, in seconds at real speed (scaled like the switches).
WORK_S = {"plan": 2.0, "draw": 6.0, "speak": 1.5, "review": 2.0}

#: The demo's speech peaks at this level (dBFS) at most: the tiny TTS model's random weights
#: give near-full-scale noise, too loud to play at a normal volume.
SPEECH_PEAK_DBFS = -12.0
#: A switch that has run this long (wall seconds) gets a live elapsed-time line on a terminal.
SLOW_SWITCH_S = 1.0

NOISE_NOTE = (
    "the tiny models have random weights: their images and speech are noise by design (the "
    "speech is kept at {peak:g} dBFS); for real ones, give --config a file whose sdxl and tts "
    "models point at real folders (backend: {{type: diffusers, path: ...}} and {{type: tts, path: ...}})"
)


@dataclass
class AgentLog:
    agent: int
    scene: str
    lines: list[str] = field(default_factory=list)
    waited_s: float = 0.0
    worked_s: float = 0.0
    out_dir: Path = Path(".")


async def _step(orch: Orchestrator, log: AgentLog, kind: str, step: str, prompt: str) -> str:
    t0 = time.monotonic()
    async with orch.acquire(kind) as lease:
        t1 = time.monotonic()
        handle = lease.handle
        if isinstance(handle, SimulatedModel):
            out = await handle.run(prompt, work_s=WORK_S[step])
        elif isinstance(handle, SyntheticHandle):  # real CUDA memory standing for the model
            touched = await anyio.to_thread.run_sync(handle.run)
            await anyio.sleep(WORK_S[step] * orch.config.time_scale)
            out = f"[{lease.model} (synthetic: wrote {format_gib(touched)} of real GPU memory)] {prompt}"
        elif kind == "llm":
            out = await _ask_llm(orch, lease.model, handle, prompt)
        elif kind == "sdxl":
            # the scene itself: the simulated LLM's text is no prompt, and CLIP reads 77 tokens
            png = await generate_image(handle, log.scene, width=64, height=64, seed=log.agent)
            path = log.out_dir / f"agent-{log.agent}.png"
            path.write_bytes(png)
            out = f"drew {path.name} ({len(png)} bytes, a real PNG from {lease.model})"
        else:
            wav = await _speak(handle, prompt, seed=log.agent)
            path = log.out_dir / f"agent-{log.agent}.wav"
            path.write_bytes(wav)
            out = f"spoke {path.name} ({len(wav)} bytes, a real WAV from {lease.model})"
        log.waited_s += t1 - t0
        log.worked_s += time.monotonic() - t1
    log.lines.append(f"{step:>6} [{lease.model}] {out}")
    return str(out)


async def _ask_llm(orch: Orchestrator, model: str, handle: Any, prompt: str) -> str:
    """The prompt to an LLM served by ``vllm`` or a ``server`` backend (OpenAI chat API)."""
    client = getattr(handle, "client", None)
    if client is None:
        raise MediaUnsupported(
            f"{model!r}: the demo cannot talk to this LLM ({type(handle).__name__}); give it "
            "backend: vllm or backend: {type: server, ...}"
        )
    served = getattr(orch.backends.get(model), "served_model", None) or _option(
        orch.config, model, "served_model"
    )
    body = {
        "model": str(served or model),
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 64,
    }
    r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return str(r.json()["choices"][0]["message"]["content"]).strip()


async def _speak(handle: Any, text: str, *, seed: int) -> bytes:
    """``text`` spoken by a TTS model's ``Speaker``, as WAV bytes at a sane level."""
    if not callable(getattr(handle, "synthesize", None)):
        raise MediaUnsupported(
            f"{type(handle).__name__} speaks no audio: give the tts model backend: tts with the path "
            "of a local VITS model"
        )
    samples, rate = await anyio.to_thread.run_sync(lambda: handle.synthesize(text, seed=seed))
    return speech_wav(samples, rate)


def speech_wav(samples: Any, rate: int, *, peak_dbfs: float = SPEECH_PEAK_DBFS) -> bytes:
    """A mono 16-bit WAV of ``samples`` (floats, full scale 1.0), scaled down so that its peak
    is at most ``peak_dbfs`` (never up: a real model's quiet speech stays as it is, and nothing
    clips). The tiny TTS model's random weights give noise near full scale, a blast at normal
    volume; at -12 dBFS it is a hiss."""
    import numpy as np

    x = np.nan_to_num(np.asarray(samples, dtype=np.float64).reshape(-1))
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    limit = 10.0 ** (peak_dbfs / 20.0)
    if peak > limit:
        x = x * (limit / peak)
    pcm = np.round(x * 32767.0).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


async def creative_agent(orch: Orchestrator, log: AgentLog) -> None:
    """The Model Management Module's Example 1 with the new API: plan, draw, speak, review."""
    prompt = await _step(orch, log, "llm", "plan", f"Write an image prompt for: {log.scene}")
    image = await _step(orch, log, "sdxl", "draw", prompt)
    await _step(orch, log, "tts", "speak", f"Here is {log.scene}")
    await _step(orch, log, "llm", "review", f"Evaluate the quality of: {image}")


class Progress:
    """Prints switches and evictions as they happen; on a terminal, a switch that takes more
    than ``SLOW_SWITCH_S`` (a cold load of a real model) shows its elapsed time meanwhile."""

    def __init__(self, orch: Orchestrator, line: StatusLine, time_scale: float, ticker: Ticker) -> None:
        self.orch, self.line, self.time_scale, self.ticker = orch, line, time_scale, ticker

    def __call__(self, e: Event) -> None:
        stamp = f"[{e.time_s:7.2f} s]" + ("" if e.gpu is None else f" cuda:{e.gpu}")
        if e.kind == "transition" and e.trigger == "begin_switch":
            what = f"loading {e.model}" if e.model else (e.detail or "unloading")
            self.line.print(f"{stamp} switching: {e.from_state} -> {what} ...")
            self.ticker.step(what, after_s=SLOW_SWITCH_S)
        elif e.kind == "transition" and e.trigger in ("finish_switch", "fail_switch"):
            self.ticker.done()
            dur = (e.duration_s or 0.0) / self.time_scale if self.time_scale else 0.0
            verb = "now" if e.trigger == "finish_switch" else "FAILED, back to"
            self.line.print(
                f"{stamp} {verb} {e.to_state} ({format_gib(e.bytes_after or 0)} committed; "
                f"the switch takes {dur:.1f} s at real speed)"
            )
        elif e.kind == "evict":
            self.line.print(f"{stamp}   evicted {e.model}: {e.detail}")
        elif e.kind == "load":
            self.line.print(f"{stamp}   loaded {e.model} {e.detail}")
        elif e.kind == "fail":
            self.line.print(f"{stamp}   error: {e.detail}")


async def run_demo(
    orch: Orchestrator,
    *,
    agents: int = 3,
    out_dir: Path,
    seed: int = 0,
    stream: TextIO = sys.stdout,
    on_event: Callable[[Event], None] | None = None,
) -> dict[str, Any]:
    """Run the workflow for ``agents`` agents; write the outputs; return the summary."""
    if agents < 1:
        raise ValueError(f"agents must be at least 1, got {agents}")
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    logs = [AgentLog(i + 1, SCENES[(i + seed) % len(SCENES)], out_dir=out_dir) for i in range(agents)]
    events_path = out_dir / "events.jsonl"
    scale = orch.config.time_scale or 1.0
    budget = orch.config.budget_bytes
    device = orch.device
    devices = orch.devices
    on = device.name if len(devices) == 1 else f"{len(devices)} cards ({_names(orch)})"
    print(
        f"vram-orchestrator demo: {agents} agents on {on} ({device.source} device), "
        f"budget {format_gib(budget)}"
        + ("" if len(devices) == 1 else " in all")
        + f"; time runs {1 / scale:g}x faster than real",
        file=stream,
    )
    line = StatusLine(stream)
    with events_path.open("w") as ev_file, Ticker(line) as ticker:

        def record(e: Event) -> None:
            ev_file.write(json.dumps(e.to_dict()) + "\n")

        orch.add_listener(record)
        orch.add_listener(Progress(orch, line, scale, ticker))
        per_card = CardCounts()
        orch.add_listener(per_card)
        if on_event is not None:
            orch.add_listener(on_event)
        for d in devices.values():
            if isinstance(d, SimulatedDevice):
                d.reset_peaks()
        baseline_bytes = device.read().used_bytes
        t0 = time.monotonic()
        async with orch:
            async with anyio.create_task_group() as tg:
                for log in logs:
                    await anyio.sleep(rng.uniform(0, 0.5) * scale)
                    tg.start_soon(creative_agent, orch, log)
            stats = orch.statistics()
        wall_s = time.monotonic() - t0

    if isinstance(device, SimulatedDevice):
        peak = device.peak_owned_bytes
    else:  # the real device: what NVML (or torch) saw in use, over what was in use before
        peak = max(0, orch.sampler.peak_bytes - baseline_bytes)
    worked = sum(log.worked_s for log in logs)
    summary = {
        "agents": agents,
        "device": device.source,
        "budget_bytes": budget,
        "time_scale": orch.config.time_scale,
        "peak_vram_bytes": peak,
        "peak_committed_bytes": stats.peak_committed_bytes,
        "switches": stats.switches,
        "exchanges": stats.exchanges,
        "failed_switches": stats.failed_switches,
        "cold_loads": stats.loads,
        "restores_from_host": stats.restores,
        "evictions": stats.evictions,
        "leases": stats.grants,
        "wall_s": wall_s,
        "real_speed_s": wall_s / scale,
        "switching_real_speed_s": stats.switching_s / scale,
        "working_real_speed_s": worked / scale,
        "wait_p50_real_speed_s": stats.waits.p50_s / scale,
        "wait_max_real_speed_s": stats.waits.max_s / scale,
    }
    if len(devices) > 1:
        cards = _card_summaries(orch, per_card)
        summary["cards"] = cards
        summary["peak_vram_bytes"] = sum(c["peak_vram_bytes"] for c in cards)  # each card's peak, summed
        summary["within_budget"] = all(c["peak_vram_bytes"] <= c["budget_bytes"] for c in cards)
    else:
        summary["within_budget"] = peak <= budget
    summary["images"] = sorted(p.name for p in out_dir.glob("agent-*.png"))
    summary["audio"] = sorted(p.name for p in out_dir.glob("agent-*.wav"))
    real = [name for name, spec in orch.config.models.items() if spec.backend in ("diffusers", "tts")]
    summary["real_models"] = real
    summary["tiny_models"] = [name for name in real if _is_tiny(orch.config, name)]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with (out_dir / "transcripts.txt").open("w") as f:
        for log in logs:
            f.write(f"agent {log.agent}: {log.scene}\n")
            for text in log.lines:
                f.write(f"  {text}\n")
    chart = _write_chart(events_path, out_dir / "timeline.png", budget, orch.config.time_scale)
    print(_format_summary(summary, out_dir, chart), file=stream)
    return summary


class CardCounts:
    """Per card, from the events' ``gpu``: the switches it ran and the models it loaded."""

    def __init__(self) -> None:
        self.switches: dict[int, int] = {}
        self.loaded: dict[int, list[str]] = {}

    def __call__(self, e: Event) -> None:
        if e.gpu is None:
            return
        if e.kind == "transition" and e.trigger == "finish_switch" and e.model is not None:
            self.switches[e.gpu] = self.switches.get(e.gpu, 0) + 1
        elif e.kind == "load" and e.model is not None:
            names = self.loaded.setdefault(e.gpu, [])
            if e.model not in names:
                names.append(e.model)


def _names(orch: Orchestrator) -> str:
    names = [d.name for d in orch.devices.values()]
    return names[0] if len(set(names)) == 1 else ", ".join(names)


def _card_summaries(orch: Orchestrator, counts: CardCounts) -> list[dict[str, Any]]:
    out = []
    for card in orch.config.cards:
        d = orch.devices[card.index]
        peak = d.peak_owned_bytes if isinstance(d, SimulatedDevice) else None
        out.append(
            {
                "index": card.index,
                "name": d.name,
                "budget_bytes": card.budget_bytes,
                "peak_vram_bytes": peak if peak is not None else 0,
                "switches": counts.switches.get(card.index, 0),
                "loaded": counts.loaded.get(card.index, []),
            }
        )
    return out


def _option(config: Config, name: str, key: str) -> Any:
    """One of a model's backend options (a mapping, or the backend type's options object)."""
    options = config.models[name].options
    if isinstance(options, Mapping):
        return options.get(key)
    return getattr(options, key, None)


def _is_tiny(config: Config, name: str) -> bool:
    """Is this model one of ``orchestrator.tiny_models`` (random weights)?"""
    path = _option(config, name, "path")
    return bool(path) and Path(str(path)).name in TINY_MODEL_NAMES


def _write_chart(events_path: Path, out: Path, budget_bytes: int, time_scale: float) -> Path | None:
    """The VRAM timeline chart, when matplotlib (the ``charts`` extra) is installed."""
    try:
        return render_timeline(events_path, out, budget_bytes=budget_bytes, time_scale=time_scale or 1.0)
    except ChartsUnavailable:
        return None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("ch") else "s")


def _format_summary(s: dict[str, Any], out_dir: Path, chart: Path | None) -> str:
    ok = "within" if s["peak_vram_bytes"] <= s["budget_bytes"] else "OVER"
    lines = [
        "",
        "summary (times at real speed)",
        f"  switches             {s['switches']} ({s['exchanges']} took the GPU from another model; "
        f"{s['cold_loads']} cold loads, {s['restores_from_host']} restores from host RAM, "
        f"{s['evictions']} evictions, {s['failed_switches']} failed)",
        f"  leases               {s['leases']}",
        f"  total time           {s['real_speed_s']:.1f} s",
        f"  switching            {s['switching_real_speed_s']:.1f} s",
        f"  working (all agents) {s['working_real_speed_s']:.1f} s",
        f"  wait p50 / max       {s['wait_p50_real_speed_s']:.1f} s / {s['wait_max_real_speed_s']:.1f} s",
        f"  peak VRAM            {format_gib(s['peak_vram_bytes'])} of the {format_gib(s['budget_bytes'])} "
        f"budget ({ok})",
    ]
    cards = s.get("cards")
    if cards:
        lines[-1] = "  peak VRAM per card   (each card's budget holds on its own)"
        for c in cards:
            within = "within" if c["peak_vram_bytes"] <= c["budget_bytes"] else "OVER"
            loaded = ", ".join(c["loaded"]) or "nothing"
            lines.append(
                f"    cuda:{c['index']}             {format_gib(c['peak_vram_bytes'])} of its "
                f"{format_gib(c['budget_bytes'])} budget ({within}); {_plural(c['switches'], 'switch')}; "
                f"loaded {loaded}"
            )
    tiny = s.get("tiny_models") or []
    real = [m for m in s.get("real_models") or [] if m not in tiny]
    where = "on the CPU" if s["device"] == "simulated" else "on the GPU"
    files = ", ".join(s["images"] + s["audio"]) or "no outputs"
    if tiny:
        lines.append(
            f"  real tiny models     {', '.join(tiny)} ({where}, standing in for the full-size ones; "
            f"their real times are scaled like the simulated ones): {files}"
        )
    if real:
        lines.append(f"  real models          {', '.join(real)} ({where}): {files}")
    if tiny:
        lines.append("  note: " + NOISE_NOTE.format(peak=SPEECH_PEAK_DBFS))
    if not tiny and not real:
        lines.append(f"  models               all simulated (no image or audio); {TINY_HINT}")
    if chart is not None:
        lines.append(
            f"outputs: {out_dir}/ (events.jsonl, summary.json, transcripts.txt); VRAM timeline chart: {chart}"
        )
    else:
        lines += [
            f"outputs: {out_dir}/ (events.jsonl, summary.json, transcripts.txt)",
            f"no timeline chart: matplotlib is missing; {CHARTS_HINT}, then "
            f"vram-orchestrator timeline {out_dir}/events.jsonl",
        ]
    return "\n".join(lines)
