"""The diffusers and TTS backends through the orchestrator, with the real tiny models on the
CPU standing in for SDXL and TTS on the simulated 16 GiB card."""

from __future__ import annotations

import gc
import io
import wave
import weakref
from pathlib import Path

import anyio
import pytest

from orchestrator.backends.diffusers import DiffusersBackend
from orchestrator.backends.tts import Speaker, TtsBackend
from orchestrator.config import parse_config
from orchestrator.errors import BackendOutOfMemory, ConfigError, LeaseEnded, LoadFailed
from orchestrator.media import MediaUnsupported, generate_image, synthesize_speech
from orchestrator.runtime import Orchestrator
from states.ledger import Tier
from states.units import gib_to_bytes
from tests.inprocess.conftest import config_text
from tests.orchestrator.conftest import wait_until

pytestmark = pytest.mark.anyio

PIL = pytest.importorskip("PIL.Image")


def orch_for(tiny: dict[str, Path], **kw: object) -> Orchestrator:
    return Orchestrator(parse_config(config_text(tiny, **kw)))  # type: ignore[arg-type]


def tiers(orch: Orchestrator) -> dict[str, Tier]:
    return {r.model: r.tier for r in orch.ledger().residents}


def png_size(data: bytes) -> tuple[int, int]:
    img = PIL.open(io.BytesIO(data))
    img.load()
    assert img.format == "PNG"
    return img.size


async def test_sdxl_draws_offloads_to_host_and_restores_with_one_copy(tiny: dict[str, Path]) -> None:
    async with orch_for(tiny) as orch:
        async with orch.acquire("sdxl") as lease:
            first = await generate_image(lease.handle, "a fox in the snow", seed=3)
            assert type(lease.handle).__name__ == "StableDiffusionXLPipeline"
        assert png_size(first) == (64, 64)
        backend = orch.backend("sdxl-base")
        assert isinstance(backend, DiffusersBackend)
        # the stand-in holds the configured size on the simulated card
        assert backend.measured_bytes() == gib_to_bytes(10.5)

        async with orch.acquire("llm"):  # the LLM pushes SDXL to the pinned (host) tier
            assert tiers(orch)["sdxl-base"] is Tier.HOST
            assert backend.tier is Tier.HOST and backend.measured_bytes() == 0
            assert backend.host_copy_bytes > 0
        async with orch.acquire("sdxl") as lease:
            again = await generate_image(lease.handle, "a fox in the snow", seed=3)
        assert (backend.loads, backend.restores, backend.offloads) == (1, 1, 1)
        assert again == first  # the same weights came back: the same image, byte for byte
        assert backend._packed is not None and backend._packed.shares_one_buffer()
        assert {"pack_s", "copy_s", "offload_s", "restore_s"} <= set(backend.timings)


async def test_lora_and_controlnet_variants_are_models_of_their_own(tiny: dict[str, Path]) -> None:
    async with orch_for(tiny) as orch:
        async with orch.acquire("sdxl-base") as lease:
            base = await generate_image(lease.handle, "a lighthouse", seed=1)
        async with orch.acquire("sdxl-lora") as lease:
            lora = await generate_image(lease.handle, "a lighthouse", seed=1)
            # fused: the UNet has plain weights again, no adapter layers left
            assert not any("lora" in n for n, _ in lease.handle.unet.named_parameters())
        assert lora != base  # the LoRA changed the weights
        async with orch.acquire("sdxl-lora-controlnet") as lease:
            assert "controlnet" in lease.handle.components
            cn = await generate_image(lease.handle, "a lighthouse", seed=1, width=64, height=64)
        assert png_size(cn) == (64, 64)
        # exclusive kind: only one SDXL variant on the card at a time; the others kept in RAM
        # as far as the host budget allows
        t = tiers(orch)
        assert t["sdxl-lora-controlnet"] is Tier.GPU
        assert t.get("sdxl-base") is not Tier.GPU and t.get("sdxl-lora") is not Tier.GPU


