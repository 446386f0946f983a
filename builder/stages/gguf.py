"""gguf stage: llama.cpp's converter (same version as the quantizer) turns the merged model into
`model-<dtype>.gguf`, with the chat template and tunefile's lineage keys in its metadata, and a
model card (README.md) beside it."""
from __future__ import annotations

from builder.export.convert import convert_model, gguf_name, lineage_metadata
from builder.export.modelcard import render_model_card
from builder.stages import StageContext


def run(ctx: StageContext) -> dict:
    dtype = ctx.recipe.export.gguf.dtype
    out = ctx.out_dir / gguf_name(dtype)
    keys = {name: stage.key for name, stage in ctx.plan.items()}  # the lineage: every stage's key
    convert_model(ctx.recipe, ctx.input_dir("merge"), out, dtype, ctx.recipe.name, lineage_metadata(ctx.recipe, keys))
    card = render_model_card(ctx.recipe, keys, ctx.input_dir, out.name)
    (ctx.out_dir / "README.md").write_text(card, encoding="utf-8")
    return {"file": out.name, "bytes": out.stat().st_size}
