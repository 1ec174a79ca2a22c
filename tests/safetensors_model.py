"""A tiny Llama-architecture model in Hugging Face layout, written by the test itself: config, a real
SentencePiece tokenizer trained on a few lines, and random float16 weights in safetensors.

Widths are multiples of 256 so that the K-quants (Q4_K_M and friends) apply to every matrix.
"""

from __future__ import annotations

import json
from pathlib import Path

HIDDEN, INTERMEDIATE, LAYERS, HEADS = 256, 512, 2, 4
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def write_tiny_safetensors_model(folder: Path) -> dict[str, Path]:
    """The repository's files by name (config.json, tokenizer.model, tokenizer_config.json, model.safetensors)."""
    import sentencepiece
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder.parent / f"{folder.name}-corpus.txt"
    corpus.write_text("\n".join(["the quick brown fox jumps over the lazy dog", "hello world, this is airgap",
                                 "a small model for a test"] * 20) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=300, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, num_threads=1, minloglevel=2, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1)
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).vocab_size()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": HEADS, "vocab_size": vocab, "max_position_embeddings": 512,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
              "torch_dtype": "float16", "tie_word_embeddings": False, "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}))
    generator = torch.Generator().manual_seed(0)

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.float16)

    ones = torch.ones(HIDDEN, dtype=torch.float16)
    tensors = {"model.embed_tokens.weight": weight(vocab, HIDDEN), "model.norm.weight": ones.clone(),
               "lm_head.weight": weight(vocab, HIDDEN)}
    for layer in range(LAYERS):
        at = f"model.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{at}self_attn.{name}.weight"] = weight(HIDDEN, HIDDEN)
        tensors[f"{at}mlp.gate_proj.weight"] = weight(INTERMEDIATE, HIDDEN)
        tensors[f"{at}mlp.up_proj.weight"] = weight(INTERMEDIATE, HIDDEN)
        tensors[f"{at}mlp.down_proj.weight"] = weight(HIDDEN, INTERMEDIATE)
        tensors[f"{at}input_layernorm.weight"] = ones.clone()
        tensors[f"{at}post_attention_layernorm.weight"] = ones.clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return {path.name: path for path in sorted(folder.iterdir())}
