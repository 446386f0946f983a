"""llama.cpp's HF -> GGUF converter, taken from the sdist of the installed llama-cpp-python.

The wheel has no converter; its sdist has one of exactly the llama.cpp version that quantizes
and runs our files. `ensure_converter()` extracts it once into the user cache:
    ~/.cache/tunefile/llama.cpp-<llama-cpp-python version>/{convert_hf_to_gguf.py,conversion,gguf-py}
Run `tunefile vendor` (the Makefile does) to fetch it ahead of time.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from builder.errors import StageError
from builder.versions import library_version

PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def cache_root() -> Path:
    return Path(os.environ.get("TUNEFILE_CACHE", Path.home() / ".cache" / "tunefile"))


def converter_dir() -> Path:
    return cache_root() / f"llama.cpp-{library_version('llama_cpp_python')}"


def _setup_sdist(version: str) -> Path | None:
    """The sdist that setup built the llama-cpp-python wheel from (Makefile), if it is still there."""
    found = sorted(cache_root().glob(f"wheels/llama-cpp-python-{version}-*/sdist/llama_cpp_python-{version}.tar.gz"))
    return found[0] if found else None


def ensure_converter() -> Path:
    """The converter folder, from setup's sdist or a pip download of it (~75 MB) if it is missing."""
    target = converter_dir()
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    version = library_version("llama_cpp_python")
    if version == "not-installed":
        raise StageError("llama-cpp-python is not installed; run `make setup`")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        archives = [a for a in [_setup_sdist(version)] if a is not None]
        if not archives:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   f"llama-cpp-python=={version}", "-d", tmp, "--quiet"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if done.returncode != 0 or not archives:
                raise StageError(f"could not download the llama-cpp-python {version} sdist for its GGUF "
                                 f"converter (needs access to the package index):\n{done.stderr[-2000:]}")
        staging = Path(tmp) / "llama.cpp"
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                if member.name.startswith(prefix) and member.name[len(prefix):].startswith(PARTS):
                    member.name = member.name[len(prefix):]
                    archive.extract(member, staging, filter="data")
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise StageError(f"the llama-cpp-python {version} sdist has no vendor/llama.cpp/convert_hf_to_gguf.py")
        try:
            os.replace(staging, target)
        except OSError:  # another process extracted it first
            if not (target / "convert_hf_to_gguf.py").is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    return target
