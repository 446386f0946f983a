"""LoRA adapters: their config, saving one with stable bytes, and the models built from them.

    model = load_sft_model(base_dir, train_dir)                  # the train stage's result, fp32 on CPU
    policy = load_policy(train_spec, base_dir, train_dir, "fp32") # DPO: the SFT model + a fresh adapter
    save_adapter(policy, out_dir, recipe.base.model)
"""
from __future__ import annotations

import json
from pathlib import Path

from builder.files import read_json, write_atomic

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def lora_config(lora):
    """peft's LoraConfig for the recipe's train.lora (target modules sorted: the order is not ours to vary)."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=sorted(lora.target_modules), task_type="CAUSAL_LM")


def save_adapter(model, out_dir: Path, base_model: str) -> None:
    """A peft adapter with stable bytes: peft writes target_modules in set order and the base as an
    absolute path; the recipe's base.model is written instead."""
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's empty model card template
    config_path = out_dir / "adapter_config.json"
    config = read_json(config_path)
    config["target_modules"] = sorted(config["target_modules"])
    config["base_model_name_or_path"] = base_model
    # Not write_json: ASCII escapes and indent 2 are what adapter_config.json has always held.
    write_atomic(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_sft_model(base_dir: Path, train_dir: Path):
    """The SFT model in fp32 on CPU: the train stage's adapter folded into the base, or the whole
    model full fine-tuning saved."""
    import torch
    from transformers import AutoModelForCausalLM

    if (train_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        return PeftModel.from_pretrained(model, train_dir).merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(train_dir, dtype=torch.float32)


def load_policy(spec, base_dir: Path, train_dir: Path, precision: str):
    """DPO's policy: the SFT model in the compute dtype with a new LoRA adapter of train.lora's shape
    (`spec`: the recipe's train section); the adapter is zero at start, so the policy equals the
    reference (the same model with the adapter disabled)."""
    import torch
    from peft import get_peft_model

    model = load_sft_model(base_dir, train_dir).to(getattr(torch, DTYPES[precision]))
    model.config.use_cache = False
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, lora_config(spec.lora))
