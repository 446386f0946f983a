"""tunefile: a declarative, content-hashed build system for instruction tuning (package `builder`)."""

__version__ = "0.1.0"
