"""The VRAM timeline chart: ``chart_data()`` works out everything the chart shows (the
stacked bands, the shaded regions, the title, the axis range) as plain numbers from a
``Timeline`` (``orchestrator.timeline``); ``render_timeline()`` draws it with matplotlib (the
optional ``charts`` extra, imported only there and only when called): committed bytes per
model stacked over time, the budget line, switch spans shaded, GiB and seconds. On a machine
with several cards (events that name their ``gpu``) it draws one panel per card, each with its
card's budget, over one time axis (``chart_panels()``); a model keeps its colour on every card.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.events import Event
from orchestrator.timeline import (
    ChartsUnavailable,
    Timeline,
    TimelineError,
    budget_from_events,
    by_card,
    read_events,
    reconstruct,
)
from states.units import GIB, format_gib


def _import_matplotlib() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ChartsUnavailable() from None
    return Figure


def charts_available() -> bool:
    try:
        _import_matplotlib()
    except ChartsUnavailable:
        return False
    return True


@dataclass(frozen=True)
class Band:
    """One layer of the stack: a model's bytes (resident, or loading) over the chart's x."""

    model: str
    loading: bool
    base_gib: tuple[float, ...]  # at each x, where the layer starts
    top_gib: tuple[float, ...]  # and where it ends (equal to base where the model is absent)
    color: str
    label: str  # "qwen-14b (11.50 GiB)"


@dataclass(frozen=True)
class Region:
    """A shaded span of the x axis (a switch, a failed one, an unload, the shutdown)."""

    start: float
    end: float
    label: str  # "switching", "failed switch", "unloading" or "shutdown"


REGION_STYLE = {  # label -> (face colour, alpha, hatch)
    "switching": ("#9aa0a6", 0.18, None),
    "failed switch": ("#d93025", 0.28, None),
    "unloading": ("#9aa0a6", 0.10, None),
    "shutdown": ("#5f6368", 0.08, "..."),
}


@dataclass(frozen=True)
class ChartData:
    """Everything the chart shows, in its own units (seconds at the chart's speed, GiB)."""

    x: tuple[float, ...]  # breakpoints, piecewise constant after each (step "post")
    bands: tuple[Band, ...]  # bottom first
    committed_gib: tuple[float, ...]  # the stack's top at each x
    regions: tuple[Region, ...]
    restarts: tuple[float, ...]
    x_max: float  # the axis' end: past the last event, so the last eviction shows
    peak_gib: float
    title: str

    def band(self, model: str, *, loading: bool = False) -> Band:
        for b in self.bands:
            if b.model == model and b.loading is loading:
                return b
        raise KeyError(f"no {'loading ' if loading else ''}band for {model!r}")


def chart_data(
    tl: Timeline,
    *,
    budget_bytes: int | None = None,
    time_scale: float = 1.0,
    title: str | None = None,
    colors: Mapping[str, str] | None = None,
) -> ChartData:
    """The numbers the chart is drawn from (pure: no matplotlib), for ``render_timeline``.

    :param colors: a colour per model (the panels of several cards share one); by default the
        palette in the order the models first appear.
    """
    if time_scale <= 0:
        raise TimelineError(f"time_scale must be positive, got {time_scale!r}")
    k = 1.0 / time_scale
    # The axis runs a little past the last event: the last eviction (the shutdown's) happens
    # at the last event, and a drop to zero on the axis' edge cannot be seen.
    pad_s = max(tl.end_s * 0.03, 1e-3)
    t_max = tl.end_s + pad_s
    times = sorted({0.0, tl.end_s, t_max, *(s.start_s for s in tl.spans), *(s.end_s for s in tl.spans)})
    x = tuple(t * k for t in times)
    # Colours follow the order of first appearance (the first model loaded is blue).
    palette = _palette(len(tl.models))
    first_seen = sorted(tl.models, key=lambda m: min(s.start_s for s in tl.spans if s.model == m))
    base = [0.0] * len(times)
    bands: list[Band] = []
    for model in tl.models:
        color = colors[model] if colors and model in colors else palette[first_seen.index(model)]
        size = max(s.bytes for s in tl.spans if s.model == model)
        for loading in (False, True):
            layer = [0.0] * len(times)
            for sp in tl.spans:
                if sp.model == model and sp.loading is loading:
                    for j in range(bisect_left(times, sp.start_s), bisect_left(times, sp.end_s)):
                        layer[j] += sp.bytes / GIB
            if not any(layer):
                continue
            top = [b + v for b, v in zip(base, layer, strict=True)]
            bands.append(
                Band(model, loading, tuple(base), tuple(top), color, f"{model} ({format_gib(size)})")
            )
            base = top
    labels = {"switch": "switching", "unload": "unloading", "shutdown": "shutdown"}
    regions = tuple(
        Region(sw.start_s * k, sw.end_s * k, labels.get(sw.what, "switching") if sw.ok else "failed switch")
        for sw in tl.switches
    )
    peak = max(base, default=0.0)
    n_ok = sum(1 for r in regions if r.label == "switching")
    n_exchanges = sum(1 for sw in tl.switches if sw.exchange)
    n_failed = sum(1 for r in regions if r.label == "failed switch")
    n_unloads = sum(1 for r in regions if r.label == "unloading")
    peak_txt = f"peak {peak:.2f} GiB" + (f" of the {format_gib(budget_bytes)} budget" if budget_bytes else "")
    title = title or (
        f"VRAM timeline: {_plural(n_ok, 'switch')}"
        + (f" ({n_exchanges} took the GPU from another model)" if n_ok else "")
        + (f", {_plural(n_failed, 'failed switch')}" if n_failed else "")
        + (f", {_plural(n_unloads, 'unload')}" if n_unloads else "")
        + f", {peak_txt}"
    )
    return ChartData(
        x=x,
        bands=tuple(bands),
        committed_gib=tuple(base),
        regions=regions,
        restarts=tuple(t * k for t in tl.restarts),
        x_max=t_max * k,
        peak_gib=peak,
        title=title,
    )


@dataclass(frozen=True)
class Panel:
    """One card's part of the chart (``gpu`` None: the one card of a log that names none)."""

    gpu: int | None
    data: ChartData
    budget_bytes: int | None


def chart_panels(
    events: Sequence[Event],
    *,
    budget_bytes: int | None = None,
    time_scale: float = 1.0,
    sizes: Mapping[str, int] | None = None,
    title: str | None = None,
) -> list[Panel]:
    """A panel per card (one for a log whose events name no card), pure: no matplotlib.

    With several cards each panel's budget is the one its card's events carry (``budget_bytes``
    only stands in for a card whose events carry none), and a model has one colour on all."""
    cards = by_card(events)
    if len(cards) == 1 and cards[0][0] is None:
        tl = reconstruct(cards[0][1], sizes)
        return [
            Panel(
                None,
                chart_data(tl, budget_bytes=budget_bytes, time_scale=time_scale, title=title),
                budget_bytes,
            )
        ]
    timelines = [(gpu, evs, reconstruct(evs, sizes)) for gpu, evs in cards]
    order: list[str] = []
    for _gpu, _evs, tl in timelines:
        first = sorted(tl.models, key=lambda m: min(s.start_s for s in tl.spans if s.model == m))
        order += [m for m in first if m not in order]
    palette = _palette(len(order))
    colors = {m: palette[i] for i, m in enumerate(order)}
    panels = []
    for gpu, evs, tl in timelines:
        budget = budget_from_events(evs) or budget_bytes
        data = chart_data(tl, budget_bytes=budget, time_scale=time_scale, colors=colors)
        panels.append(
            Panel(gpu, dataclasses.replace(data, title=f"cuda:{gpu}: " + _short_title(data.title)), budget)
        )
    return panels


def _short_title(title: str) -> str:
    return title.removeprefix("VRAM timeline: ")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else ('es' if word.endswith('ch') else 's')}"


