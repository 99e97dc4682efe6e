"""Switching SDXL between the GPU, the pinned host tier and disk, through the real backend.

One SDXL pipeline goes through ``DiffusersBackend`` (the orchestrator's in-process backend,
``offload: true``): a cold load from disk, offloads to the pinned host tier and restores
(``--cycles``, 3 by default), then a drop (unload). Beside it, in the same run, the copy it is
measured against: the bare link, one host buffer of the same size copied to one device buffer
(best of ``--repeats``), and for comparison per-tensor copies of the same model's weights and
(on a GPU) a copy from pageable memory. A UNet forward on one small latent before the first
offload and after every restore must give bitwise identical outputs.

- On a GPU (the default when torch sees CUDA): the real SDXL architecture (constructor
  arguments in ``sdxl-architecture.json``: UNet 2.57 B params, both CLIP text encoders, VAE,
  6.46 GiB in fp16) with random weights, saved as a diffusers pipeline under the work dir, on
  the real device (NVML). Goals, printed next to the figures: restore at 95% of the measured
  pinned link or better (one packed copy reached 99% on an H200, PCIe Gen5 x16), every offload
  under 50 ms.
- ``--cpu`` (the default without CUDA): the tiny SDXL of ``orchestrator.tiny_models`` on the
  simulated device; the backend runs it on the CPU and its configured size stands in on the
  simulated device, the "link" is a host-to-host copy of the same number of bytes. CI runs it.

Run: ``python -m benchmarks.switch_gpu [--cpu] [--json FILE]``; exit status 1 when a check fails
(outputs differ after a restore, memory not released by an offload or the drop, a count wrong).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anyio

HERE = Path(__file__).resolve().parent
ARCHITECTURE = HERE / "sdxl-architecture.json"  # SDXL base 1.0's constructor arguments

GIB = 1024**3
RESTORE_GOAL = 0.95  # restore bandwidth / bare link bandwidth, measured in the same run
OFFLOAD_GOAL_S = 0.050
SIM_TOTAL_BYTES = 16 * GIB  # the simulated card of the CPU variant
SDXL_ESTIMATE_BYTES = int(10.5 * GIB)  # the module's SDXL base: the stand-in's size
RELEASE_TOLERANCE = 0.99  # an offload or drop must free at least this share of the packed bytes
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
COMPLETE = ".complete"


def default_architecture() -> Path:
    return ARCHITECTURE


def gib(n: float) -> str:
    """Bytes in GiB, or in MiB under a tenth of a GiB (the tiny model's few MiB)."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 10 or n == 0 else f"{n / 2**20:.1f} MiB"


def signed_gib(n: float) -> str:
    return ("+" if n > 0 else "") + gib(n)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


# -- the model -----------------------------------------------------------------------------------


def _construct(torch: Any, entry: dict[str, Any], token_ids: dict[str, int]) -> Any:
    """One component from its ``{"class", "kwargs"[, "config"]}`` entry, random weights."""

    def resolve(dotted: str) -> Any:
        module, _, name = dotted.rpartition(".")
        return getattr(importlib.import_module(module), name)

    cls = resolve(entry["class"])
    kwargs = dict(entry["kwargs"])
    if "config" in entry:  # a transformers model: kwargs build its config
        kwargs.update(token_ids)  # the text encoders agree with the tokenizer on special ids
        return cls(resolve(entry["config"])(**kwargs))
    return cls(**kwargs)


def build_sdxl_pipeline(torch: Any, architecture: Path, out: Path, *, build_on: str, dtype: Any) -> Path:
    """Write an SDXL pipeline with the architecture's shapes and random weights to ``out``.

    Each component is built in fp32 on ``build_on`` (the GPU: random init of 3.5 B parameters
    takes a minute and more on a CPU, a second on a GPU), cast to ``dtype``, moved to the CPU
    and saved. The tokenizer is tiny_models' character-level CLIP vocabulary: the text
    encoders keep the architecture's vocabulary size (their embedding tables are real-sized),
    the tokenizer only has to load.
    """
    if (out / COMPLETE).exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    from orchestrator.tiny_models import _clip_tokenizer_files, _imports_for_images, sdxl_scheduler

    _, transformers, diffusers = _imports_for_images()
    arch = json.loads(architecture.read_text())
    tok_dir = out.parent / f".{out.name}-tokenizer"
    vocab = _clip_tokenizer_files(tok_dir)
    tokenizer = transformers.CLIPTokenizer(
        str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77
    )
    token_ids = {
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    torch.manual_seed(0)
    parts: dict[str, Any] = {}
    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []"
    for name in COMPONENTS:
        try:
            with torch.device(build_on):
                module = _construct(torch, arch[name], token_ids)
        except Exception as exc:  # a library that will not build under a device context: the CPU
            if build_on == "cpu":
                raise
            print(f"  building {name} on {build_on} failed ({exc!r}); building it on the CPU (slower)")
            gc.collect()
            torch.cuda.empty_cache()
            module = _construct(torch, arch[name], token_ids)
        parts[name] = module.to(dtype=dtype).to("cpu").eval()
        del module
        if build_on != "cpu":
            torch.cuda.empty_cache()
    pipe = diffusers.StableDiffusionXLPipeline(
        **parts,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=sdxl_scheduler(diffusers),
    )
    pipe.save_pretrained(out)
    shutil.rmtree(tok_dir, ignore_errors=True)
    del pipe, parts
    gc.collect()
    (out / COMPLETE).write_text("")
    return out


def drop_page_cache(folder: Path) -> int:
    """Ask the kernel to forget the folder's cached pages (a cold read); returns bytes dropped.

    ``fsync`` then ``POSIX_FADV_DONTNEED``: clean pages go without root. Best effort: where the
    call is missing (or the folder lives in tmpfs, which is memory anyway) nothing happens.
    """
    if not hasattr(os, "posix_fadvise"):
        return 0
    dropped = 0
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                dropped += path.stat().st_size
            finally:
                os.close(fd)
    return dropped


# -- measurements --------------------------------------------------------------------------------


class Probe:
    """Readings of the device (NVML, or the simulated device) and of torch's allocator."""

    def __init__(self, device: Any, torch: Any, cuda_index: int | None) -> None:
        self.device, self.torch, self.cuda_index = device, torch, cuda_index

    def sync(self) -> None:
        if self.cuda_index is not None:
            self.torch.cuda.synchronize(self.cuda_index)

    def used(self) -> int:
        return int(self.device.used_bytes())

    def reserved(self) -> int | None:
        if self.cuda_index is None:
            return None
        return int(self.torch.cuda.memory_reserved(self.cuda_index))

    def host_pinned(self) -> dict[str, int] | None:
        """torch's caching host (pinned) allocator: what it holds from the driver."""
        stats = getattr(self.torch.cuda, "host_memory_stats", None)
        if self.cuda_index is None or stats is None:
            return None
        try:
            s = stats()
        except Exception:  # pragma: no cover - an older torch
            return None
        # allocated: pinned blocks the allocator owns (in use + cached), each rounded up to a power
        # of two; active: the blocks handed out now
        keys = ("allocated_bytes.current", "active_bytes.current", "allocated_bytes.peak")
        return {k: int(s[k]) for k in keys if k in s}


def best_of(fn: Callable[[], float], repeats: int) -> list[float]:
    return [fn() for _ in range(repeats)]


def measure_one_copy(torch: Any, nbytes: int, target: str, repeats: int, *, pinned: bool) -> dict[str, Any]:
    """One host buffer of ``nbytes`` copied to one buffer on ``target``: the bare link."""
    t0 = time.perf_counter()
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    host.fill_(1)  # touch every page (pageable memory is only mapped on first touch)
    alloc_s = time.perf_counter() - t0
    cuda = target.startswith("cuda")
    dev: Any = None

    def once() -> float:
        # A fresh destination each time, allocated outside the timing, as a restore does (on the
        # CPU its pages are first touched by the copy; on a GPU the caching allocator reuses it).
        nonlocal dev
        dev = None
        dev = torch.empty(nbytes, dtype=torch.uint8, device=target)
        if cuda:
            torch.cuda.synchronize(target)
        t = time.perf_counter()
        dev.copy_(host, non_blocking=pinned)
        if cuda:
            torch.cuda.synchronize(target)
        return time.perf_counter() - t

    runs = best_of(once, repeats)
    ok = bool(dev[:: max(1, nbytes // 4096)].eq(1).all())  # the copy really happened
    host = dev = None  # freed before the next measurement
    if cuda:
        torch.cuda.empty_cache()
    best = min(runs)
    return {
        "bytes": nbytes,
        "pinned": pinned,
        "alloc_s": alloc_s,
        "runs_s": runs,
        "best_s": best,
        "best_gbps": gbps(nbytes, best),
        "verified": ok,
    }


def distinct_tensors(modules: Sequence[Any]) -> list[Any]:
    seen: set[int] = set()
    out = []
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t.detach())
    return out


def measure_per_tensor(torch: Any, modules: Sequence[Any], target: str, repeats: int) -> dict[str, Any]:
    """The model's tensors (host views, pinned where the host copy is) copied one by one."""
    srcs = distinct_tensors(modules)
    nbytes = sum(t.numel() * t.element_size() for t in srcs)
    dsts = [torch.empty_like(s, device=target) for s in srcs]
    cuda = target.startswith("cuda")
    pinned = all(s.is_pinned() for s in srcs) if cuda else False

    def once() -> float:
        if cuda:
            torch.cuda.synchronize(target)
        t = time.perf_counter()
        for d, s in zip(dsts, srcs, strict=True):
            d.copy_(s, non_blocking=True)
        if cuda:
            torch.cuda.synchronize(target)
        return time.perf_counter() - t

    runs = best_of(once, repeats)
    dsts = []
    if cuda:
        torch.cuda.empty_cache()
    best = min(runs)
    return {
        "tensors": len(srcs),
        "bytes": nbytes,
        "pinned": pinned,
        "runs_s": runs,
        "best_s": best,
        "best_gbps": gbps(nbytes, best),
    }


def unet_forward(torch: Any, unet: Any, target: str, latent: int) -> Any:
    """The UNet on one seeded latent (SDXL's text-time conditioning); the output on the CPU."""
    cfg = unet.config
    dtype = unet.dtype
    g = torch.Generator().manual_seed(1234)
    cross = cfg.cross_attention_dim
    cross = int(cross[0] if isinstance(cross, list | tuple) else cross)
    text_dim = int(cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim)
    px = latent * 8
    inputs = {
        "sample": torch.randn(1, cfg.in_channels, latent, latent, generator=g),
        "encoder_hidden_states": torch.randn(1, 77, cross, generator=g),
        "text_embeds": torch.randn(1, text_dim, generator=g),
    }
    x = {k: v.to(target, dtype) for k, v in inputs.items()}
    time_ids = torch.tensor([[px, px, 0, 0, px, px]], dtype=dtype, device=target)
    t = torch.tensor([500], device=target)
    with torch.inference_mode():
        out = unet(
            x["sample"],
            t,
            encoder_hidden_states=x["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": time_ids},
            return_dict=False,
        )[0]
    return out.detach().to("cpu").clone()


def compare(torch: Any, ref: Any, out: Any) -> dict[str, Any]:
    same_bits = ref.shape == out.shape and torch.equal(
        ref.contiguous().view(torch.uint8), out.contiguous().view(torch.uint8)
    )
    a, b = ref.float(), out.float()
    finite = torch.isfinite(a) & torch.isfinite(b)
    diff = float((a[finite] - b[finite]).abs().max()) if bool(finite.any()) else float("nan")
    return {
        "identical": bool(same_bits),
        "max_abs_diff": diff,
        "finite_fraction": float(finite.float().mean()),
    }


# -- the run -------------------------------------------------------------------------------------


class Run:
    """The phases, their readings, and the figures that go to the JSON file."""

    def __init__(self, torch: Any, backend: Any, probe: Probe, args: argparse.Namespace) -> None:
        self.torch, self.backend, self.probe, self.args = torch, backend, probe, args
        self.phases: list[dict[str, Any]] = []
        self.forward: list[dict[str, Any]] = []
        self.reference: Any = None

    async def phase(self, name: str, action: Any, seconds_key: str, copy_key: str | None = None) -> Any:
        probe = self.probe
        before = probe.used()
        t0 = time.perf_counter()
        result = await action()
        wall = time.perf_counter() - t0
        probe.sync()
        after = probe.used()
        rec: dict[str, Any] = {
            "phase": name,
            "seconds": self.backend.timings[seconds_key],
            "wall_s": wall,
            "used_before": before,
            "used_after": after,
            "released_bytes": before - after,
            "reserved_after": probe.reserved(),
        }
        if copy_key is not None:
            rec["copy_s"] = self.backend.timings[copy_key]
            rec["gbps"] = gbps(self.backend.host_copy_bytes, rec["copy_s"])
        self.phases.append(rec)
        return result

    def check_forward(self, after: str, pipe: Any) -> None:
        t0 = time.perf_counter()
        out = unet_forward(self.torch, pipe.unet, self.backend.target, self.args.latent)
        seconds = time.perf_counter() - t0
        if self.reference is None:
            self.reference = out
            self.forward.append({"after": after, "seconds": seconds, "shape": list(out.shape)})
            return
        self.forward.append({"after": after, "seconds": seconds, **compare(self.torch, self.reference, out)})


async def run_phases(run: Run) -> dict[str, Any]:
    from states.ledger import Tier

    args, torch, backend, probe = run.args, run.torch, run.backend, run.probe
    target = backend.target
    baseline = probe.used()

    pipe = await run.phase("load", backend.load, "load_s", "copy_s")
    packed = backend.host_copy_bytes
    host_pinned_after_load = probe.host_pinned()
    components = {
        name: sum(t.numel() * t.element_size() for t in distinct_tensors([getattr(pipe, name)]))
        for name in COMPONENTS
        if getattr(pipe, name, None) is not None
    }
    run.check_forward("load", pipe)
    probe.sync()
    used_resident = probe.used()

    await run.phase("offload 1", lambda: backend.offload(Tier.HOST), "offload_s")

    # The link and the comparisons, with the model on the host tier (the device is free).
    link = measure_one_copy(torch, packed, target, args.repeats, pinned=probe.cuda_index is not None)
    pageable = None
    if probe.cuda_index is not None:
        pageable = measure_one_copy(torch, packed, target, min(2, args.repeats), pinned=False)
    weights = [getattr(pipe, n) for n in COMPONENTS if getattr(pipe, n, None) is not None]
    per_tensor = measure_per_tensor(torch, weights, target, args.repeats)
    del weights
    probe.sync()
    used_after_link = probe.used()

    for i in range(1, args.cycles + 1):
        if i > 1:
            await run.phase(f"offload {i}", lambda: backend.offload(Tier.HOST), "offload_s")
        pipe = await run.phase(f"restore {i}", backend.restore, "restore_s", "restore_copy_s")
        run.check_forward(f"restore {i}", pipe)

    pipe = None  # the benchmark's own reference goes before the drop, or it would keep the model
    gc.collect()
    await run.phase("drop", backend.unload, "unload_s")
    host_pinned_after_drop = probe.host_pinned()

    return {
        "baseline_used": baseline,
        "used_resident_after_forward": used_resident,
        "used_after_link": used_after_link,
        "packed_bytes": packed,
        "components_bytes": components,
        "tensors": per_tensor["tensors"],
        "phases": run.phases,
        "forward": run.forward,
        "link": link,
        "pageable": pageable,
        "per_tensor": per_tensor,
        "host_pinned_after_load": host_pinned_after_load,
        "host_pinned_after_drop": host_pinned_after_drop,
        "backend": {
            "loads": backend.loads,
            "restores": backend.restores,
            "offloads": backend.offloads,
            "timings": dict(backend.timings),
            "stand_in_bytes": backend.stand_in_bytes if backend.stand_in is not None else None,
        },
    }


def summarize(fig: dict[str, Any], simulated: bool) -> dict[str, Any]:
    """Best/each restore and offload, the fraction of the link, and the checks."""
    packed = fig["packed_bytes"]
    phases = fig["phases"]
    restores = [p for p in phases if p["phase"].startswith("restore")]
    offloads = [p for p in phases if p["phase"].startswith("offload")]
    drop = next(p for p in phases if p["phase"] == "drop")
    link_gbps = fig["link"]["best_gbps"]
    for p in restores:
        p["of_link"] = p["gbps"] / link_gbps
    best_restore = min(restores, key=lambda p: p["copy_s"])
    # what must leave the device on an offload: the stand-in (simulated) or the packed weights
    must_free = fig["backend"]["stand_in_bytes"] if simulated else packed
    checks = {
        "every_phase_timed": all(p["seconds"] > 0 for p in phases),
        "forward_identical": all(f.get("identical", True) for f in fig["forward"])
        and len(fig["forward"]) > 1,
        "offload_released": all(p["released_bytes"] >= RELEASE_TOLERANCE * must_free for p in offloads),
        "drop_released": drop["released_bytes"] >= RELEASE_TOLERANCE * must_free,
        "counts": fig["backend"]["loads"] == 1 and fig["backend"]["restores"] == len(restores),
        "link_verified": fig["link"]["verified"],
    }
    if simulated:
        checks["stand_in_zero_after_offload"] = all(p["used_after"] == fig["baseline_used"] for p in offloads)
    return {
        "restore_best_s": best_restore["copy_s"],
        "restore_best_total_s": min(p["seconds"] for p in restores),
        "restore_best_gbps": best_restore["gbps"],
        "restore_best_of_link": best_restore["of_link"],
        "restore_each_copy_s": [p["copy_s"] for p in restores],
        "restore_each_total_s": [p["seconds"] for p in restores],
        "offload_best_s": min(p["seconds"] for p in offloads),
        "offload_worst_s": max(p["seconds"] for p in offloads),
        "offload_each_s": [p["seconds"] for p in offloads],
        "goals": {
            "restore_of_link_min": RESTORE_GOAL,
            "offload_max_s": OFFLOAD_GOAL_S,
            "restore_met": best_restore["of_link"] >= RESTORE_GOAL,
            "offload_met": max(p["seconds"] for p in offloads) < OFFLOAD_GOAL_S,
        },
        "checks": checks,
        "ok": all(checks.values()),
    }


# -- output --------------------------------------------------------------------------------------


def goal_mark(met: bool, gpu: bool = True) -> str:
    """The goals are about a GPU's link; on the CPU variant they are shown, not judged."""
    if gpu:
        return "met" if met else "MISSED"
    return "(a GPU goal: met here)" if met else "(a GPU goal: not met here)"


def report(fig: dict[str, Any], summary: dict[str, Any], meta: dict[str, Any]) -> None:
    packed = fig["packed_bytes"]
    comps = ", ".join(f"{n} {gib(b)}" for n, b in fig["components_bytes"].items())
    print(
        f"model: {meta['model']} ({meta['dtype']}), {fig['tensors']} tensors, packed {gib(packed)} ({comps})"
    )
    print(
        f"device: {meta['device_name']} ({meta['device_source']}); backend target {meta['target']}; "
        f"cold load from {meta['model_dir']} (page cache dropped: {gib(meta['page_cache_dropped'])})"
    )
    where = "pinned host -> device" if meta["gpu"] else "host -> host (the CPU variant's link)"
    link = fig["link"]
    print(f"\nlink, same run, {gib(packed)} each:")

    def link_line(name: str, m: dict[str, Any], extra: str = "") -> None:
        runs = " ".join(f"{s:.4f}" for s in m["runs_s"])
        print(f"  {name:<44}{m['best_s']:>9.4f} s {m['best_gbps']:>7.1f} GB/s  (each {runs}){extra}")

    link_line(f"{where}, one copy", link, f"; alloc {link['alloc_s']:.2f} s")
    if fig["pageable"] is not None:
        pg = fig["pageable"]
        link_line(
            "pageable host -> device, one copy", pg, f"; {pg['best_gbps'] / link['best_gbps']:.0%} of link"
        )
    pt = fig["per_tensor"]
    link_line(
        f"per-tensor copies ({pt['tensors']}, {'pinned' if pt['pinned'] else 'not pinned'})",
        pt,
        f"; {pt['best_gbps'] / link['best_gbps']:.0%} of link",
    )

    gpu = meta["gpu"]
    used_name = "NVML used" if meta["device_source"] == "nvml" else f"{meta['device_source']} used"
    print(f"\nphases (seconds: the backend's own timing; {used_name} on the device before -> after)")
    head = f"{'phase':<11}{'seconds':>9}{'copy s':>9}{'GB/s':>8}{'of link':>9}  "
    head += f"{'used before':>12}{'used after':>12}{'change':>12}"
    if gpu:
        head += f"{'reserved':>11}"
    print(head + "  goal")
    print("-" * (len(head) + 14))
    for p in fig["phases"]:
        copy = f"{p['copy_s']:>9.4f}{p['gbps']:>8.1f}" if "copy_s" in p else f"{'':>9}{'':>8}"
        of_link = f"{p['of_link']:>9.1%}" if "of_link" in p else f"{'':>9}"
        row = (
            f"{p['phase']:<11}{p['seconds']:>9.4f}{copy}{of_link}  {gib(p['used_before']):>12}"
            f"{gib(p['used_after']):>12}{signed_gib(p['used_after'] - p['used_before']):>12}"
        )
        if gpu:
            row += f"{gib(p['reserved_after'] or 0):>11}"
        goal = ""
        if p["phase"].startswith("offload"):
            goal = f"< {OFFLOAD_GOAL_S * 1e3:.0f} ms {goal_mark(p['seconds'] < OFFLOAD_GOAL_S, gpu)}"
        elif p["phase"].startswith("restore"):
            goal = f">= {RESTORE_GOAL:.0%} of link {goal_mark(p['of_link'] >= RESTORE_GOAL, gpu)}"
        print(f"{row}  {goal}")
    t = fig["backend"]["timings"]
    print(
        f"load: build {t.get('build_s', 0):.2f} s (from_pretrained), pack {t.get('pack_s', 0):.2f} s "
        f"(host buffer{', pinned' if gpu else ''}), copy {t.get('copy_s', 0):.4f} s; "
        f"restore 'seconds' include the device buffer's allocation, 'copy s' is the copy alone"
    )

    s = summary
    g = s["goals"]
    print(
        f"\nrestore: best copy {s['restore_best_s']:.4f} s = {s['restore_best_gbps']:.1f} GB/s = "
        f"{s['restore_best_of_link']:.1%} of the link ({link['best_gbps']:.1f} GB/s); "
        f"goal >= {RESTORE_GOAL:.0%}: {goal_mark(g['restore_met'], gpu)}"
    )
    print(
        "  each copy "
        + " ".join(f"{x:.4f}" for x in s["restore_each_copy_s"])
        + " s; each total "
        + " ".join(f"{x:.4f}" for x in s["restore_each_total_s"])
        + " s"
    )
    print(
        f"offload: best {s['offload_best_s'] * 1e3:.2f} ms, worst {s['offload_worst_s'] * 1e3:.2f} ms "
        f"(each {' '.join(f'{x * 1e3:.2f}' for x in s['offload_each_s'])} ms); "
        f"goal < {OFFLOAD_GOAL_S * 1e3:.0f} ms: {goal_mark(g['offload_met'], gpu)}"
    )
    fwd = fig["forward"]
    checks = [f for f in fwd if "identical" in f]
    print(
        f"forward check: UNet on a {meta['latent']}x{meta['latent']} latent, {len(checks)} restores: "
        + ", ".join(
            f"{f['after']} {'identical' if f['identical'] else 'DIFFERENT'}"
            f" (max diff {f['max_abs_diff']:.3g}, finite {f['finite_fraction']:.0%})"
            for f in checks
        )
        + f"; forward {fwd[0]['seconds']:.3f} s"
    )
    b = fig["backend"]
    print(
        f"backend: loads {b['loads']}, offloads {b['offloads']}, restores {b['restores']}; "
        f"device used at baseline {gib(fig['baseline_used'])}, resident after a forward "
        f"{gib(fig['used_resident_after_forward'])}"
    )
    for when in ("load", "drop"):
        hp = fig[f"host_pinned_after_{when}"]
        if hp is not None:
            print(
                f"torch's pinned host allocator after the {when}: "
                + ", ".join(f"{k} {gib(v)}" for k, v in hp.items())
                + f" (packed {gib(packed)}; blocks are rounded up to a power of two and cached)"
            )
    bad = [k for k, v in s["checks"].items() if not v]
    print("checks: " + ("all passed" if not bad else "FAILED: " + ", ".join(bad)))


# -- main ----------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, torch: Any, work: Path) -> tuple[Path, dict[str, Any]]:
    """The pipeline folder to load (built under ``work``) and what went into it."""
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    if args.model == "tiny":
        from orchestrator.tiny_models import build

        path = build(work / "models", ("tiny-sdxl",))["tiny-sdxl"]
        info["model"] = "tiny-sdxl (orchestrator.tiny_models)"
    else:
        build_on = "cuda:0" if args.gpu else "cpu"
        dtype = getattr(torch, args.dtype if args.dtype != "auto" else ("float16" if args.gpu else "float32"))
        path = build_sdxl_pipeline(torch, args.architecture, work / "sdxl", build_on=build_on, dtype=dtype)
        info["model"] = f"SDXL architecture from {args.architecture}, random weights"
        if args.gpu:
            gc.collect()
            torch.cuda.empty_cache()
    info["build_s"] = time.perf_counter() - t0
    info["page_cache_dropped"] = 0 if args.warm_cache else drop_page_cache(path)
    return path, info


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.switch_gpu", description=__doc__.split("\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--cpu", action="store_true", help="tiny SDXL on the simulated device (default without CUDA)"
    )
    where.add_argument("--gpu", action="store_true", help="the real GPU (default when torch sees CUDA)")
    p.add_argument(
        "--model", choices=("sdxl", "tiny"), help="sdxl: the real architecture (GPU default); tiny"
    )
    p.add_argument("--architecture", type=Path, default=None, help="constructor arguments (JSON) of SDXL")
    p.add_argument("--dtype", default=None, help="float16 (GPU default), float32, bfloat16, auto")
    p.add_argument(
        "--work-dir", type=Path, help="where the pipeline is written (default: a temp dir, removed)"
    )
    p.add_argument("--cycles", type=int, default=3, help="offload/restore cycles (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="timed copies per link measurement (best of)")
    p.add_argument("--latent", type=int, default=None, help="latent side of the UNet check (64 / tiny 16)")
    p.add_argument("--warm-cache", action="store_true", help="do not drop the page cache before the load")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    args = p.parse_args(argv)
    if args.cycles < 1 or args.repeats < 1:
        p.error("--cycles and --repeats must be at least 1")

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic GEMMs (the check)
    from orchestrator.backends.inprocess_options import quiet_imports

    with quiet_imports():
        try:
            import diffusers  # noqa: F401
            import torch
        except ImportError as exc:
            print(f"this benchmark needs torch, transformers and diffusers ({exc})", file=sys.stderr)
            return 2
    cuda = bool(torch.cuda.is_available())
    if args.gpu and not cuda:
        p.error("--gpu: torch sees no CUDA device")
    args.gpu = cuda and not args.cpu
    args.model = args.model or ("sdxl" if args.gpu else "tiny")
    args.dtype = args.dtype or ("float16" if args.gpu else "auto")
    args.latent = args.latent or (64 if args.model == "sdxl" else 16)
    args.architecture = (args.architecture or default_architecture()).resolve()
    if args.model == "sdxl" and not args.architecture.exists():
        p.error(f"--architecture: {args.architecture} does not exist")

    from orchestrator.backends.diffusers import DiffusersBackend, DiffusersOptions
    from orchestrator.config import ModelSpec
    from orchestrator.device import SimulatedDevice, open_device

    if args.gpu:
        torch.cuda.init()  # the context belongs to the baseline
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        device = open_device("auto", 0, total_bytes=SIM_TOTAL_BYTES)
        if isinstance(device, SimulatedDevice):
            print("neither NVML nor torch could open the GPU", file=sys.stderr)
            return 2
    else:
        device = open_device("simulated", total_bytes=SIM_TOTAL_BYTES, name="simulated 16 GiB GPU")

    keep = args.work_dir is not None
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="switch-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    variant = "gpu" if args.gpu else "cpu"
    print(
        f"switch benchmark ({variant}): python {platform.python_version()}, torch {torch.__version__}, "
        f"diffusers {version('diffusers')}, transformers {version('transformers')}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs"
    )
    try:
        path, built = prepare(args, torch, work)
        print(f"pipeline written in {built['build_s']:.1f} s: {path}")
        options = DiffusersOptions.parse({"path": str(path), "pipeline": "sdxl", "dtype": args.dtype})
        spec = ModelSpec(
            name="sdxl-base",
            kind="sdxl",
            vram_bytes=SDXL_ESTIMATE_BYTES,
            backend="diffusers",
            options=options,
            offload=True,
        )
        backend = DiffusersBackend(spec, device, device_index=0)
        run = Run(torch, backend, Probe(device, torch, 0 if args.gpu else None), args)
        try:
            fig = anyio.run(run_phases, run)
        except BaseException as exc:
            if args.json is not None:  # what was measured before the failure, for the record
                partial = {
                    "variant": variant,
                    "error": repr(exc),
                    "phases": run.phases,
                    "forward": run.forward,
                }
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(partial, indent=2) + "\n")
                print(f"failed ({exc!r}); the phases measured so far are in {args.json}", file=sys.stderr)
            raise
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(Exception):
            device.close()  # type: ignore[attr-defined]

    summary = summarize(fig, simulated=not args.gpu)
    meta = {
        "variant": variant,
        "gpu": args.gpu,
        "model": built["model"],
        "model_dir": str(path),
        "dtype": args.dtype,
        "device_name": device.name,
        "device_source": device.source,
        "target": backend.target,
        "latent": args.latent,
        "page_cache_dropped": built["page_cache_dropped"],
        "build_s": built["build_s"],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "cpus": os.cpu_count(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    report(fig, summary, meta)
    wall = time.perf_counter() - t_start
    print(f"\nwall time {wall:.1f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**meta, **fig, "summary": summary, "wall_s": wall}, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
