"""train stage: LoRA, QLoRA or full fine-tuning of the base model on the dataset stage's train split.

Top to bottom: read the data and draw every epoch's batches (packed or padded) up front, load the
model in the precision the device allows and wrap it (LoRA adapters, 4-bit base for QLoRA), set
up the optimizer and schedule, resume from the newest checkpoint if an earlier run of these exact
inputs was interrupted, loop (gradient accumulation, clipping, NEFTune noise, periodic eval loss,
checkpoints), save. Writes adapter_model.safetensors + adapter_config.json (or the full model),
metrics.json (losses, tokens, speed, padding), loss.csv (step, epoch, loss, lr) and eval.csv
(step, eval_loss) for `dvc plots`.
"""
from __future__ import annotations

import json
import math
import random
import time

from builder.errors import StageError
from builder.stages import StageContext
from builder.train.batches import Batch, make_batches, padding_fraction, read_split, to_tensors, trained_tokens
from builder.train.checkpoints import checkpoint_folder, clear_checkpoints, load_latest, save_checkpoint

SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def evaluate_loss(model, batches: list[Batch], device) -> float | None:
    """Mean loss per trained token over the eval split (no noise, no dropout: eval mode)."""
    import torch

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            n = trained_tokens(batch)
            if n:
                total += float(model(**to_tensors(batch, device), use_cache=False).loss) * n
                count += n
    model.train(was_training)
    return total / count if count else None


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


