"""merge stage: fold the adapter into the base weights and save an HF model whose tokenizer
files carry the recipe's chat template (what the GGUF and every later user will see)."""
from __future__ import annotations

from builder.stages import StageContext
from builder.templates import read_template


def run(ctx: StageContext) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, train_dir = ctx.input_dir("base"), ctx.input_dir("train")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    template = read_template(ctx.recipe.template, ctx.project.root, base_dir)
    if (train_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, train_dir).merge_and_unload()
    else:  # full fine-tuning saved the whole model
        model = AutoModelForCausalLM.from_pretrained(train_dir, dtype=torch.float32)
    model.save_pretrained(ctx.out_dir, safe_serialization=True)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(ctx.out_dir)
    return {"parameters": sum(p.numel() for p in model.parameters())}
