"""llama.cpp's quantizer, in process: one GGUF file to another quant type, with all cores.

    quantize_file(gguf_dir / gguf_name("f16"), out_dir / gguf_name("q8_0"), "q8_0")
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from builder.errors import StageError
from builder.recipe.quant import quant_ftype_name


def quantize_file(src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's quantizer on one file, with all cores; StageError when it fails."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, quant_ftype_name(quant))
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0 or not dst.is_file():
        raise StageError(f"llama.cpp could not quantize {src.name} to {quant} (status {status})")