def render_timeline(
    events: Sequence[Event] | str | Path,
    out_path: str | Path,
    *,
    budget_bytes: int | None = None,
    time_scale: float = 1.0,
    sizes: Mapping[str, int] | None = None,
    title: str | None = None,
) -> Path:
    """Draw the VRAM timeline of an event log into a PNG; returns its path.

    :param events: the events, or the path of an ``events.jsonl``.
    :param budget_bytes: drawn as a horizontal line; ``None`` leaves it out.
    :param time_scale: the simulation's time scale: times are divided by it, so that a run
        at ``time_scale=0.01`` is drawn at real speed (and the axis says so).
    :param sizes: known bytes per model (see ``reconstruct``).
    :raises ChartsUnavailable: matplotlib is not installed.
    :raises TimelineError: the log cannot be read or holds no events.
    """
    Figure = _import_matplotlib()
    from matplotlib.colors import to_rgba

    if isinstance(events, str | Path):
        source = Path(events)
        evs = read_events(source)
    else:
        source, evs = None, list(events)
    if not evs:
        raise TimelineError(f"{source or 'the event list'}: no events to draw; run the orchestrator first")
    if time_scale <= 0:
        raise TimelineError(f"time_scale must be positive, got {time_scale!r}")
    panels = chart_panels(evs, budget_bytes=budget_bytes, time_scale=time_scale, sizes=sizes, title=title)
    x_label = (
        "time (s)"
        if time_scale == 1
        else f"time at real speed (s); the run was {1 / time_scale:g}x faster than real"
    )
    if len(panels) == 1:
        fig = Figure(figsize=(11, 5.2), dpi=110, layout="constrained")
        (panel,) = panels
        _draw(fig.add_subplot(), panel.data, panel.budget_bytes, to_rgba, x_label=x_label)
    else:
        fig = Figure(figsize=(11, 1.0 + 3.4 * len(panels)), dpi=110, layout="constrained")
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        x_max = max(p.data.x_max for p in panels)
        for i, (ax, panel) in enumerate(zip(axes, panels, strict=True)):
            last = i == len(panels) - 1
            _draw(ax, panel.data, panel.budget_bytes, to_rgba, x_label=x_label if last else None, x_max=x_max)
        switches = sum(sum(1 for r in p.data.regions if r.label == "switching") for p in panels)
        fig.suptitle(
            title or f"VRAM timeline on {len(panels)} cards: {_plural(switches, 'switch')} in all",
            fontsize=12,
        )

    out = Path(out_path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
    except OSError as exc:
        raise TimelineError(
            f"{out}: cannot write the chart ({exc.strerror}); choose a writable path"
        ) from None
    return out


def _draw(
    ax: Any,
    data: ChartData,
    budget_bytes: int | None,
    to_rgba: Any,
    *,
    x_label: str | None,
    x_max: float | None = None,
) -> None:
    """One panel: the stacked bands, the committed outline, the shaded switches, the budget."""
    model_handles: list[Any] = []
    for band in data.bands:
        poly = ax.fill_between(
            data.x,
            band.base_gib,
            band.top_gib,
            step="post",
            facecolor=to_rgba(band.color, 0.3 if band.loading else 0.9),
            hatch="///" if band.loading else None,
            edgecolor=band.color if band.loading else "white",
            linewidth=0.0 if band.loading else 0.6,
            label=None if band.loading else band.label,
        )
        if not band.loading:
            model_handles.append(poly)
    # The committed total, as a crisp outline of the stack.
    ax.step(data.x, data.committed_gib, where="post", color="#333333", linewidth=0.9, label="committed")

    labelled: set[str] = set()
    for r in data.regions:
        face, alpha, hatch = REGION_STYLE[r.label]
        ax.axvspan(
            r.start,
            r.end,
            facecolor=to_rgba(face, alpha),
            hatch=hatch,
            edgecolor=to_rgba(face, 0.35) if hatch else "none",
            linewidth=0,
            label="_" if r.label in labelled else r.label,
            zorder=0,
        )
        labelled.add(r.label)
    for i, t in enumerate(data.restarts):
        ax.axvline(t, color="#555555", linestyle=":", linewidth=1.2, label="restart" if i == 0 else "_")
    if any(b.loading for b in data.bands):
        ax.fill_between(
            [], [], [], facecolor="white", edgecolor="#555555", hatch="///", label="loading (committed)"
        )

    top_gib = data.peak_gib
    if budget_bytes is not None:
        ax.axhline(budget_bytes / GIB, color="#c5221f", linestyle="--", linewidth=1.6)
        ax.annotate(
            f"budget {format_gib(budget_bytes)}",
            xy=(1.0, budget_bytes / GIB),
            xycoords=("axes fraction", "data"),
            xytext=(-4, 4),
            textcoords="offset points",
            ha="right",
            va="bottom",
            color="#c5221f",
            fontsize=9,
        )
        top_gib = max(top_gib, budget_bytes / GIB)
    ax.set_ylim(0, max(1.0, top_gib * 1.12))
    ax.set_xlim(0, max(data.x_max if x_max is None else x_max, 1e-9))
    ax.set_ylabel("committed VRAM (GiB)")
    if x_label is not None:
        ax.set_xlabel(x_label)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(data.title, fontsize=12)
    # The models in the legend read top-down, as the stack does.
    handles, _ = ax.get_legend_handles_labels()
    handles = [*reversed(model_handles), *(h for h in handles if h not in model_handles)]
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=9,
        frameon=False,
    )


def _palette(n: int) -> list[str]:
    base = [
        "#4e79a7",  # blue
        "#f28e2b",  # orange
        "#59a14f",  # green
        "#b07aa1",  # purple
        "#76b7b2",  # teal
        "#edc948",  # yellow
        "#9c755f",  # brown
        "#ff9da7",  # pink
        "#bab0ac",  # grey
    ]
    return [base[i % len(base)] for i in range(n)]
