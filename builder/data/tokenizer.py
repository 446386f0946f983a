"""The base tokenizer for the dataset stage, loaded with `tokenizers` alone when that is proven equal.

Importing transformers costs seconds, more than tokenizing 10k conversations. A fast HF tokenizer
is a `tokenizers.Tokenizer` (tokenizer.json) plus special tokens named in its config files, but
transformers may adjust the Rust tokenizer as it loads it (prefix spaces, legacy modes). So the
first time a tokenizer is used, it is loaded both ways and compared: the serialized Rust
tokenizers must be identical and the special tokens the same. The verdict is kept in
`<cache_dir>/tokenizers/<digest>.json`, keyed by the tokenizer files and both libraries' versions;
from then on the dataset stage never imports transformers. Tokenizers without tokenizer.json (slow
SentencePiece ones), or whose comparison fails, are loaded by transformers as before.

    tokenizer = load_tokenizer(base_dir, cache_dir)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from builder.files import read_json, write_json
from builder.hashing import hash_file, hash_value
from builder.templates import special_tokens
from builder.versions import library_version

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


@dataclass(frozen=True)
class FastTokenizer:
    """What the dataset path uses of an HF fast tokenizer: the Rust tokenizer and special tokens."""
    backend_tokenizer: object  # tokenizers.Tokenizer
    special_tokens_map: dict[str, str]

    def _id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return self.backend_tokenizer.token_to_id(token) if token is not None else None

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")


def _digest(base_dir: Path) -> str:
    files = {name: hash_file(base_dir / name) for name in TOKENIZER_FILES if (base_dir / name).is_file()}
    return hash_value({"files": files, "tokenizers": library_version("tokenizers"),
                       "transformers": library_version("transformers")})


def _special_tokens(hf) -> dict[str, str]:
    return {k: str(v) for k, v in hf.special_tokens_map.items() if isinstance(v, str)}


def verify_fast_load(base_dir: Path, cache_dir: Path, hf=None) -> bool:
    """Whether `tokenizers` alone loads this tokenizer exactly as transformers does (cached)."""
    if not (base_dir / "tokenizer.json").is_file():
        return False
    verdict_file = cache_dir / "tokenizers" / f"{_digest(base_dir)}.json"
    verdict = read_json(verdict_file, default=None)  # none yet, or damaged: compare again
    if isinstance(verdict, dict) and isinstance(verdict.get("equal"), bool):
        return verdict["equal"]
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf = hf or AutoTokenizer.from_pretrained(base_dir)
    raw = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    backend = getattr(hf, "backend_tokenizer", None)
    equal = (backend is not None and backend.to_str() == raw.to_str()
             and _special_tokens(hf) == special_tokens(base_dir))
    write_json(verdict_file, {"equal": equal}, indent=None)
    return equal


def load_tokenizer(base_dir: Path, cache_dir: Path):
    """A FastTokenizer where proven equal to transformers' load, else transformers' tokenizer."""
    if verify_fast_load(base_dir, cache_dir):
        from tokenizers import Tokenizer

        return FastTokenizer(Tokenizer.from_file(str(base_dir / "tokenizer.json")), special_tokens(base_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)