async def test_host_budget_drops_the_least_recently_used_copy(tiny: dict[str, Path]) -> None:
    # 8 GiB of host RAM holds one SDXL copy (6.5 or 6.7) and the TTS copy (1.5), not two SDXLs
    async with orch_for(tiny, host_gb=8.0) as orch:
        for model in ("sdxl-base", "sdxl-lora", "qwen-14b"):
            async with orch.acquire(model):
                pass
        t = tiers(orch)
        assert t["sdxl-lora"] is Tier.HOST  # the most recent stays warm
        assert "sdxl-base" not in t  # the older one fell to disk
        assert orch.backend("sdxl-base").tier is Tier.DISK
        assert orch.backend("sdxl-base")._packed is None  # its host copy is gone too


async def test_tts_speaks_a_real_waveform_and_rides_along(tiny: dict[str, Path]) -> None:
    async with orch_for(tiny) as orch:
        async with orch.acquire("sdxl"), orch.acquire("tts") as lease:
            assert isinstance(lease.handle, Speaker)
            data = await synthesize_speech(lease.handle, "Hello, my name is Luca!", seed=0)
            samples, rate = lease.handle.synthesize("hello", seed=0)
            with pytest.raises(ValueError, match="empty"):
                lease.handle.synthesize("   ")
        with wave.open(io.BytesIO(data)) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
            assert w.getnframes() > 1000
        assert rate == 16000 and samples.ndim == 1 and len(samples) > 0
        assert float(abs(samples).max()) <= 1.0
        assert isinstance(orch.backend("tts"), TtsBackend)


async def test_simulated_handles_say_what_to_configure(tiny: dict[str, Path]) -> None:
    async with orch_for(tiny) as orch:
        async with orch.acquire("llm") as lease:
            with pytest.raises(MediaUnsupported, match="backend: diffusers"):
                await generate_image(lease.handle, "x")
            with pytest.raises(MediaUnsupported, match="backend: tts"):
                await synthesize_speech(lease.handle, "x")
        async with orch.acquire("sdxl") as lease:
            with pytest.raises(ValueError, match="multiple of 8"):
                await generate_image(lease.handle, "x", width=30)
            with pytest.raises(ValueError, match="prompt is empty"):
                await generate_image(lease.handle, " ")


async def test_unload_drops_every_reference(tiny: dict[str, Path]) -> None:
    async with orch_for(tiny) as orch:
        async with orch.acquire("sdxl") as lease:
            ref = weakref.ref(lease.handle.unet)
        # the lease object outlives its block, but not its hold on the pipeline
        with pytest.raises(LeaseEnded, match="ended with its block"):
            lease.handle  # noqa: B018
        await orch.unload("sdxl")
        gc.collect()
        assert ref() is None
        backend = orch.backend("sdxl")
        assert backend.tier is Tier.DISK and backend.measured_bytes() == 0
        assert orch.device.held_by("sdxl-base") == 0  # type: ignore[attr-defined]


