"""A training run's components, for the train (SFT) and preference (DPO) stages alike.

    seed_everything(spec.seed)                                       # first: see the stages' setup
    accelerator, cuda, precision = make_accelerator(device, train_spec)
    model = load_model(train_spec, base_dir, precision)              # SFT: LoRA, QLoRA or full
    trainer = make_trainer(model, accelerator, cuda, spec, steps, weight_decay)
"""
from __future__ import annotations

import importlib
import math

from builder.errors import StageError
from builder.train.adapters import lora_config
from builder.train.loop import Trainer

SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs (transformers and peft draw from them)."""
    from accelerate.utils import set_seed

    set_seed(seed)


def resolve_precision(precision: str, cuda: bool) -> str:
    """auto: bf16 on a GPU that has it, else fp16 on CUDA, fp32 on CPU."""
    import torch

    if precision != "auto":
        if precision != "fp32" and not cuda:
            raise StageError(f"train.precision: {precision} needs a CUDA device; use fp32 or auto on CPU")
        return precision
    if not cuda:
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def make_accelerator(device: str, spec) -> tuple:
    """(accelerator, cuda, precision): params.yaml's `device` knob (auto, cpu, cuda), then
    train.precision (`spec`: the recipe's train section; auto: bf16 or fp16 on CUDA, fp32 on CPU)."""
    import torch
    from accelerate import Accelerator

    cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise StageError("params.yaml asks for device: cuda, but torch sees no CUDA device")
    if spec.method == "qlora" and not cuda:
        raise StageError("train.method: qlora needs a CUDA device (bitsandbytes 4-bit); use lora or full on CPU")
    precision = resolve_precision(spec.precision, cuda)
    return Accelerator(cpu=not cuda, mixed_precision="no" if precision == "fp32" else precision), cuda, precision


def pad_token_id(tokenizer) -> int:
    """What batches are padded with: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _load_4bit(base_dir, compute, gradient_checkpointing: bool):
    """The base quantized to 4-bit NF4 for QLoRA (bitsandbytes, CUDA only)."""
    from transformers import AutoModelForCausalLM

    try:
        importlib.import_module("bitsandbytes")
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise StageError("train.method: qlora needs bitsandbytes: pip install bitsandbytes") from None
    from peft import prepare_model_for_kbit_training

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, dtype=compute)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def load_model(spec, base_dir, precision: str):
    """The model ready to train: full weights in fp32 (mixed precision autocasts them), LoRA over a
    base in the compute dtype, or QLoRA over a 4-bit NF4 base (bitsandbytes, CUDA only)."""
    import torch
    from transformers import AutoModelForCausalLM

    compute = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if spec.method == "qlora":
        model = _load_4bit(base_dir, compute, spec.gradient_checkpointing)
    else:
        # Full fine-tuning keeps fp32 master weights; LoRA's frozen base can sit in the compute dtype.
        dtype = torch.float32 if spec.method == "full" else compute
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model.config.use_cache = False
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.method in ("lora", "qlora"):
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(spec.lora))
    return model


def add_neftune(model, alpha: float):
    """NEFTune: uniform noise of scale alpha/sqrt(length*dim) on the input embeddings, in training
    mode only (eval losses and generation never see it). Returns the hook handle."""
    import torch

    def noisy(module, args, output):
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.zeros_like(output).uniform_(-scale, scale)

    return model.get_input_embeddings().register_forward_hook(noisy)


def make_trainer(model, accelerator, cuda: bool, spec, steps: int, weight_decay: float) -> Trainer:
    """AdamW over the trainable weights and `spec`'s schedule (lr, scheduler, warmup_ratio) over
    `steps` optimizer steps, prepared by accelerate, the model in training mode."""
    import torch
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=weight_decay)
    scheduler = get_scheduler(SCHEDULERS[spec.scheduler], optimizer,
                              num_warmup_steps=math.ceil(steps * spec.warmup_ratio), num_training_steps=steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    return Trainer(model, accelerator, optimizer, scheduler, trainable, cuda, spec.max_grad_norm)
