"""The base model as a GGUF file: the baseline every tuned file's eval is compared with.

    path, key = base_gguf(recipe, base_dir, base_key, "f16", project.cache_dir, out_dir / ".base-gguf")

Converted by the same converter as the tuned model and kept in the stage store under its own key
(the base stage's key, the dtype, the llama-cpp-python version): every recipe on that base shares
one file, and its eval items are cached under that key.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from builder import __version__
from builder.export.convert import convert_model, gguf_name
from builder.hashing import hash_value
from builder.store import StageStore
from builder.versions import library_version

BASE_GGUF_VERSION = 2  # bump when the base GGUF's bytes change on purpose


def base_gguf_key(base_key: str, dtype: str) -> str:
    """The store key of the base model's GGUF of that dtype."""
    return hash_value({"base": base_key, "dtype": dtype, "version": BASE_GGUF_VERSION,
                       "llama_cpp_python": library_version("llama_cpp_python")})


def base_gguf(recipe, base_dir: Path, base_key: str, dtype: str, cache_dir: Path, scratch: Path) -> tuple[Path, str]:
    """(the base model's GGUF file in the stage store, its key): converted from the base stage's
    folder in `scratch` (made, then removed) the first time, found in the store after that."""
    key = base_gguf_key(base_key, dtype)
    store = StageStore(cache_dir, "base-gguf")
    entry = store.verified(key)
    if entry is None:
        scratch.mkdir()
        metadata = {"tunefile.version": __version__, "tunefile.base_model": recipe.base.model,
                    "tunefile.base_key": base_key}
        convert_model(recipe, base_dir, scratch / gguf_name(dtype), dtype, "base", metadata)
        store.put(key, scratch)  # hashes the file once; no need to verify what was just stored
        shutil.rmtree(scratch)
        entry = store.entry(key)
    return entry / gguf_name(dtype), key
