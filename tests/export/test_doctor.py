"""`tunefile doctor` and the llama.cpp build: the installed llama-cpp-python quantizes and decodes
q8_0/q4_k_m files with default parameters on this CPU, and its libraries hold no AVX-512 or AMX
instructions, so the same wheel runs on every x86-64 host with AVX2 (see README: The llama.cpp build)."""
from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from builder.cli import main


def test_doctor_decodes_every_smoke_type(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "AVX2 = 1" in out and "AMX_INT8" not in out and "AVX512 = 1" not in out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("ok")] == [
        "ok   f16", "ok   q8_0", "ok   q4_k_m"]


def test_doctor_reports_a_crash_as_a_message(monkeypatch, capsys):
    from builder.export import doctor

    monkeypatch.setattr(doctor, "_CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert main(["doctor"]) == 1
    err = capsys.readouterr().err
    assert "killed by SIGSEGV" in err and "make setup" in err and "Traceback" not in err


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None,
                    reason="checks x86-64 machine code with objdump")
def test_llama_cpp_libraries_hold_no_avx512_or_amx_instructions():
    import llama_cpp

    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml*.so"))
    assert libs
    for lib in libs:
        code = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
        assert "%zmm" not in code, f"{lib.name} has AVX-512 code: the wheel would crash on AVX2-only hosts"
        assert "tdpbssd" not in code and "ldtilecfg" not in code, f"{lib.name} has AMX code"
