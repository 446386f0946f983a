"""train stage: LoRA, QLoRA or full fine-tuning of the base model on the dataset stage's train split.

Top to bottom: setup (the seed; the accelerator and precision; the data, every epoch's batches
drawn up front, packed or padded; the model in the precision the device allows, wrapped with
LoRA adapters or a 4-bit base for QLoRA; the optimizer and schedule), train (builder/train/loop.py:
resume from the newest checkpoint if an earlier run of these exact inputs was interrupted,
gradient accumulation, clipping, NEFTune noise, periodic eval loss, checkpoints), save. Writes
adapter_model.safetensors + adapter_config.json (or the full model), metrics.json (losses, tokens,
speed, padding), loss.csv (step, epoch, loss, lr) and eval.csv (step, eval_loss) for `dvc plots`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from builder.errors import StageError
from builder.files import write_json
from builder.stages import StageContext
from builder.train import loop
from builder.train.adapters import save_adapter
from builder.train.batches import Batch, draw_epochs, make_batches, read_split
from builder.train.checkpoints import checkpoint_folder
from builder.train.setup import add_neftune, load_model, make_accelerator, make_trainer, pad_token_id, seed_everything
from builder.train.sft import evaluate_loss, group_steps, padding_report, sft_step, step_tokens


@dataclass
class Components:
    """What setup builds and the loop and save use."""

    trainer: loop.Trainer
    precision: str
    tokenizer: Any
    pad_id: int
    train_examples: list  # the train split, in train.parquet's order
    eval_batches: list[Batch]
    steps: list[tuple[int, list[Batch]]]  # every optimizer step's (epoch, micro-batches)
    micro_batches: int


def setup(ctx: StageContext) -> Components:
    """The run's components, in the order they depend on each other."""
    from transformers import AutoTokenizer

    spec = ctx.recipe.train
    # The seed first: LoRA's A matrices are drawn when the adapter is built, and dropout and NEFTune
    # noise draw from the same generator in every step. Then the device: its precision is the dtype
    # the model loads in.
    seed_everything(spec.seed)
    accelerator, cuda, precision = make_accelerator(ctx.project.params.device, spec)
    base_dir, data_dir = ctx.input_dir("base"), ctx.input_dir("dataset")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = pad_token_id(tokenizer)
    train_examples = read_split(data_dir / "train.parquet")
    eval_batches = make_batches(read_split(data_dir / "eval.parquet"), spec.batch_size, spec.packing,
                                spec.max_length, pad_id)
    # Every step's batches before the optimizer: the schedule needs the exact number of steps. One
    # step takes gradient_accumulation micro-batches from each of the accelerator's processes.
    epochs = draw_epochs(train_examples, spec, pad_id, ctx.recipe.mixture.order == "shuffle")
    steps = group_steps(epochs, spec.gradient_accumulation * accelerator.num_processes)
    if not steps:
        raise StageError("the train split is empty; check the dataset stage's stats.json")
    model = load_model(spec, base_dir, precision)
    if spec.neftune_alpha is not None:
        add_neftune(model, spec.neftune_alpha)
    # The optimizer last: it takes the trainable weights, which exist once the model is wrapped.
    trainer = make_trainer(model, accelerator, cuda, spec, len(steps), spec.weight_decay)
    return Components(trainer, precision, tokenizer, pad_id, train_examples, eval_batches, steps,
                      sum(len(batches) for batches in epochs))


def train(ctx: StageContext, parts: Components) -> loop.Progress:
    """The loop (builder/train/loop.py) with SFT's step and eval loss."""
    trainer, spec = parts.trainer, ctx.recipe.train
    folder = checkpoint_folder(ctx.project.cache_dir, ctx.stage.key)
    schedule = loop.Schedule(folder, ctx.project.params.checkpoint_steps, spec.eval_steps)
    return loop.train_loop(trainer, parts.steps, partial(sft_step, trainer.model, trainer.accelerator),
                      partial(evaluate_loss, trainer.model, parts.eval_batches, trainer.accelerator.device), schedule)


def save(ctx: StageContext, parts: Components, progress: loop.Progress) -> dict:
    """The model (an adapter, or the whole model and its tokenizer), the CSV logs and metrics.json."""
    spec, trainer, out = ctx.recipe.train, parts.trainer, ctx.out_dir
    trainer.accelerator.wait_for_everyone()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if spec.method in ("lora", "qlora"):
        save_adapter(unwrapped, out, ctx.recipe.base.model)
    else:
        unwrapped.save_pretrained(out, safe_serialization=True)
        parts.tokenizer.save_pretrained(out)
    loop.write_curve(out / "loss.csv", ("loss",), progress.curve)
    loop.write_evals(out / "eval.csv", ("eval_loss",), [(s, [loss]) for s, loss in progress.evals if loss is not None])
    shuffle = ctx.recipe.mixture.order == "shuffle"
    padding = padding_report(parts.train_examples, spec, parts.pad_id, shuffle)  # the first epoch, packed and not
    padding["padding_fraction"] = padding["padding_fraction_packed" if spec.packing else "padding_fraction_unpacked"]
    eval_loss = progress.evals[-1][1]
    tokens_now = sum(step_tokens(batches) for _, batches in parts.steps[progress.start:])  # this run's
    metrics = {**loop.run_metrics(trainer, len(parts.steps), parts.precision), "micro_batches": parts.micro_batches,
               "train_loss": round(progress.curve[-1][2], 6),
               "eval_loss": round(eval_loss, 6) if eval_loss is not None else None,
               "train_tokens": sum(step_tokens(batches) for _, batches in parts.steps),
               "tokens_per_second": round(tokens_now / progress.seconds, 1) if progress.seconds else None, **padding}
    write_json(out / "metrics.json", metrics)
    loop.finish(trainer, checkpoint_folder(ctx.project.cache_dir, ctx.stage.key))
    return {**metrics, **loop.run_summary(trainer, progress)}


def run(ctx: StageContext) -> dict:
    parts = setup(ctx)
    progress = train(ctx, parts)
    return save(ctx, parts, progress)
