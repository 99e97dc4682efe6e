"""Tiny random-weight models in real formats, built locally (nothing is downloaded).

Tests, the demo and CI use them where a real model format is needed but no hub is reachable:

- ``tiny-llm``: a Llama-architecture causal LM (hidden 64, 2 heads of 32: vLLM's CPU attention
  needs a head size of at least 32), random weights in safetensors, and a byte-level BPE
  tokenizer trained here on a few sentences, with a chat template. vLLM serves it.
- ``tiny-sdxl``: a Stable Diffusion XL pipeline (UNet with SDXL's text-time conditioning, VAE,
  both CLIP text encoders, Euler scheduler) with a character-level CLIP tokenizer written
  here; ``StableDiffusionXLPipeline`` / ``AutoPipelineForText2Image`` load it and draw 64 px
  images on the CPU in a fraction of a second.
- ``tiny-sdxl-lora``: LoRA weights for that UNet (PEFT format, as diffusers saves them).
- ``tiny-controlnet``: an SDXL ControlNet made from that UNet.
- ``tiny-tts``: a VITS (MMS-TTS architecture) text-to-speech model with a character
  tokenizer; it returns a real (random-sounding) 16 kHz waveform.

    python -m orchestrator.tiny_models DIR            # writes all of them under DIR
    python -m orchestrator.tiny_models DIR --only tiny-sdxl tiny-tts

Needs ``torch`` and ``transformers`` (and ``tokenizers`` for the LLM, ``diffusers`` and ``peft``
for the image models): ``pip install 'vram-orchestrator[diffusers,tts]'``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import string
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

CORPUS = [
    "Generate an image of Luca running on the beach at sunset.",
    "Evaluate the quality of the generated image and suggest one improvement.",
    "A lighthouse in a storm, an oil painting with heavy brush strokes.",
    "The orchestrator keeps every model within the VRAM budget of the card.",
    "Hello, my name is Luca! I like the sea, the sun and long walks.",
    "Switching models costs seconds; a pinned host copy makes it a fraction of one.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_llm(out: Path, *, vocab_size: int = 512, seed: int = 0) -> Path:
    """Write a tiny Llama model and its tokenizer to ``out``; returns ``out``."""
    try:
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    except ImportError as exc:
        raise SystemExit(
            f"building the tiny LLM needs transformers, tokenizers and torch ({exc}); "
            "pip install 'vram-orchestrator[vllm]'"
        ) from None

    import transformers

    transformers.utils.logging.disable_progress_bar()
    out.mkdir(parents=True, exist_ok=True)
    special = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id})
    )
    return out


def _clip_tokenizer_files(out: Path) -> dict[str, int]:
    """A character-level CLIP vocabulary (every printable character, alone and word-final)."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    return vocab


def _tiny_unet(diffusers: Any) -> Any:
    # SDXL's conditioning at toy size: text-time added embeddings (6 time ids x 8 + the second
    # encoder's 32-wide pooled projection = 80), cross-attention over both encoders (32 + 32).
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=1,
    )


def sdxl_scheduler(diffusers: Any) -> Any:
    """SDXL base 1.0's scheduler: Euler, scaled-linear betas, leading timesteps."""
    return diffusers.EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )


def _imports_for_images() -> tuple[Any, Any, Any]:
    try:
        import torch
        import transformers

        from orchestrator.backends.inprocess_options import quiet_imports

        with quiet_imports():
            import diffusers
    except ImportError as exc:
        raise SystemExit(
            f"building the tiny image models needs torch, transformers and diffusers ({exc}); "
            "pip install 'vram-orchestrator[diffusers]'"
        ) from None
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers, diffusers


def build_tiny_sdxl(out: Path, *, seed: int = 0) -> Path:
    """Write a tiny random-weight SDXL pipeline to ``out``; returns ``out``."""
    torch, transformers, diffusers = _imports_for_images()
    tok_dir = out.parent / f".{out.name}-tokenizer"
    vocab = _clip_tokenizer_files(tok_dir)
    tokenizer = transformers.CLIPTokenizer(
        str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77
    )
    torch.manual_seed(seed)
    text_config = transformers.CLIPTextConfig(
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(vocab),
        hidden_act="gelu",
        projection_dim=32,
    )
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=diffusers.AutoencoderKL(
            block_out_channels=[32, 64],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            latent_channels=4,
            sample_size=64,
        ),
        text_encoder=transformers.CLIPTextModel(text_config),
        text_encoder_2=transformers.CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=_tiny_unet(diffusers),
        scheduler=sdxl_scheduler(diffusers),
    )
    pipe.save_pretrained(out)
    shutil.rmtree(tok_dir, ignore_errors=True)
    return out


