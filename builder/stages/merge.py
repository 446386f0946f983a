"""merge stage: fold the adapter into the base weights and save an HF model whose tokenizer
files carry the recipe's chat template (what the GGUF and every later user will see). With
preference tuning, the preference stage's adapter is folded in after the SFT one (merge reads the
last training stage).

The merge runs on CPU in fp32 from the base's full-precision files (a QLoRA adapter is folded
into the dequantized base, never into 4-bit weights), then the model is saved in
`export.merge_dtype` (auto: the dtype the base's config names, float32 if none).
"""
from __future__ import annotations

from pathlib import Path

from builder.files import read_json
from builder.stages import StageContext
from builder.templates import read_template
from builder.train.adapters import load_sft_model


def merge_dtype(asked: str, base_dir: Path) -> str:
    """export.merge_dtype; auto: the dtype the base's config.json names (float32 if none or another)."""
    if asked != "auto":
        return asked
    config = read_json(base_dir / "config.json")
    named = config.get("dtype") or config.get("torch_dtype") or "float32"
    return named if named in ("float32", "bfloat16", "float16") else "float32"


def run(ctx: StageContext) -> dict:
    import torch
    from transformers import AutoTokenizer

    base_dir = ctx.input_dir("base")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    template = read_template(ctx.recipe.template, ctx.project.root, base_dir)
    model = load_sft_model(base_dir, ctx.input_dir("train"))
    if "preference" in ctx.stage.upstream:  # the preference adapter sits on the SFT model
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, ctx.input_dir("preference")).merge_and_unload()
    dtype = merge_dtype(ctx.recipe.export.merge_dtype, base_dir)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(ctx.out_dir, safe_serialization=True)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(ctx.out_dir)
    return {"parameters": sum(p.numel() for p in model.parameters()), "dtype": dtype}
