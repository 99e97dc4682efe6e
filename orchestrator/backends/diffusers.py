"""SDXL (and other text-to-image) pipelines from diffusers, in this process.

Config (``backend: {type: diffusers, ...}``):

- ``path``: the pipeline's local folder (``save_pretrained`` layout, ``model_index.json``).
- ``pipeline``: ``auto`` (``AutoPipelineForText2Image``, the default) or ``sdxl``
  (``StableDiffusionXLPipeline``); with ``controlnet`` it is the SDXL ControlNet pipeline.
- ``lora``: a folder or ``.safetensors`` file of LoRA weights, fused into the UNet at load
  (the weights stay static, so the packed host copy holds the fused ones); ``lora_scale``.
- ``controlnet``: a local ControlNet folder; the pipeline then needs a control image.
- ``dtype``: ``auto`` (fp16 on a GPU, fp32 on the CPU), ``float16``, ``bfloat16``, ``float32``.
- ``steps``: the default number of inference steps for ``orchestrator.media`` (30).

Each variant (base, +LoRA, +LoRA+ControlNet) is its own model in the config with its own
estimate, as in the Model Management Module. ``lease.handle`` is the pipeline itself.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.backends.base import BackendType
from orchestrator.backends.inprocess import InProcessBackend
from orchestrator.backends.inprocess_options import InProcessOptions
from orchestrator.backends.options import OptionError, path_option
from orchestrator.spec import Config, ModelSpec, RequestLimits

if TYPE_CHECKING:
    from orchestrator.device.base import Device

PIPELINES = ("auto", "sdxl")
OPTION_KEYS = ("path", "pipeline", "lora", "lora_scale", "controlnet", "dtype", "steps")
WEIGHT_COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "controlnet")


@dataclass(frozen=True)
class DiffusersOptions(InProcessOptions):
    pipeline: str = "auto"
    lora: Path | None = None
    lora_scale: float = 1.0
    controlnet: Path | None = None
    steps: int = 30  # the default number of inference steps (orchestrator.media)

    @classmethod
    def parse(cls, opts: Mapping[str, Any]) -> DiffusersOptions:
        """Validate a ``type: diffusers`` mapping; raises ``OptionError`` naming the key."""
        common = cls.common(opts, OPTION_KEYS)
        pipeline = opts.get("pipeline", "auto")
        if pipeline not in PIPELINES:
            raise OptionError("pipeline", f"expected one of {', '.join(PIPELINES)}, got {pipeline!r}")
        scale = opts.get("lora_scale", 1.0)
        if not isinstance(scale, int | float) or isinstance(scale, bool):
            raise OptionError("lora_scale", f"expected a number, got {scale!r}")
        steps = opts.get("steps", 30)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise OptionError("steps", f"expected a whole number of steps of at least 1, got {steps!r}")
        return cls(
            **common,
            pipeline=str(pipeline),
            lora=path_option(opts, "lora", required=False),
            lora_scale=float(scale),
            controlnet=path_option(opts, "controlnet", required=False),
            steps=steps,
        )

    def limit_problem(self, limits: RequestLimits) -> tuple[str, str, str] | None:
        if self.steps > limits.max_steps:
            return (
                "steps",
                f"the default of {self.steps} steps is more than limits.max_steps ({limits.max_steps})",
                "lower backend.steps or raise limits.max_steps",
            )
        return None


def _quiet_progress(diffusers: Any) -> None:
    try:
        diffusers.utils.logging.disable_progress_bar()
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - an older release without these switches
        pass


def _empty_component(folder: Path, library: str, class_name: str, dtype: Any) -> Any:
    """One pipeline component (a diffusers or transformers model) built from its config in
    ``folder`` without its weights (the disk cache fills them)."""
    import importlib

    from orchestrator.backends.diskread import empty_weights

    cls = getattr(importlib.import_module(library), class_name)
    with empty_weights():
        if library == "diffusers":
            module = cls.from_config(cls.load_config(folder))
        else:
            module = cls._from_config(cls.config_class.from_pretrained(folder), dtype=dtype)
    return module.eval()


class DiffusersBackend(InProcessBackend):
    extra = "diffusers"
    recipe_ignores = ("steps",)

    def cache_sources(self) -> list[Path]:
        opts = self.options
        assert isinstance(opts, DiffusersOptions)
        return [p for p in (self.path, opts.lora, opts.controlnet) if p is not None]

    def _diffusers(self) -> Any:
        try:
            import diffusers
        except ImportError:
            raise RuntimeError(
                f"model {self.name!r} uses backend: diffusers, which needs diffusers and transformers: "
                "pip install 'vram-orchestrator[diffusers]'"
            ) from None
        _quiet_progress(diffusers)
        return diffusers

    def _pipeline_class(self, diffusers: Any) -> Any:
        opts = self.options
        assert isinstance(opts, DiffusersOptions)
        if opts.controlnet is not None:
            return diffusers.StableDiffusionXLControlNetPipeline
        if opts.pipeline == "sdxl":
            return diffusers.StableDiffusionXLPipeline
        return diffusers.AutoPipelineForText2Image

    def _build_skeleton(self, torch: Any, dtype: Any) -> tuple[Any, dict[str, Any]]:
        """The pipeline with its weight components built from their configs, without weights
        (the LoRA is already fused in the cached weights); tokenizers and the scheduler are
        read from the folder as ``from_pretrained`` reads them."""
        import json

        diffusers = self._diffusers()
        opts = self.options
        assert isinstance(opts, DiffusersOptions)
        index = json.loads((self.path / "model_index.json").read_text())
        kwargs: dict[str, Any] = {"local_files_only": True}
        for name in WEIGHT_COMPONENTS:
            entry = index.get(name)
            if isinstance(entry, list) and len(entry) == 2 and entry[0] is not None:
                kwargs[name] = _empty_component(self.path / name, str(entry[0]), str(entry[1]), dtype)
        cn_path = self._local_path(opts.controlnet, "controlnet", "the ControlNet")
        if cn_path is not None:
            kwargs["controlnet"] = _empty_component(cn_path, "diffusers", "ControlNetModel", dtype)
        pipe = self._pipeline_class(diffusers).from_pretrained(self.path, **kwargs)
        return self._finish(pipe, torch)

    def _finish(self, pipe: Any, torch: Any) -> tuple[Any, dict[str, Any]]:
        opts = self.options
        assert isinstance(opts, DiffusersOptions)
        pipe.set_progress_bar_config(disable=True)
        pipe.vram_orchestrator_steps = opts.steps
        # A pipeline is not thread-safe (its scheduler keeps the step index): the tasks that
        # share a lease take turns (orchestrator.media holds this lock around each call).
        pipe.vram_orchestrator_lock = threading.Lock()
        modules = {
            name: getattr(pipe, name)
            for name in WEIGHT_COMPONENTS
            if isinstance(getattr(pipe, name, None), torch.nn.Module)
        }
        return pipe, modules

    def _build(self, torch: Any, dtype: Any) -> tuple[Any, dict[str, Any]]:
        diffusers = self._diffusers()
        opts = self.options
        assert isinstance(opts, DiffusersOptions)
        kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
        cn_path = self._local_path(opts.controlnet, "controlnet", "the ControlNet")
        if cn_path is not None:
            kwargs["controlnet"] = diffusers.ControlNetModel.from_pretrained(
                cn_path, dtype=dtype, local_files_only=True
            )
        pipe = self._pipeline_class(diffusers).from_pretrained(self.path, **kwargs)
        lora = self._local_path(opts.lora, "lora", "the LoRA weights")
        if lora is not None:
            # Fused, then the adapter layers removed: the UNet's weights stay plain static
            # tensors (what the packed host copy needs), with the LoRA folded in.
            level = diffusers.utils.logging.get_verbosity()
            diffusers.utils.logging.set_verbosity_error()  # "no LoRA keys for the text encoders"
            try:
                pipe.load_lora_weights(str(lora), adapter_name="lora")
            finally:
                diffusers.utils.logging.set_verbosity(level)
            pipe.fuse_lora(lora_scale=opts.lora_scale)
            pipe.unload_lora_weights()
        return self._finish(pipe, torch)


def create(spec: ModelSpec, *, config: Config, device: Device, log_dir: Path) -> DiffusersBackend:
    return DiffusersBackend(spec, device, config.device_index, cache=config.cache)


BACKEND = BackendType(parse=DiffusersOptions.parse, create=create)
