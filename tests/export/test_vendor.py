"""The vendored converter (builder/export/vendor.py): where it lives, that a present one is used
as is, and that only the converter's parts are taken from a llama-cpp-python sdist."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from builder.errors import StageError
from builder.export import vendor

VERSION = "9.9.9"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TUNEFILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(vendor, "library_version", lambda name: VERSION)
    return tmp_path / "cache"


def _sdist(cache: Path, members: dict[str, bytes]) -> Path:
    """A llama-cpp-python sdist where setup leaves it, holding `members` under vendor/llama.cpp/."""
    path = cache / "wheels" / f"llama-cpp-python-{VERSION}-abc" / "sdist" / f"llama_cpp_python-{VERSION}.tar.gz"
    path.parent.mkdir(parents=True)
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(f"llama_cpp_python-{VERSION}/vendor/llama.cpp/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_the_converter_folder_is_per_llama_cpp_python_version(cache):
    assert vendor.cache_root() == cache
    assert vendor.converter_dir() == cache / f"llama.cpp-{VERSION}"


def test_a_converter_already_there_is_used_as_is(cache):
    target = cache / f"llama.cpp-{VERSION}"
    target.mkdir(parents=True)
    (target / "convert_hf_to_gguf.py").write_text("# ours\n")
    assert vendor.ensure_converter() == target
    assert sorted(p.name for p in target.iterdir()) == ["convert_hf_to_gguf.py"]


def test_only_the_converter_parts_are_taken_from_setups_sdist(cache):
    sdist = _sdist(cache, {"convert_hf_to_gguf.py": b"print('convert')\n", "conversion/base.py": b"x = 1\n",
                           "gguf-py/gguf/__init__.py": b"", "src/llama.cpp": b"int main;\n", "README.md": b"hi\n"})
    assert vendor._setup_sdist(VERSION) == sdist
    target = vendor.ensure_converter()
    assert target == cache / f"llama.cpp-{VERSION}"
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == [
        "conversion/base.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert (target / "convert_hf_to_gguf.py").read_text() == "print('convert')\n"
    assert [p.name for p in cache.iterdir() if p.name.startswith("tmp")] == []  # the staging folder is gone


def test_an_sdist_without_the_converter_is_an_error(cache):
    _sdist(cache, {"README.md": b"hi\n"})
    with pytest.raises(StageError, match=f"^the llama-cpp-python {VERSION} sdist has no "
                                         "vendor/llama.cpp/convert_hf_to_gguf.py$"):
        vendor.ensure_converter()
    assert not vendor.converter_dir().exists()


def test_without_llama_cpp_python_it_says_to_run_setup(cache, monkeypatch):
    monkeypatch.setattr(vendor, "library_version", lambda name: "not-installed")
    with pytest.raises(StageError, match=r"^llama-cpp-python is not installed; run `make setup`$"):
        vendor.ensure_converter()
