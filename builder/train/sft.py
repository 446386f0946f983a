"""Supervised fine-tuning's part of the loop: its steps, one step's forward and backward, the eval loss.

    steps = group_steps(draw_epochs(...), gradient_accumulation * processes)  # [(epoch, micro-batches)]
    [loss] = sft_step(model, accelerator, micro_batches)                     # backward done, not stepped
    evaluate_loss(model, eval_batches, device)                              # mean per trained token

The loss of a step is the mean over all its trained tokens, however they fall into micro-batches
and processes.
"""
from __future__ import annotations

import random

from builder.train.batches import Batch, epoch_order, make_batches, padding_fraction, to_tensors, trained_tokens


def group_steps(epochs: list[list[Batch]], per_step: int) -> list[tuple[int, list[Batch]]]:
    """Every optimizer step's (epoch, micro-batches): `per_step` micro-batches in a row, across epoch
    ends; a step's epoch is that of its last micro-batch."""
    micro = [(epoch, batch) for epoch, batches in enumerate(epochs) for batch in batches]
    groups = [micro[i:i + per_step] for i in range(0, len(micro), per_step)]
    return [(group[-1][0], [batch for _, batch in group]) for group in groups]


def step_tokens(batches: list[Batch]) -> int:
    """Tokens a step feeds the model, padding included (what tokens_per_second counts)."""
    return sum(len(ids) for batch in batches for ids in batch.input_ids)


def sft_step(model, accelerator, group: list[Batch]) -> list[float]:
    """Forward and backward of one step's micro-batches (under a multi-process launch, process r
    takes micro-batches r, r+W, ... of W processes); returns [the step's loss]."""
    import torch

    world, rank = accelerator.num_processes, accelerator.process_index
    # DDP averages gradients over processes: each micro-batch weighs its share of the step's
    # trained tokens, times `world`.
    window = sum(trained_tokens(batch) for batch in group)
    share = group[rank::world]
    step_loss = 0.0
    for batch in share or group[:1]:
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
    return [step_loss]


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


def padding_report(examples: list, spec, pad_id: int, shuffle: bool) -> dict:
    """The padding fraction of the first epoch with and without packing (what packing saves)."""
    order = epoch_order(examples, random.Random(spec.seed), shuffle)
    return {f"padding_fraction_{name}": padding_fraction(make_batches(order, spec.batch_size, packing,
                                                                      spec.max_length, pad_id))
            for name, packing in (("packed", True), ("unpacked", False))}
