"""The command line: ``vram-orchestrator`` (also ``python -m orchestrator``).

Errors print one line (what, where, what to do) and exit 1; arguments that are refused (a
negative count, a missing value) print argparse's usage line and exit 2. ``--debug`` (before
or after the command) shows the traceback and the debug log.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from orchestrator.cli_config import DEFAULT_CONFIG_HELP, cmd_check, cmd_plan
from orchestrator.config import Config, load_config
from orchestrator.errors import OrchestratorError
from states.units import format_gib, gib_to_bytes

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number greater than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number greater than 0, got {text}")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    import anyio

    from orchestrator.demo import run_demo
    from orchestrator.runtime import Orchestrator

    config = load_config(args.config)
    if args.time_scale is not None:
        import dataclasses

        config = dataclasses.replace(config, time_scale=args.time_scale)
    out_dir = Path(args.out) if args.out else Path(f"vram-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.gpus is not None:
        from orchestrator.demo_setup import with_cards

        config = with_cards(config, args.gpus)  # on the simulated device: no real-GPU variant
    elif args.device == "auto" and not args.config and config.device == "simulated":
        from orchestrator.demo_setup import real_gpu_variant

        variant, why = real_gpu_variant(config)
        if variant is not None:
            print(f"a GPU is here: the demo runs on the real device ({variant.gpu_name})")
            config = variant
        else:
            print(f"no GPU to use ({why}): the demo runs on the simulated device")
    from orchestrator.demo_setup import tiny_targets

    if args.tiny_models != "off" and tiny_targets(config):
        from orchestrator.demo_setup import TINY_HINT, default_tiny_dir, tiny_models_missing, with_tiny_models

        missing = tiny_models_missing()
        if missing is None:
            root = default_tiny_dir() if args.tiny_models == "auto" else Path(args.tiny_models)
            print(f"the real tiny models (SDXL, TTS) from {root} (built there on first use) ...", flush=True)
            config, _ = with_tiny_models(config, root, stream=sys.stdout)
        elif args.tiny_models != "auto":
            print(
                f"vram-orchestrator demo: error: --tiny-models {args.tiny_models}: {missing}; {TINY_HINT}",
                file=sys.stderr,
            )
            return EXIT_ERROR
    orch = Orchestrator(config)
    summary = anyio.run(lambda: run_demo(orch, agents=args.agents, out_dir=out_dir, seed=args.seed))
    return EXIT_OK if summary["within_budget"] else EXIT_ERROR


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from orchestrator.status import format_status, status_report

    if args.url:
        from orchestrator.client import fetch_status

        if args.config:
            raise OrchestratorError(
                "give --url (a running daemon) or --config (its view of a config), not both"
            )
        report = fetch_status(args.url, args.token)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(format_status(report, running=True))
            for lease in report.get("leases", []):
                what = lease["model"] or f"{lease['bytes']} bytes"
                holder = lease["holder"] or "-"
                print(f"  lease {lease['id']} on {what}: holder {holder}, ttl {lease['ttl_s']:g} s")
        return EXIT_OK

    from orchestrator.runtime import Orchestrator

    # Without --url: build the orchestrator from the config without starting it (nothing is
    # loaded) and report what it sees.
    orch = Orchestrator(load_config(args.config))
    report = status_report(orch)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_status(report))
    return EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    """``cache list`` / ``cache clear [--model NAME]``: the packed checkpoint cache."""
    import json

    from orchestrator.backends.diskcache import DiskCache

    config = load_config(args.config)
    if config.cache is None:
        raise OrchestratorError(
            f"{config.source} has no cache: add `cache: {{path: default, budget_gb: 50}}` to turn the "
            "packed checkpoint cache on"
        )
    cache = DiskCache(Path(config.cache.path), config.cache.budget_bytes)
    if args.model is not None and args.model not in config.models:
        raise OrchestratorError(
            f"--model {args.model!r} names no configured model; use one of: {', '.join(config.models)}"
        )
    if args.action == "clear":
        removed = cache.clear(args.model)
        print(f"removed {len(removed)} entries from {cache.root}")
        return EXIT_OK
    entries = [e for e in cache.entries() if args.model is None or e.model == args.model]
    if args.json:
        from orchestrator.status import cache_report

        report = cache_report(config)
        assert report is not None
        report["entries"] = [x for x in report["entries"] if args.model is None or x["model"] == args.model]
        print(json.dumps(report, indent=2))
        return EXIT_OK
    used = sum(e.data_bytes for e in cache.entries())
    print(f"{cache.root}: {len(entries)} entries, {format_gib(used)} of {format_gib(cache.budget_bytes)}")
    rows = [("model", "size", "last used", "state", "entry")]
    for e in entries:
        rows.append(
            (
                e.model,
                format_gib(e.data_bytes),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used_s)),
                "fresh" if e.fresh else "stale (rebuilt at the next load)",
                e.key,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    import anyio

    from orchestrator.daemon import event_loop_options, resolve_token, serve

    config = load_config(args.config)
    host = args.host or config.daemon.host
    resolve_token(config, host, args.token)  # refuse a non-loopback bind without a token first

    if args.ray:
        return _serve_cluster(args, config, host)

    def ready(url: str) -> None:
        print(f"vram-orchestrator serving {config.source} on {url} (pid {os.getpid()})", flush=True)

    report = anyio.run(
        lambda: serve(config, host=host, port=args.port, token=args.token, on_ready=ready),
        backend_options=event_loop_options(),
    )
    print(f"vram-orchestrator: {report.line()}", flush=True)
    return EXIT_OK


def _serve_cluster(args: argparse.Namespace, config: Config, host: str) -> int:
    """``serve --ray ADDRESS``: the gateway in front of a cluster (orchestrator.cluster)."""
    import anyio

    try:
        from orchestrator.cluster.gateway import serve_cluster
    except ImportError as exc:
        raise OrchestratorError(f"--ray needs Ray: pip install 'vram-orchestrator[ray]' ({exc})") from None
    if not args.config:
        raise OrchestratorError(
            "--ray needs --config: the path of each machine's config file (every machine reads its own)"
        )
    path = str(Path(args.config).expanduser().resolve())

    def ready(url: str) -> None:
        print(
            f"vram-orchestrator serving the Ray cluster at {args.ray} on {url} (pid {os.getpid()})",
            flush=True,
        )

    served = anyio.run(
        lambda: serve_cluster(
            config,
            address=args.ray,
            config_path=path,
            host=host,
            port=args.port,
            token=args.token,
            on_ready=ready,
        )
    )
    print(f"vram-orchestrator: stopped; served machines {', '.join(served)}", flush=True)
    return EXIT_OK


def cmd_timeline(args: argparse.Namespace) -> int:
    from orchestrator.chart import render_timeline
    from orchestrator.timeline import by_card, read_run, reconstruct

    if args.url:
        from orchestrator.client import fetch_events, fetch_status
        from orchestrator.timeline import event_from_dict

        if args.events:
            raise OrchestratorError("give an events file or --url, not both")
        events = [event_from_dict(e) for e in fetch_events(args.url, args.token)]
        budget: int | None = int(fetch_status(args.url, args.token)["budget_bytes"])
        time_scale = 1.0  # a daemon's events are in real seconds
        events_path = Path("timeline.png")  # the default output goes to the current folder
    elif args.events:
        events_path = Path(args.events)
        events, budget, time_scale = read_run(events_path)
    else:
        raise OrchestratorError("give the events file (the demo's events.jsonl) or --url of a running daemon")
    if args.budget_gb is not None:
        if args.budget_gb <= 0:
            raise OrchestratorError(f"--budget-gb must be positive, got {args.budget_gb:g}")
        budget = gib_to_bytes(args.budget_gb)
    if args.time_scale is not None:
        if args.time_scale <= 0:
            raise OrchestratorError(f"--time-scale must be positive, got {args.time_scale:g}")
        time_scale = args.time_scale
    out = Path(args.output) if args.output else events_path.with_name("timeline.png")
    render_timeline(events, out, budget_bytes=budget, time_scale=time_scale)
    cards = by_card(events)
    if len(cards) > 1:
        timelines = [(gpu, reconstruct(evs)) for gpu, evs in cards]
        n = sum(1 for _, tl in timelines for s in tl.switches if s.model is not None)
        models = {m for _, tl in timelines for m in tl.models}
        peaks = ", ".join(f"cuda:{gpu} {format_gib(tl.peak_bytes)}" for gpu, tl in timelines)
        print(
            f"wrote {out}: {len(events)} events on {len(cards)} cards (a panel each), {n} switches, "
            f"{len(models)} models, peak committed {peaks}; each card's budget from its events"
        )
        return EXIT_OK
    tl = reconstruct(events)
    n = sum(1 for s in tl.switches if s.model is not None)
    budget_txt = (
        f"budget {format_gib(budget)}"
        if budget is not None
        else "no budget line (the events carry no budget; give --budget-gb)"
    )
    print(
        f"wrote {out}: {len(events)} events, {n} switches, {len(tl.models)} models, "
        f"peak {format_gib(tl.peak_bytes)} committed; {budget_txt}"
    )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vram-orchestrator",
        description="Share one GPU between several heavy models: switch them safely and fast.",
        epilog="--debug goes before or after the command: vram-orchestrator plan --debug",
    )
    debug_help = "show tracebacks and debug logs"
    p.add_argument("--debug", action="store_true", help=debug_help)
    # Each command takes --debug too; SUPPRESS keeps a --debug given before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    d = command("demo", "run the Model Management Module's agent workflow (Example 1) for several agents")
    d.add_argument("--config", metavar="FILE", help=DEFAULT_CONFIG_HELP)
    d.add_argument(
        "--agents",
        type=positive_int,
        default=3,
        metavar="N",
        help="agents running the workflow at once (default 3)",
    )
    d.add_argument("--out", metavar="DIR", help="output folder (default: ./vram-demo-<time>)")
    d.add_argument(
        "--time-scale",
        type=positive_float,
        metavar="S",
        help="simulated latency multiplier (default: the config's simulation.time_scale; the "
        "embedded config's 0.05 runs 20x faster than real)",
    )
    d.add_argument("--seed", type=int, default=0, help="the agents' scenes and start times (default 0)")
    d.add_argument(
        "--device",
        choices=("auto", "simulated"),
        default="auto",
        help="auto: the real GPU when there is one with room for the budget (the embedded config "
        "only), else the simulated device",
    )
    d.add_argument(
        "--gpus",
        type=positive_int,
        metavar="N",
        help="run on N simulated cards, each the size of the config's card (its models may use "
        "any card): a table per card in the summary and a chart panel per card",
    )
    d.add_argument(
        "--tiny-models",
        default="auto",
        metavar="auto|off|DIR",
        help="run the real tiny SDXL and TTS models on the CPU in place of the simulated ones "
        "(auto: when torch and diffusers are installed, built in the cache folder; DIR: built there). "
        "For your own models, give --config a file whose models have diffusers/tts backends",
    )
    d.set_defaults(func=cmd_demo)

    pl = command("plan", "validate a config and print its budget table")
    pl.add_argument("--config", metavar="FILE", help=DEFAULT_CONFIG_HELP)
    pl.set_defaults(func=cmd_plan)

    st = command("status", "show the device, the budget, the state and every model's tier")
    st.add_argument("--config", metavar="FILE", help=DEFAULT_CONFIG_HELP)
    st.add_argument("--json", action="store_true", help="print one JSON object (bytes as integers)")
    st.add_argument(
        "--url", help="ask a running daemon (vram-orchestrator serve), e.g. http://127.0.0.1:8470"
    )
    st.add_argument("--token", help="the daemon's bearer token (default: $VRAM_ORCHESTRATOR_TOKEN)")
    st.set_defaults(func=cmd_status)

    ca = command("cache", "list or clear the packed checkpoint cache (the config's cache: section)")
    ca.add_argument("action", choices=("list", "clear"), help="list its entries, or remove them")
    ca.add_argument("--config", metavar="FILE", help=DEFAULT_CONFIG_HELP)
    ca.add_argument("--model", metavar="NAME", help="only this model's entries")
    ca.add_argument("--json", action="store_true", help="list as one JSON object (bytes as integers)")
    ca.set_defaults(func=cmd_cache)

    sv = command(
        "serve", "run the daemon: one owner for the GPU across processes, an OpenAI-compatible gateway"
    )
    sv.add_argument("--config", metavar="FILE", help=DEFAULT_CONFIG_HELP)
    sv.add_argument("--host", help="address to bind (default: daemon.host, 127.0.0.1)")
    sv.add_argument("--port", type=int, help="port (default: daemon.port, 8470; 0 picks a free one)")
    sv.add_argument(
        "--token",
        help="bearer token clients must send (default: $VRAM_ORCHESTRATOR_TOKEN, then daemon.token); "
        "required to bind a non-loopback address",
    )
    sv.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="serve the completions of a Ray cluster of orchestrators (one per machine: the nodes "
        "started with a vram-machine:<name> resource, each reading --config's path on its own "
        "machine); ADDRESS as for ray.init, e.g. auto or HEAD:6379 (the ray extra)",
    )
    sv.set_defaults(func=cmd_serve)

    t = command("timeline", "draw the VRAM timeline chart of an event log (PNG)")
    t.add_argument(
        "events", metavar="EVENTS.jsonl", nargs="?", help="the event log (the demo's events.jsonl)"
    )
    t.add_argument("--url", help="draw a running daemon's recent events instead (its /v1/events history)")
    t.add_argument("--token", help="the daemon's bearer token (default: $VRAM_ORCHESTRATOR_TOKEN)")
    t.add_argument("-o", "--output", help="the PNG to write (default: timeline.png beside the events)")
    t.add_argument(
        "--budget-gb",
        type=float,
        help="draw the budget line at this many GiB (default: summary.json's beside the events, "
        "else the budget the events carry)",
    )
    t.add_argument(
        "--time-scale",
        type=float,
        help="the run's simulated time scale, to draw real-speed seconds (default: summary.json's, or 1)",
    )
    t.set_defaults(func=cmd_timeline)

    c = command("check", "property-test a config on the simulated device")
    c.add_argument("--config", metavar="FILE", help=DEFAULT_CONFIG_HELP)
    c.add_argument(
        "--examples",
        type=positive_int,
        default=100,
        metavar="N",
        help="random sequences to try (default 100)",
    )
    c.add_argument(
        "--steps", type=positive_int, default=30, metavar="N", help="steps per sequence (default 30)"
    )
    c.add_argument(
        "--footprint-factor",
        type=positive_float,
        default=1.0,
        metavar="F",
        help="true footprint / estimate on the simulated device, greater than 0 (default 1.0)",
    )
    c.set_defaults(func=cmd_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (OrchestratorError, OSError) as exc:
        if args.debug:
            raise
        print(f"vram-orchestrator {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
