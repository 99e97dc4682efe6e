"""Tiny random-weight models in real formats, built locally (nothing is downloaded).

Tests, the demo and CI use them where a real model format is needed but no hub is reachable:

- ``tiny-llm``: a Llama-architecture causal LM (hidden 64, 2 heads of 32: vLLM's CPU attention
  needs a head size of at least 32), random weights in safetensors, and a byte-level BPE
  tokenizer trained here on a few sentences, with a chat template. vLLM serves it.

    python -m orchestrator.tiny_models DIR        # writes DIR/tiny-llm

Needs ``transformers``, ``tokenizers`` and ``torch`` (the ``vllm`` extra brings them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.tiny_models", description=__doc__.split("\n")[0])
    p.add_argument("dir", help="folder to write the tiny models into")
    args = p.parse_args(argv)
    path = build_tiny_llm(Path(args.dir) / "tiny-llm")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
