"""A content-addressed store of built stage folders, keyed by stage key.

What it gives that DVC cannot: two recipes whose dataset (or base, or adapter) keys are equal
build it once; the second restores it from here. Entries are hard links where the filesystem
allows (no second copy of a 10 GB model), and every file's digest is checked on restore: an
entry whose bytes changed is deleted and the stage is rebuilt, never used.

    .tunefile/stages/<key[:2]>/<key>/{files..., .index.json}
    .tunefile/shards/<key[:2]>/<key>/...     (the dataset stage's per-source shards)
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from builder.files import read_json
from builder.hashing import hash_file

INDEX = ".index.json"


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != INDEX)


class StageStore:
    """Folders by key under root/<namespace>: "stages" (stage outputs), "shards" (dataset shards)."""

    def __init__(self, root: Path, namespace: str = "stages"):
        self.root = root / namespace

    def entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def put(self, key: str, folder: Path, skip: tuple[str, ...] = ()) -> None:
        """Record a built folder (files named in `skip`, like the manifest, stay out)."""
        entry = self.entry(key)
        if (entry / INDEX).is_file():
            return
        tmp = entry.with_name(f".{key}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        index = {}
        for path in _files(folder):
            rel = path.relative_to(folder).as_posix()
            if rel in skip:
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(path, tmp / rel)
            index[rel] = hash_file(tmp / rel)
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / INDEX).write_text(json.dumps(index, sort_keys=True, indent=1))
        try:
            os.replace(tmp, entry)
        except OSError:  # someone stored the same key first
            shutil.rmtree(tmp, ignore_errors=True)

    def verified(self, key: str) -> Path | None:
        """The entry's folder, to read in place, if it is there and every file's digest matches;
        None (and a damaged entry dropped) otherwise."""
        entry = self.entry(key)
        index = read_json(entry / INDEX, default=None)
        if not isinstance(index, dict):
            return None
        for rel, digest in index.items():
            if not (entry / rel).is_file() or hash_file(entry / rel) != digest:
                shutil.rmtree(entry, ignore_errors=True)
                return None
        return entry

    def get(self, key: str, dst: Path) -> bool:
        """Materialise the entry into the empty folder dst; False (and the entry dropped) when it is
        missing or any file's digest no longer matches."""
        entry = self.verified(key)
        if entry is None:
            return False
        for rel in read_json(entry / INDEX):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(entry / rel, dst / rel)
        return True
