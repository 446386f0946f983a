"""Installed library versions, as stage keys record them (no heavy import: package metadata only)."""
from __future__ import annotations

from functools import lru_cache
from importlib import metadata


@lru_cache(maxsize=None)
def library_version(dist: str) -> str:
    """The installed version of a distribution, or "not-installed"."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not-installed"
