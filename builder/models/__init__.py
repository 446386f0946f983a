"""Built-in base models, generated deterministically on the spot (no download).

`builtin:tiny-llama` is a 2-layer Llama (hidden 256, intermediate 512: K-quants apply) with a
byte-level BPE tokenizer trained on `tiny_corpus.txt`, which ships with the package, then
pretrained briefly on the same corpus so that it is a (very small) language model, not noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

CORPUS = Path(__file__).with_name("tiny_corpus.txt")
# The files of an HF model folder that make the model (READMEs, images etc. do not); the base
# stage copies exactly these and the base key hashes exactly these.
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")


def model_files(folder: Path) -> list[Path]:
    """The files of `folder` that make up the model, sorted."""
    return sorted({p for pattern in MODEL_FILES for p in folder.glob(pattern) if p.is_file()})


@dataclass(frozen=True)
class BuiltinModel:
    version: int  # bump when the generated files change on purpose (it is part of the base key)
    seed: int
    vocab_size: int
    config: dict = field(default_factory=dict)
    pretrain: dict = field(default_factory=dict)  # steps, batch_size, seq_len, lr on the corpus


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny-llama": BuiltinModel(
        version=2,
        seed=1234,
        vocab_size=2048,
        config={"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024,
                    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False},
        pretrain={"steps": 120, "batch_size": 8, "seq_len": 128, "lr": 3e-3},
    ),
}
