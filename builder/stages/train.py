"""train stage: LoRA (or full) fine-tuning of the base model on the dataset stage's train split.

Top to bottom: read the data, build batches (packed or padded), load the model and wrap it in
LoRA, loop, save. Writes adapter_model.safetensors + adapter_config.json (or the full model),
metrics.json (final/eval loss, tokens, speed) and loss.csv (the curve, for `dvc plots`).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass

from builder.errors import StageError
from builder.stages import StageContext

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]]
    attention_mask: list[list[int]] | None  # None for packed batches: positions mark the examples


def read_split(path) -> list[tuple[list[int], list[int]]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["input_ids", "labels"])
    return list(zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist()))


def pack_rows(examples: list[tuple[list[int], list[int]]], max_length: int) -> list[tuple[list, list, list]]:
    """Greedy packing into rows of at most max_length tokens, positions restarting per example.

    The first label of each example is dropped so no token learns to predict across examples;
    attention stays within an example because transformers derives a block-diagonal mask from
    position ids that restart (when no attention mask is passed)."""
    rows, ids, labels, positions = [], [], [], []
    for example_ids, example_labels in examples:
        if ids and len(ids) + len(example_ids) > max_length:
            rows.append((ids, labels, positions))
            ids, labels, positions = [], [], []
        ids = ids + example_ids
        labels = labels + [IGNORE_INDEX] + example_labels[1:]
        positions = positions + list(range(len(example_ids)))
    if ids:
        rows.append((ids, labels, positions))
    return rows


def make_batches(examples: list[tuple[list[int], list[int]]], batch_size: int, packing: bool,
                 max_length: int, pad_id: int) -> list[Batch]:
    batches = []
    rows = pack_rows(examples, max_length) if packing else [
        (ids, labels, list(range(len(ids)))) for ids, labels in examples]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r[0]) for r in chunk)
        batch = Batch([], [], [], None if packing else [])
        for ids, labels, positions in chunk:
            pad = width - len(ids)
            batch.input_ids.append(ids + [pad_id] * pad)
            batch.labels.append(labels + [IGNORE_INDEX] * pad)
            # Padding gets positions of its own (a separate "example" when packed).
            batch.position_ids.append(positions + list(range(pad)))
            if batch.attention_mask is not None:
                batch.attention_mask.append([1] * len(ids) + [0] * pad)
        batches.append(batch)
    return batches


def to_tensors(batch: Batch, device) -> dict:
    import torch

    tensors = {"input_ids": batch.input_ids, "labels": batch.labels, "position_ids": batch.position_ids}
    if batch.attention_mask is not None:
        tensors["attention_mask"] = batch.attention_mask
    return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in tensors.items()}


def evaluate_loss(model, batches: list[Batch], device) -> float | None:
    """Mean loss per trained token over the eval split."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            tensors = to_tensors(batch, device)
            n = int((tensors["labels"][:, 1:] != IGNORE_INDEX).sum())
            if n:
                total += float(model(**tensors, use_cache=False).loss) * n
                count += n
    model.train()
    return total / count if count else None


def run(ctx: StageContext) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    spec = ctx.recipe.train
    device_knob = ctx.project.params.device
    if device_knob == "cuda" and not torch.cuda.is_available():
        raise StageError("params.yaml asks for device: cuda, but torch sees no CUDA device")
    # Order matters: seed before the model is built (LoRA init draws random numbers) and before batching.
    set_seed(spec.seed)
    accelerator = Accelerator(cpu=device_knob == "cpu")
    base_dir, data_dir = ctx.input_dir("base"), ctx.input_dir("dataset")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_examples = read_split(data_dir / "train.parquet")
    eval_batches = make_batches(read_split(data_dir / "eval.parquet"), spec.batch_size, spec.packing,
                                spec.max_length, pad_id)

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if spec.method == "lora":
        lora = spec.lora
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=sorted(lora.target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=0.0)

    # Every epoch's order is drawn up front, so the schedule knows the exact number of steps.
    rng = random.Random(spec.seed)
    epochs = []
    for _ in range(spec.epochs):
        order = list(train_examples)
        rng.shuffle(order)
        epochs.append(make_batches(order, spec.batch_size, spec.packing, spec.max_length, pad_id))
    total_steps = sum(len(batches) for batches in epochs)
    if not total_steps:
        raise StageError("the train split is empty; check the dataset stage's stats.json")
    scheduler = get_linear_schedule_with_warmup(optimizer, max(1, total_steps // 20), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    curve, step, tokens, started = [], 0, 0, time.time()
    for epoch, batches in enumerate(epochs):
        for batch in batches:
            tensors = to_tensors(batch, accelerator.device)
            loss = model(**tensors, use_cache=False).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += sum(len(ids) for ids in batch.input_ids)
            curve.append((step, epoch, loss.detach().item(), scheduler.get_last_lr()[0]))
    seconds = time.time() - started
    eval_loss = evaluate_loss(model, eval_batches, accelerator.device)

    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(ctx.out_dir, safe_serialization=True)
    (ctx.out_dir / "README.md").unlink(missing_ok=True)  # peft's empty model card template
    if spec.method == "lora":
        # Stable bytes: peft writes target_modules in set order and the base as an absolute path.
        config_path = ctx.out_dir / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["target_modules"] = sorted(config["target_modules"])
        config["base_model_name_or_path"] = ctx.recipe.base.model
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    else:
        tokenizer.save_pretrained(ctx.out_dir)

    with open(ctx.out_dir / "loss.csv", "w") as f:
        f.write("step,epoch,loss,lr\n")
        f.writelines(f"{s},{e},{loss:.6f},{lr:.8g}\n" for s, e, loss, lr in curve)
    metrics = {"steps": step, "train_loss": round(curve[-1][2], 6) if curve else None,
               "eval_loss": round(eval_loss, 6) if eval_loss is not None else None,
               "train_tokens": tokens, "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
               "trainable_parameters": sum(p.numel() for p in trainable), "device": str(accelerator.device)}
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    return metrics
