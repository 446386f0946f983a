"""quantize@T stage: llama.cpp's quantizer, in process, from the gguf stage's file to `model-<T>.gguf`,
and an Ollama `Modelfile` beside it (FROM that file, the training template, its stop tokens)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from builder.errors import StageError
from builder.export.modelfile import write_modelfile
from builder.recipe.quant import quant_ftype_name
from builder.stages import StageContext
from builder.stages.gguf import gguf_name


def quantize_file(src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's quantizer on one file, with all cores."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, quant_ftype_name(quant))
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0 or not dst.is_file():
        raise StageError(f"llama.cpp could not quantize {src.name} to {quant} (status {status})")


def run(ctx: StageContext) -> dict:
    quant = ctx.stage.param
    src = ctx.input_dir("gguf") / gguf_name(ctx.recipe.export.gguf.dtype)
    dst = ctx.out_dir / gguf_name(quant)
    quantize_file(src, dst, quant)
    modelfile = write_modelfile(dst)
    return {"file": dst.name, "bytes": dst.stat().st_size, "modelfile": modelfile.name}