async def test_a_pipeline_kept_alive_outside_is_not_counted_as_free(
    tiny: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    async with orch_for(tiny, unload_timeout_s=0.3) as orch:
        async with orch.acquire("sdxl") as lease:
            kept = [lease.handle.unet]  # a user's variable outlives the lease
        await orch.unload("sdxl")
        # the ledger let it go, but its memory is not back while `kept` lives: it is held
        # (as on a GPU) under a name that is not the model's, so the room is not ours
        assert orch.backend("sdxl").tier is Tier.DISK
        device = orch.device
        assert device.held_by("sdxl-base") == 0  # type: ignore[attr-defined]
        assert device.held_by("sdxl-base (unreleased)") == gib_to_bytes(10.5)  # type: ignore[attr-defined]
        assert "still referenced outside the orchestrator" in caplog.text
        # past the release wait's deadline, it said who holds what
        await wait_until(lambda: "sdxl-base still holds 10.50 GiB" in caplog.text, within=5)
        let_go_done = anyio.Event()

        async def let_go() -> None:
            # 11.5 GiB does not fit beside the 10.5 still held: the LLM waits for the room
            await wait_until(lambda: "qwen-14b" in orch.deferred(), within=5, what="the LLM waiting for room")
            kept.clear()
            gc.collect()
            let_go_done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(let_go)
            with anyio.fail_after(10):
                async with orch.acquire("llm"):
                    assert let_go_done.is_set()  # served only once the pipeline was let go
                    assert device.held_by("sdxl-base (unreleased)") == 0  # type: ignore[attr-defined]


async def test_a_model_larger_than_its_estimate_fails_before_taking_memory(tiny: dict[str, Path]) -> None:
    extra = f"""\
  sdxl-big:
    kind: sdxl
    vram_gb: 9.0
    simulation: {{true_vram_gb: 12.0}}
    backend: {{type: diffusers, path: "{tiny["tiny-sdxl"]}", steps: 2}}
"""
    async with orch_for(tiny, extra_models=extra) as orch:
        with pytest.raises(BackendOutOfMemory, match=r"12\.00 GiB"):
            with anyio.fail_after(60):
                async with orch.acquire("sdxl-big"):
                    pass
        assert orch.device.held_by("sdxl-big") == 0  # type: ignore[attr-defined]
        assert orch.backend("sdxl-big").tier is Tier.DISK
        # learned: planned at the size it needed from now on
        assert orch.estimate("sdxl-big").estimated_vram_bytes >= gib_to_bytes(12.0)


async def test_missing_path_is_a_clear_error_and_loses_nothing(tiny: dict[str, Path], tmp_path: Path) -> None:
    extra = f"""\
  sdxl-gone:
    kind: sdxl
    vram_gb: 9.0
    backend: {{type: diffusers, path: "{tmp_path / "nowhere"}"}}
"""
    async with orch_for(tiny, extra_models=extra) as orch:
        with pytest.raises(LoadFailed, match=r"does not exist.*models\.sdxl-gone\.backend\.path"):
            with anyio.fail_after(60):
                async with orch.acquire("sdxl-gone"):
                    pass
        async with orch.acquire("sdxl-base") as lease:  # and the next model loads fine
            assert lease.handle is not None
        assert orch.device.held_by("sdxl-gone") == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(("key", "what"), [("lora", "the LoRA weights"), ("controlnet", "the ControlNet")])
async def test_a_missing_lora_or_controlnet_names_its_key(
    tiny: dict[str, Path], tmp_path: Path, key: str, what: str
) -> None:
    extra = f"""  sdxl-gone:
    kind: sdxl
    vram_gb: 9.0
    backend: {{type: diffusers, path: "{tiny["tiny-sdxl"]}", {key}: "{tmp_path / "nowhere"}"}}
"""
    async with orch_for(tiny, extra_models=extra) as orch:
        with pytest.raises(
            LoadFailed, match=rf"{what} .*nowhere does not exist.*models\.sdxl-gone\.backend\.{key}"
        ):
            with anyio.fail_after(60):
                async with orch.acquire("sdxl-gone"):
                    pass
        assert orch.device.held_by("sdxl-gone") == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("backend", "key", "problem"),
    [
        ("{type: diffusers}", "models.m.backend.path", "missing"),
        ("{type: diffusers, path: /x, dtype: fp8}", "models.m.backend.dtype", "fp8"),
        ("{type: diffusers, path: /x, pipeline: flux}", "models.m.backend.pipeline", "flux"),
        ("{type: diffusers, path: /x, steps: 0}", "models.m.backend.steps", "at least 1"),
        ("{type: diffusers, path: /x, lora_scale: big}", "models.m.backend.lora_scale", "number"),
        ("{type: tts, path: /x, lora: /y}", "models.m.backend.lora", "unknown key"),
        ("{type: tts, path: 3}", "models.m.backend.path", "local path"),
    ],
)
def test_bad_backend_options_name_the_key(backend: str, key: str, problem: str) -> None:
    text = f"""\
hardware: {{device: simulated, total_vram_gb: 16.0, safe_max_vram_gb: 15.5}}
switching: {{heavy_models: [sdxl], light_models: [tts]}}
models:
  m: {{kind: sdxl, vram_gb: 4, backend: {backend}}}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert key in str(info.value) and problem in str(info.value)
