"""merge stage: fold the adapter into the base weights and save an HF model whose tokenizer
files carry the recipe's chat template (what the GGUF and every later user will see). With
preference tuning, the preference stage's adapter is folded in after the SFT one (merge reads the
last training stage).

The merge runs on CPU in fp32 from the base's full-precision files (a QLoRA adapter is folded
into the dequantized base, never into 4-bit weights), then the model is saved in
`export.merge_dtype` (auto: the dtype the base's config names, float32 if none).

generation_config.json's `eos_token_id` lists the template's end-of-turn token(s) first, then
EOS (`[4, 1]`: `<|im_end|>`, `</s>` for ChatML on the builtin base), so transformers' `generate`
and servers that read the file (vLLM, TGI) stop where the template ends an answer, not only at
an EOS the model was never trained to write there.
"""
from __future__ import annotations

from pathlib import Path

from builder.export.convert import end_of_turn_ids
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


def stop_token_ids(end_of_turn: list[int], eos: int | list[int] | None) -> int | list[int] | None:
    """generation_config's eos_token_id: the end-of-turn ids, then the base's EOS id(s), each once;
    the base's own value where that adds nothing (a template that ends turns with EOS)."""
    base = [eos] if isinstance(eos, int) else list(eos or [])
    ids = list(dict.fromkeys([*end_of_turn, *base]))
    return eos if ids == base else ids


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
    tokenizer.chat_template = template
    tokenizer.save_pretrained(ctx.out_dir)  # first: the end-of-turn ids are read from the saved files
    stops = stop_token_ids(end_of_turn_ids(ctx.out_dir), model.generation_config.eos_token_id)
    model.generation_config.eos_token_id = stops
    model.save_pretrained(ctx.out_dir, safe_serialization=True)
    return {"parameters": sum(p.numel() for p in model.parameters()), "dtype": dtype, "eos_token_id": stops}
