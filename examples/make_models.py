"""Write the tiny example checkpoints in examples/models/ (run once; the output is committed).

Three Llama-shaped models with 2 layers: a base and two "experts" that are the base plus
small different deltas, in bfloat16. Needs only numpy.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

VOCAB, HIDDEN, INTER, LAYERS = 128, 48, 96, 2
HERE = Path(__file__).parent / "models"


def to_bf16(x: np.ndarray) -> bytes:
    """float32 -> bfloat16 bytes, round-to-nearest-even."""
    b = x.astype(np.float32).view(np.uint32)
    rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, arr in tensors.items():
        data = to_bf16(arr)
        header[name] = {
            "dtype": "BF16",
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def shapes() -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            s[p + f"self_attn.{proj}_proj.weight"] = (HIDDEN, HIDDEN)
        s[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        s[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        s[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        s[p + "input_layernorm.weight"] = (HIDDEN,)
        s[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    s["model.norm.weight"] = (HIDDEN,)
    s["lm_head.weight"] = (VOCAB, HIDDEN)
    return s


def main() -> None:
    rng = np.random.default_rng(2026)
    base = {n: rng.normal(0, 0.02, shape).astype(np.float32) for n, shape in shapes().items()}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    for name, scale in (("base", 0.0), ("math-expert", 0.004), ("code-expert", 0.004)):
        folder = HERE / name
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            n: v + rng.normal(0, scale, v.shape).astype(np.float32) if scale else v for n, v in base.items()
        }
        write_safetensors(folder / "model.safetensors", tensors)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}, indent=2) + "\n")


if __name__ == "__main__":
    main()
