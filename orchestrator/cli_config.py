"""The command line's config commands: ``plan`` (what the config would do: the budget, each
model's room, what can never fit) and ``check`` (the property harness on the config)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from orchestrator.config import Config, load_config
from orchestrator.errors import OrchestratorError
from orchestrator.spec import ModelSpec
from states.units import format_gib

EXIT_OK, EXIT_ERROR = 0, 1


def _machine_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def plan_problems(config: Config) -> list[str]:
    """What is wrong with a config that parsed (parse errors are raised, not listed)."""
    problems = []
    ram = _machine_ram_bytes()
    if config.host_budget_bytes and ram is not None and config.host_budget_bytes > ram * 0.8:
        problems.append(
            f"switching.host_ram_budget_gb: {format_gib(config.host_budget_bytes)} is more than 80% of this "
            f"machine's RAM ({format_gib(ram)}); lower it"
        )
    offloaded = sorted(n for n, s in config.models.items() if s.offload)
    if offloaded and not config.host_budget_bytes:
        problems.append(
            f"models.{offloaded[0]}.offload: true, but switching.host_ram_budget_gb is 0, so the host "
            f"tier is off and {', '.join(offloaded)} will be reloaded from disk after every eviction; "
            "set switching.host_ram_budget_gb (e.g. 12), or drop offload"
        )
    for kind in sorted(config.exclusive_kinds | config.light_kinds):
        if not any(s.kind == kind for s in config.models.values()):
            continue
        if kind not in config.defaults:
            names = sorted(n for n, s in config.models.items() if s.kind == kind)
            problems.append(
                f"defaults.{kind}: several models of kind {kind!r} ({', '.join(names)}) and no default; "
                f"acquire({kind!r}) cannot choose: add `{kind}: {names[0]}` under defaults"
            )
    lights = [s for s in config.models.values() if s.kind in config.light_kinds]
    heavies = [s for s in config.models.values() if s.kind in config.exclusive_kinds]
    if lights and heavies and not _light_fits_beside_heavy(config, lights, heavies):
        problems.append(
            "switching.light_models: no light model fits beside any heavy one"
            + ("" if len(config.cards) == 1 else " on a card they may both use")
            + ", so every light request evicts the heavy model; list the light kinds under heavy_models "
            "to say so, or raise the budget"
        )
    for name, reason in never_placed(config):
        problems.append(f"models.{name}: can never be placed: {reason}")
    return problems


def _light_fits_beside_heavy(config: Config, lights: list[ModelSpec], heavies: list[ModelSpec]) -> bool:
    """Whether some light model fits beside some heavy one on a card both may use."""
    if len(config.cards) == 1:
        return any(h.vram_bytes + min(x.vram_bytes for x in lights) <= config.budget_bytes for h in heavies)
    return any(
        h.card_bytes + x.card_bytes <= card.budget_bytes
        for card in config.cards
        for h in heavies
        if _may_use(h, card.index)
        for x in lights
        if _may_use(x, card.index)
    )


def _may_use(spec: ModelSpec, gpu: int) -> bool:
    return spec.gpus is None or gpu in spec.gpus


def never_placed(config: Config) -> list[tuple[str, str]]:
    """(model, why) for each model that no card can ever take: its share (all of it, or its
    ``tensor_parallel`` share) fits fewer of the cards it may use than it spans. The parser
    refuses such a config; this is what ``plan`` checks on what it is given."""
    out = []
    for name, spec in config.models.items():
        usable = [c for c in config.cards if _may_use(spec, c.index)]
        fit = [c for c in usable if spec.card_bytes <= c.budget_bytes]
        if len(fit) >= spec.tensor_parallel:
            continue
        cards = ", ".join(f"cuda:{c.index} ({format_gib(c.budget_bytes)})" for c in usable)
        if spec.tensor_parallel > 1:
            why = (
                f"it spans {spec.tensor_parallel} cards at {format_gib(spec.card_bytes)} each, and "
                f"{len(fit)} of the cards it may use have that room: {cards}"
            )
        else:
            why = f"{format_gib(spec.card_bytes)} is larger than the budget of every card it may use: {cards}"
        out.append((name, why))
    return out


def _plan_cards(config: Config) -> None:
    """``plan`` on a machine with several cards: a table per card of the models that may use
    it (each with its share on the card and what that leaves of the card's budget)."""
    models = sorted(config.models.items(), key=lambda kv: (kv[1].kind, kv[0]))
    head = ("model", "kind", "class", "VRAM", "spare", "on evict", "")
    for card in config.cards:
        rows: list[tuple[str, ...]] = []
        for name, spec in models:
            if not _may_use(spec, card.index):
                continue
            spare = card.budget_bytes - spec.card_bytes
            notes = ["default"] if config.defaults.get(spec.kind) == name else []
            if spec.tensor_parallel > 1:
                notes.append(f"spans {spec.tensor_parallel} cards ({format_gib(spec.vram_bytes)} in all)")
            if spec.gpus is not None:
                notes.append("only " + ", ".join(f"cuda:{g}" for g in spec.gpus))
            rows.append(
                (
                    name,
                    spec.kind,
                    "heavy" if spec.kind in config.exclusive_kinds else "light",
                    format_gib(spec.card_bytes),
                    format_gib(spare) if spare >= 0 else f"short {format_gib(-spare)}: never here",
                    "host RAM" if spec.offload else "-",
                    ", ".join(notes),
                )
            )
        print(
            f"cuda:{card.index} {card.name}: budget {format_gib(card.budget_bytes)} of "
            f"{format_gib(card.total_bytes)}"
        )
        if not rows:
            print("  (no model may use this card)")
            continue
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        for r in [head, *rows]:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_plan(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if len(config.cards) > 1:
        return _cmd_plan_cards(config)
    rows = []
    for name, spec in sorted(config.models.items(), key=lambda kv: (kv[1].kind, kv[0])):
        heavy = spec.kind in config.exclusive_kinds
        default = "default" if config.defaults.get(spec.kind) == name else ""
        spare = config.budget_bytes - spec.vram_bytes
        rows.append(
            (
                name,
                spec.kind,
                "heavy" if heavy else "light",
                format_gib(spec.vram_bytes),
                format_gib(spare),
                "host RAM" if spec.offload else "-",
                default,
            )
        )
    head = ("model", "kind", "class", "VRAM", "spare", "on evict", "")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print(f"{config.source}: {config.gpu_name}, {config.device} device")
    print(
        f"budget {format_gib(config.budget_bytes)} of {format_gib(config.total_bytes)}; host-RAM tier "
        f"{format_gib(config.host_budget_bytes) if config.host_budget_bytes else 'off'}; "
        + _scheduling_text(config)
    )
    for r in [head, *rows]:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    problems = plan_problems(config)
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    if problems:
        return EXIT_ERROR
    print("ok: every model fits the budget alone; defaults and groups are consistent")
    return EXIT_OK


def _scheduling_text(config: Config) -> str:
    return (
        f"scheduling {config.mode.value} ("
        + (
            "fairness: the measured cost of each switch"
            if config.fairness == "cost"
            else f"fairness {config.fairness_s:g} s"
        )
        + f", max wait {config.max_wait_s:g} s)"
    )


def _cmd_plan_cards(config: Config) -> int:
    devices = f"{config.device} device" + ("s" if config.device == "simulated" else "")
    print(f"{config.source}: {len(config.cards)} cards, {devices}")
    print(
        f"budget {format_gib(config.budget_bytes)} of {format_gib(config.total_bytes)} on "
        f"{len(config.cards)} cards; host-RAM tier "
        f"{format_gib(config.host_budget_bytes) if config.host_budget_bytes else 'off'} "
        "(shared by every card); " + _scheduling_text(config)
    )
    _plan_cards(config)
    problems = plan_problems(config)
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    if problems:
        return EXIT_ERROR
    print(
        "ok: every model fits a card it may use (or as many as it spans); defaults and groups are consistent"
    )
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    try:
        from hypothesis import HealthCheck, settings
        from hypothesis.stateful import run_state_machine_as_test
    except ImportError:
        raise OrchestratorError("`check` needs hypothesis: pip install 'vram-orchestrator[dev]'") from None
    from orchestrator.testing import machine_for, quiet_expected_failures, unusable_models

    config = load_config(args.config)
    factor = args.footprint_factor
    machine = machine_for(config, footprint_factor=factor)
    print(
        f"exploring {config.source} on the simulated device: {args.examples} random sequences of up to "
        f"{args.steps} steps (acquires, cancellations, timeouts, faults, foreign memory"
        + (f", true footprints {factor:g}x the estimates" if factor != 1 else "")
        + ")"
    )
    t0 = time.monotonic()
    # The faults the harness injects are logged by the orchestrator as errors: expected here.
    quiet = quiet_expected_failures() if not args.debug else contextlib.nullcontext()
    try:
        with quiet:
            run_state_machine_as_test(
                machine,
                settings=settings(
                    max_examples=args.examples,
                    stateful_step_count=args.steps,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                ),
            )
    except Exception as exc:
        found = _find_violation(exc)
        print(f"FAILED: {found if found is not None else f'{type(exc).__name__}: {exc}'}")
        for note in getattr(found or exc, "__notes__", []):
            print(note)
        return EXIT_ERROR
    budgets = (
        format_gib(config.budget_bytes)
        if len(config.cards) == 1
        else ", ".join(f"cuda:{c.index} {format_gib(c.budget_bytes)}" for c in config.cards)
    )
    print(
        f"ok: no sequence passed the budget ({budgets}), lost a lease or "
        f"starved a model ({time.monotonic() - t0:.1f} s)"
    )
    # Apart from the budget: which models no sequence could ever load at this factor.
    unusable = unusable_models(config, footprint_factor=factor)
    if unusable:
        at = f" at {factor:g}x" if factor != 1 else ""
        print(
            f"unusable{at}: {len(unusable)} of {len(config.models)} models can never be loaded within "
            f"the {format_gib(config.budget_bytes)} budget (once their true size is learned, plus the "
            f"{config.footprint_margin:.0%} footprint margin, acquire() refuses them with "
            f"InsufficientVRAM): " + ", ".join(u.describe() for u in unusable)
        )
    return EXIT_OK


def _find_violation(exc: BaseException) -> BaseException | None:
    """The invariant violation inside what hypothesis raised (it may wrap it in groups)."""
    from orchestrator.testing import InvariantViolation

    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, InvariantViolation):
            return e
        todo.extend(getattr(e, "exceptions", ()))
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return None


DEFAULT_CONFIG_HELP = "YAML config (default: the embedded simulated 16 GiB GPU, configs/simulated-16gb.yaml)"
