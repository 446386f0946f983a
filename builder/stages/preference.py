"""preference stage: DPO on the pairs stage's pairs, a LoRA adapter over the SFT model.

Top to bottom, as train.py: read the pairs and draw every epoch's batches up front from the seed;
build the SFT model (the train stage's adapter folded into the base in fp32, then cast to the
compute dtype) and put a fresh LoRA adapter of train.lora's shape on it, so the reference model is
the same weights with the adapter disabled (no second copy in memory) and the first step's loss is
exactly ln 2; set up the optimizer and schedule; resume from the newest checkpoint of these exact
inputs; loop; save. Writes adapter_model.safetensors + adapter_config.json (merge folds it in after
the SFT adapter), steps.csv (step, epoch, loss, reward_chosen, reward_rejected, margin, accuracy,
lr), eval.csv (the same terms on the held-out pairs, at step 0, every eval_steps and at the end)
and metrics.json, whose `held_out` holds the preference accuracy of the SFT model and of the model
after DPO (does it give chosen the higher log-probability?).
"""
from __future__ import annotations

import random
import time
from pathlib import Path

from builder.data.pairs import read_pairs
from builder.errors import StageError
from builder.files import write_json
from builder.stages import StageContext
from builder.stages.merge import load_sft_model
from builder.stages.train import (
    checkpoint_state,
    epoch_order,
    make_accelerator,
    make_optimizer,
    optimizer_step,
    pad_token_id,
    restore_checkpoint,
    save_adapter,
    write_csv,
)
from builder.train.checkpoints import checkpoint_folder, clear_checkpoints, load_latest, save_checkpoint
from builder.train.dpo import TERMS, dpo_terms, evaluate_pairs, pair_batch, reference_logps, sequence_logps

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_policy(spec, base_dir: Path, train_dir: Path, precision: str):
    """The SFT model in the compute dtype with a new LoRA adapter of train.lora's shape (`spec`: the
    recipe's train section); the adapter is zero at start, so the policy equals the reference."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = load_sft_model(base_dir, train_dir).to(getattr(torch, DTYPES[precision]))
    model.config.use_cache = False
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = spec.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=sorted(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def draw_steps(pairs: list, batch_size: int, epochs: int, seed: int) -> list[tuple[int, list]]:
    """Every step's (epoch, pairs), drawn up front: a seeded shuffle per epoch, batch_size pairs a step."""
    rng = random.Random(seed)
    steps = []
    for epoch in range(epochs):
        order = epoch_order(pairs, rng, shuffle=True)
        steps += [(epoch, order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    return steps


def train_step(model, accelerator, group: list, pad_id: int, beta: float) -> dict:
    """Forward and backward of one step's pairs (this process's share), returning the step's mean
    DPO terms over all its pairs, however they fall into processes."""
    import torch

    world, rank = accelerator.num_processes, accelerator.process_index
    share = group[rank::world]
    sums = torch.zeros(len(TERMS), device=accelerator.device)
    if share:
        batch = pair_batch(share, pad_id)
        reference = reference_logps(accelerator.unwrap_model(model), batch, accelerator.device)
        terms = dpo_terms(sequence_logps(model, batch, accelerator.device), reference, beta)
        # DDP averages gradients over processes: the mean over the step's pairs needs `* world`.
        accelerator.backward(terms["loss"].sum() / len(group) * world)
        sums = torch.stack([terms[name].detach().sum() for name in TERMS])
    else:  # a process with no pair still joins the gradient all-reduce (a forward and backward), with zero weight
        accelerator.backward(sequence_logps(model, pair_batch(group[:1], pad_id), accelerator.device).sum() * 0.0)
    if world > 1:
        sums = accelerator.reduce(sums, "sum")
    return dict(zip(TERMS, (float(v) / len(group) for v in sums.tolist())))


def eval_row(step: int, values: dict) -> tuple | None:
    """A line of eval.csv: the held-out pairs' mean DPO terms and plain preference accuracy."""
    return (step, *(values[k] for k in (*TERMS, "logp_accuracy"))) if values else None


def run(ctx: StageContext) -> dict:
    import torch
    from transformers import AutoTokenizer

    spec = ctx.recipe.preference
    # Order matters, as in train: seed before the adapter is built (its A matrices are drawn at random).
    accelerator, cuda, precision = make_accelerator(ctx, spec.seed)
    base_dir, pairs_dir = ctx.input_dir("base"), ctx.input_dir("pairs")
    pad_id = pad_token_id(AutoTokenizer.from_pretrained(base_dir))
    train_pairs, held_out = read_pairs(pairs_dir / "train.parquet"), read_pairs(pairs_dir / "eval.parquet")
    steps = draw_steps(train_pairs, spec.batch_size, spec.epochs, spec.seed)
    if not steps:
        raise StageError("the preference train split is empty; check the pairs stage's stats.json")

    model = load_policy(ctx.recipe.train, base_dir, ctx.input_dir("train"), precision)
    model, optimizer, scheduler, trainable = make_optimizer(model, accelerator, spec, len(steps), weight_decay=0.0)
    unwrapped = accelerator.unwrap_model(model)

    def held_out_terms() -> dict:
        return evaluate_pairs(unwrapped, held_out, spec.batch_size, pad_id, accelerator.device, spec.beta)

    # Resume: an interrupted run of these exact inputs left a checkpoint under the stage key.
    folder = checkpoint_folder(ctx.project.cache_dir, ctx.stage.key)
    state = load_latest(folder)
    if state is not None:
        restore_checkpoint(state, model, accelerator, optimizer, scheduler, cuda)
        curve, evals, start = state["curve"], state["evals"], state["step"]
    else:
        curve, evals, start = [], [eval_row(0, held_out_terms())], 0

    started, every = time.time(), ctx.project.params.checkpoint_steps
    for index in range(start, len(steps)):
        epoch, group = steps[index]
        terms = train_step(model, accelerator, group, pad_id, spec.beta)
        lr = optimizer_step(accelerator, trainable, optimizer, scheduler, spec.max_grad_norm)
        step = index + 1
        curve.append((step, epoch, *(terms[k] for k in TERMS), lr))
        if spec.eval_steps and step % spec.eval_steps == 0 and step < len(steps):
            evals.append(eval_row(step, held_out_terms()))
        if step % every == 0 and step < len(steps) and accelerator.is_main_process:
            save_checkpoint(folder, step, checkpoint_state(model, accelerator, optimizer, scheduler, cuda,
                                                           curve=curve, evals=evals))
    seconds = time.time() - started
    final = held_out_terms()
    evals.append(eval_row(len(steps), final))

    accelerator.wait_for_everyone()
    save_adapter(unwrapped, ctx.out_dir, ctx.recipe.base.model)
    names = ",".join(TERMS)
    write_csv(ctx.out_dir / "steps.csv", f"step,epoch,{names},lr",
              [f"{s},{e}," + ",".join(f"{v:.6f}" for v in values) + f",{lr:.8g}" for s, e, *values, lr in curve])
    write_csv(ctx.out_dir / "eval.csv", f"step,{names},logp_accuracy",
              [",".join([str(row[0]), *(f"{v:.6f}" for v in row[1:])]) for row in evals if row is not None])
    held = {}
    if final:
        held = {"pairs": final["pairs"], "accuracy_sft": round(final["logp_accuracy_reference"], 6),
                "accuracy": round(final["logp_accuracy"], 6),
                "accuracy_delta": round(final["logp_accuracy"] - final["logp_accuracy_reference"], 6),
                "logp_margin_sft": round(final["logp_margin_reference"], 6), "logp_margin": round(final["logp_margin"], 6),
                "reward_accuracy": round(final["accuracy"], 6), "loss": round(final["loss"], 6)}
    metrics = {"steps": len(steps), "pairs": len(train_pairs), "first_loss": round(curve[0][2], 6),
               "train_loss": round(curve[-1][2], 6), "train_accuracy": round(curve[-1][6], 6), "held_out": held,
               "trainable_parameters": sum(p.numel() for p in trainable), "device": str(accelerator.device),
               "precision": precision, "beta": spec.beta}
    write_json(ctx.out_dir / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        clear_checkpoints(folder)
    # Speed and threads in the manifest only: metrics.json has the same bytes on every rebuild.
    return {**metrics, "resumed_from_step": start, "processes": accelerator.num_processes,
            "pairs_per_second": round(sum(len(g) for _, g in steps[start:]) / seconds, 2) if seconds else None,
            "torch_threads": torch.get_num_threads()}
