"""Randomly initialised Qwen2 models with the real Qwen2.5 tokenizer, for the GPU scripts.

The 0.5B shape (Qwen2.5-0.5B's) is what the GPU numbers are about; the tiny one runs the same
plumbing on a CPU in seconds.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
# hidden size, layers, attention heads, key/value heads, MLP size
SHAPES = {"random-qwen2.5-0.5b": (896, 24, 14, 2, 4864), "random-tiny": (64, 2, 4, 2, 128)}


def build_random(name: str, folder: Path) -> str:
    """Save the model ``name`` (a key of SHAPES) and its tokenizer to ``folder``; return it."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "qwen2.5")
    hidden, layers, heads, kv, inter = SHAPES[name]
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv,
                         intermediate_size=inter, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
