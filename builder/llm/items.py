"""The per-item cache: one result per (model key, kind, request), in one SQLite file.

    cache = ItemCache(project.cache_dir / "eval-items.sqlite", model_key)
    found = cache.get("answer", request)        # None (a miss, counted) or the stored value
    cache.put("answer", request, value)         # committed at once: a killed run resumes here

Eval answers, lm-eval requests, judge verdicts and a teacher's replies are kept here, so adding a
task, a quant type or a prompt computes only the new items.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from builder.hashing import hash_value


class ItemCache:
    """Results by (model key, kind, request): one SQLite file, committed after every item; safe to
    share between the threads of a concurrent client."""

    def __init__(self, path: Path, model_key: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(path), timeout=60, check_same_thread=False)
        # WAL without a sync per commit: a crash keeps every committed item, at no fsync per item.
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS items (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.model_key, self.hits, self.misses = model_key, 0, 0

    def _key(self, kind: str, request: object) -> str:
        return hash_value({"model": self.model_key, "kind": kind, "request": request})

    def get(self, kind: str, request: object):
        with self.lock:
            row = self.db.execute("SELECT value FROM items WHERE key = ?", (self._key(kind, request),)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
        return json.loads(row[0])

    def put(self, kind: str, request: object, value: object) -> None:
        with self.lock:
            if self.db is None:  # closed: a client thread whose build already failed
                return
            self.db.execute("INSERT OR REPLACE INTO items VALUES (?, ?)",
                            (self._key(kind, request), json.dumps(value, sort_keys=True)))
            self.db.commit()

    def close(self) -> None:
        with self.lock:
            if self.db is not None:
                self.db.close()
                self.db = None