def load_model(spec, base_dir, precision: str):
    """The model ready to train: full weights in fp32 (mixed precision autocasts them), LoRA over a
    base in the compute dtype, or QLoRA over a 4-bit NF4 base (bitsandbytes, CUDA only)."""
    import torch
    from transformers import AutoModelForCausalLM

    compute = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if spec.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise StageError("train.method: qlora needs bitsandbytes: pip install bitsandbytes") from None
        from peft import prepare_model_for_kbit_training

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=compute)
        model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, dtype=compute)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32 if spec.method == "full" else compute)
    model.config.use_cache = False
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        lora = spec.lora
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=sorted(lora.target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    return model


def padding_report(examples: list, spec, pad_id: int, shuffle: bool) -> dict:
    """The padding fraction of the first epoch with and without packing (what packing saves)."""
    order = epoch_order(examples, random.Random(spec.seed), shuffle)
    return {f"padding_fraction_{name}": padding_fraction(make_batches(order, spec.batch_size, packing,
                                                                      spec.max_length, pad_id))
            for name, packing in (("packed", True), ("unpacked", False))}


def epoch_order(examples: list, rng: random.Random, shuffle: bool) -> list:
    """One epoch's examples: a seeded shuffle (mixture.order: shuffle), or train.parquet's own
    order (mixture.order: curriculum, simple to complex)."""
    order = list(examples)
    if shuffle:
        rng.shuffle(order)
    return order


def draw_epochs(examples: list, spec, pad_id: int, shuffle: bool) -> list[list[Batch]]:
    """Every epoch's batches, drawn up front from the seed: the schedule knows the exact number of
    steps, and a resumed run sees exactly the batches the interrupted one would have."""
    rng = random.Random(spec.seed)
    return [make_batches(epoch_order(examples, rng, shuffle), spec.batch_size, spec.packing, spec.max_length, pad_id)
            for _ in range(spec.epochs)]


def make_accelerator(ctx: StageContext, seed: int):
    """(accelerator, cuda, precision) for a training stage, seeded: params.yaml's device knob, then
    train.precision (auto: bf16 or fp16 on CUDA, fp32 on CPU)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    spec = ctx.recipe.train
    device_knob = ctx.project.params.device
    cuda = device_knob != "cpu" and torch.cuda.is_available()
    if device_knob == "cuda" and not cuda:
        raise StageError("params.yaml asks for device: cuda, but torch sees no CUDA device")
    if spec.method == "qlora" and not cuda:
        raise StageError("train.method: qlora needs a CUDA device (bitsandbytes 4-bit); use lora or full on CPU")
    precision = resolve_precision(spec.precision, cuda)
    # Order matters: seed before the model is built (LoRA init draws random numbers).
    set_seed(seed)
    return Accelerator(cpu=not cuda, mixed_precision="no" if precision == "fp32" else precision), cuda, precision


def make_optimizer(model, accelerator, spec, steps: int, weight_decay: float):
    """AdamW over the trainable weights and `spec`'s schedule (lr, scheduler, warmup_ratio) over
    `steps` optimizer steps, prepared by accelerate: (model, optimizer, scheduler, trainable)."""
    import torch
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=weight_decay)
    scheduler = get_scheduler(SCHEDULERS[spec.scheduler], optimizer, num_warmup_steps=math.ceil(steps * spec.warmup_ratio),
                              num_training_steps=steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    return model, optimizer, scheduler, trainable


def optimizer_step(accelerator, trainable: list, optimizer, scheduler, max_grad_norm: float | None) -> float:
    """Clip, step and advance the schedule; return the learning rate this step used."""
    if max_grad_norm is not None:
        accelerator.clip_grad_norm_(trainable, max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


def restore_checkpoint(state: dict, model, accelerator, optimizer, scheduler, cuda: bool) -> None:
    """Put a checkpoint's trainable weights, optimizer, schedule and RNG states back in place."""
    import torch

    named = dict(accelerator.unwrap_model(model).named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            named[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if cuda and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def checkpoint_state(model, accelerator, optimizer, scheduler, cuda: bool, **progress) -> dict:
    """Everything the rest of a run depends on (see builder/train/checkpoints.py), with the run's progress."""
    import torch

    named = accelerator.unwrap_model(model).named_parameters()
    return {"trainable": {n: p.detach().cpu().clone() for n, p in named if p.requires_grad},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None,
            **progress}


def save_adapter(model, out_dir, base_model: str) -> None:
    """A peft adapter with stable bytes: peft writes target_modules in set order and the base as an
    absolute path; the recipe's base.model is written instead."""
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's empty model card template
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config["base_model_name_or_path"] = base_model
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_csv(path, header: str, rows: list[str]) -> None:
    with open(path, "w") as f:
        f.write(header + "\n")
        f.writelines(row + "\n" for row in rows)


def pad_token_id(tokenizer) -> int:
    """What batches are padded with: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def run(ctx: StageContext) -> dict:
    import torch
    from transformers import AutoTokenizer

    spec = ctx.recipe.train
    accelerator, cuda, precision = make_accelerator(ctx, spec.seed)
    base_dir, data_dir = ctx.input_dir("base"), ctx.input_dir("dataset")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = pad_token_id(tokenizer)
    train_examples = read_split(data_dir / "train.parquet")
    eval_batches = make_batches(read_split(data_dir / "eval.parquet"), spec.batch_size, spec.packing,
                                spec.max_length, pad_id)
    shuffle = ctx.recipe.mixture.order == "shuffle"
    epochs = draw_epochs(train_examples, spec, pad_id, shuffle)
    # One optimizer step takes gradient_accumulation micro-batches per process; under a multi-process
    # launch, process r trains micro-batches r, r+W, ... of each step's group (W processes).
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = [(epoch, batch) for epoch, batches in enumerate(epochs) for batch in batches]
    per_step = spec.gradient_accumulation * world
    steps = [micro[i:i + per_step] for i in range(0, len(micro), per_step)]
    if not steps:
        raise StageError("the train split is empty; check the dataset stage's stats.json")

    model = load_model(spec, base_dir, precision)
    if spec.neftune_alpha is not None:
        add_neftune(model, spec.neftune_alpha)
    model, optimizer, scheduler, trainable = make_optimizer(model, accelerator, spec, len(steps),
                                                            spec.weight_decay)

    # Resume: an interrupted run of these exact inputs left a checkpoint under the stage key.
    folder = checkpoint_folder(ctx.project.cache_dir, ctx.stage.key)
    state = load_latest(folder)
    curve, evals, tokens, start = [], [], 0, 0
    if state is not None:
        restore_checkpoint(state, model, accelerator, optimizer, scheduler, cuda)
        curve, evals, tokens, start = state["curve"], state["evals"], state["tokens"], state["step"]

    started, tokens_now = time.time(), 0
    every = ctx.project.params.checkpoint_steps
    for index in range(start, len(steps)):
        group = steps[index]
        # The loss of a step is the mean over all its trained tokens, however they fall into
        # micro-batches and processes (DDP averages gradients over processes: hence `* world`).
        window = sum(trained_tokens(batch) for _, batch in group)
        step_tokens = sum(len(ids) for _, batch in group for ids in batch.input_ids)
        tokens, tokens_now = tokens + step_tokens, tokens_now + step_tokens
        share = group[rank::world]
        step_loss = 0.0
        for epoch, batch in share or group[:1]:
            n = trained_tokens(batch) if share else 0
            if not n and world == 1:
                continue
            output = model(**to_tensors(batch, accelerator.device), use_cache=False)
            # A rank with nothing to train still joins the gradient all-reduce, with zero weight.
            loss = output.loss * (n / window * world) if n else output.logits.sum() * 0.0
            accelerator.backward(loss)
            step_loss += loss.detach().item() / world
        if world > 1:
            step_loss = accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "sum").item()
        lr = optimizer_step(accelerator, trainable, optimizer, scheduler, spec.max_grad_norm)
        step = index + 1
        curve.append((step, group[-1][0], step_loss, lr))
        if spec.eval_steps and step % spec.eval_steps == 0 and step < len(steps):
            evals.append((step, evaluate_loss(model, eval_batches, accelerator.device)))
        if step % every == 0 and step < len(steps) and accelerator.is_main_process:
            save_checkpoint(folder, step, checkpoint_state(model, accelerator, optimizer, scheduler, cuda,
                                                           curve=curve, evals=evals, tokens=tokens))
    seconds = time.time() - started
    eval_loss = evaluate_loss(model, eval_batches, accelerator.device)
    evals.append((len(steps), eval_loss))

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if spec.method in ("lora", "qlora"):
        save_adapter(unwrapped, ctx.out_dir, ctx.recipe.base.model)
    else:
        unwrapped.save_pretrained(ctx.out_dir, safe_serialization=True)
        tokenizer.save_pretrained(ctx.out_dir)

    write_csv(ctx.out_dir / "loss.csv", "step,epoch,loss,lr", [f"{s},{e},{loss:.6f},{lr:.8g}" for s, e, loss, lr in curve])
    write_csv(ctx.out_dir / "eval.csv", "step,eval_loss", [f"{s},{loss:.6f}" for s, loss in evals if loss is not None])
    padding = padding_report(train_examples, spec, pad_id, shuffle)  # the first epoch, packed and not
    padding["padding_fraction"] = padding["padding_fraction_packed" if spec.packing else "padding_fraction_unpacked"]
    metrics = {"steps": len(steps), "micro_batches": len(micro), "train_loss": round(curve[-1][2], 6),
               "eval_loss": round(eval_loss, 6) if eval_loss is not None else None,
               "train_tokens": tokens, "tokens_per_second": round(tokens_now / seconds, 1) if seconds else None,
               "trainable_parameters": sum(p.numel() for p in trainable), "device": str(accelerator.device),
               "precision": precision, **padding}
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        clear_checkpoints(folder)
    # CPU results depend on the thread count (GEMM kernels split sums by thread): recorded, so two
    # manifests show whether their bytes could be expected to match.
    return {**metrics, "resumed_from_step": start, "processes": world, "torch_threads": torch.get_num_threads()}
