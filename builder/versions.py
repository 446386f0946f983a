"""Installed library versions, as stage keys record them (no heavy import: package metadata only)."""
from __future__ import annotations

from functools import cache
from importlib import metadata


@cache
def library_version(dist: str) -> str:
    """The installed version of a distribution, or "not-installed"."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not-installed"
