"""quantize@T stage: llama.cpp's quantizer, in process, from the gguf stage's file to `model-<T>.gguf`,
and an Ollama `Modelfile` beside it (FROM that file, the training template, its stop tokens)."""
from __future__ import annotations

from builder.export.convert import gguf_name
from builder.export.modelfile import write_modelfile
from builder.export.quantize import quantize_file
from builder.stages import StageContext


def run(ctx: StageContext) -> dict:
    quant = ctx.stage.param
    src = ctx.input_dir("gguf") / gguf_name(ctx.recipe.export.gguf.dtype)
    dst = ctx.out_dir / gguf_name(quant)
    quantize_file(src, dst, quant)
    modelfile = write_modelfile(dst)
    return {"file": dst.name, "bytes": dst.stat().st_size, "modelfile": modelfile.name}