def build_tiny_lora(out: Path, sdxl: Path, *, seed: int = 1) -> Path:
    """Write LoRA weights (rank 4, attention projections) for the tiny SDXL's UNet."""
    torch, _, diffusers = _imports_for_images()
    try:
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict
    except ImportError as exc:
        raise SystemExit(f"building the tiny LoRA needs peft ({exc}); pip install peft") from None
    unet = diffusers.UNet2DConditionModel.from_pretrained(sdxl / "unet", local_files_only=True)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(seed)
    with torch.no_grad():  # peft starts lora_B at zero (a no-op adapter): make it do something
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    layers = get_peft_model_state_dict(unet)
    diffusers.StableDiffusionXLPipeline.save_lora_weights(out, unet_lora_layers=layers)
    return out


def build_tiny_controlnet(out: Path, sdxl: Path) -> Path:
    """Write an SDXL ControlNet made from the tiny SDXL's UNet."""
    _, _, diffusers = _imports_for_images()
    unet = diffusers.UNet2DConditionModel.from_pretrained(sdxl / "unet", local_files_only=True)
    diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).save_pretrained(
        out
    )
    return out


def build_tiny_tts(out: Path, *, seed: int = 0) -> Path:
    """Write a tiny random-weight VITS model and its character tokenizer to ``out``."""
    try:
        import torch
        import transformers

        from orchestrator.backends.inprocess_options import quiet_imports

        with quiet_imports():
            from transformers import VitsConfig, VitsModel, VitsTokenizer
    except ImportError as exc:
        raise SystemExit(
            f"building the tiny TTS model needs torch and transformers ({exc}); "
            "pip install 'vram-orchestrator[tts]'"
        ) from None
    transformers.utils.logging.disable_progress_bar()
    out.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0}
    for c in " " + string.ascii_lowercase + "',.!?-":
        vocab[c] = len(vocab)
    vocab["<unk>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = VitsTokenizer(
        str(out / "vocab.json"),
        pad_token="<pad>",
        unk_token="<unk>",
        language=None,
        add_blank=True,
        normalize=True,
        phonemize=False,
        is_uroman=False,
    )
    torch.manual_seed(seed)
    config = VitsConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=32,
        flow_size=16,
        spectrogram_bins=8,
        duration_predictor_num_flows=2,
        duration_predictor_filter_channels=16,
        prior_encoder_num_flows=2,
        upsample_initial_channel=16,
        upsample_rates=[8, 2],
        upsample_kernel_sizes=[16, 4],
        resblock_kernel_sizes=[3, 7],
        resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
        sampling_rate=16000,
    )
    VitsModel(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


MODELS = ("tiny-llm", "tiny-sdxl", "tiny-sdxl-lora", "tiny-controlnet", "tiny-tts")
COMPLETE = ".complete"  # written last: a folder without it was interrupted and is rebuilt


def build(
    root: Path, which: tuple[str, ...] = MODELS, *, progress: Callable[[str], None] | None = None
) -> dict[str, Path]:
    """Build the named tiny models under ``root`` (those already complete are kept).

    :param progress: called with a short text before each model that has to be built (the
        demo shows it on a terminal: a first build takes about 15 s).
    """
    from orchestrator.backends.inprocess_options import quiet_imports

    root.mkdir(parents=True, exist_ok=True)
    need = set(which)
    if need & {"tiny-sdxl-lora", "tiny-controlnet"}:
        need.add("tiny-sdxl")
    todo = [n for n in MODELS if n in need and not (root / n / COMPLETE).exists()]
    out: dict[str, Path] = {}
    for name in MODELS:
        if name not in need:
            continue
        path = root / name
        if not (path / COMPLETE).exists():
            if progress is not None:
                progress(f"building {name} ({todo.index(name) + 1} of {len(todo)}, first use only)")
            shutil.rmtree(path, ignore_errors=True)
            with quiet_imports():  # the libraries' import-time notices are not the user's concern
                _build_one(name, path, root)
            (path / COMPLETE).write_text("")
        out[name] = path
    return out


def _build_one(name: str, path: Path, root: Path) -> None:
    if name == "tiny-llm":
        build_tiny_llm(path)
    elif name == "tiny-sdxl":
        build_tiny_sdxl(path)
    elif name == "tiny-sdxl-lora":
        build_tiny_lora(path, root / "tiny-sdxl")
    elif name == "tiny-controlnet":
        build_tiny_controlnet(path, root / "tiny-sdxl")
    else:
        build_tiny_tts(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.tiny_models", description=__doc__.split("\n")[0])
    p.add_argument("dir", help="folder to write the tiny models into")
    p.add_argument("--only", nargs="+", choices=MODELS, help="build only these (default: all)")
    args = p.parse_args(argv)
    progress = (lambda text: print(f"{text} ...", flush=True)) if sys.stdout.isatty() else None
    for name, path in build(Path(args.dir), tuple(args.only or MODELS), progress=progress).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
