"""Content keys: canonical JSON, xxh3-128 file digests with a stat cache, stage keys.

A stage key is xxh3-128 over the canonical JSON of the stage's effective inputs. Files are
hashed once per (size, mtime, inode); later plans read the digest from the stat cache.
"""
from __future__ import annotations

import json
from pathlib import Path

import xxhash

from builder.files import read_json, write_atomic

CHUNK = 1 << 20


def canonical_json(value: object) -> str:
    """Sorted keys, no whitespace, no NaN: the same value always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def hash_text(text: str) -> str:
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8"))


def hash_value(value: object) -> str:
    return hash_text(canonical_json(value))


def hash_file(path: Path) -> str:
    """xxh3-128 of a file's bytes, read in 1 MiB chunks."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class StatCache:
    """path -> digest, trusted while (size, mtime_ns, inode) are unchanged. Saved as JSON."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, list] = {}
        self.touched: set[str] = set()  # the files asked about since this cache was opened
        self.dirty = False
        if path is not None:
            self.entries = read_json(path, default={})  # a damaged cache costs a rehash, never a wrong digest

    def digest(self, path: Path) -> str:
        path = Path(path).resolve()
        self.touched.add(str(path))
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self.entries.get(str(path))
        if entry and entry[:3] == stamp:
            return entry[3]
        digest = hash_file(path)
        self.entries[str(path)] = stamp + [digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        write_atomic(self.path, canonical_json(self.entries))
        self.dirty = False
