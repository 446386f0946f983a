"""DPO's few lines (Rafailov et al., 2023; TRL's DPOTrainer, loss_type "sigmoid"): a pair's loss on
four log-probabilities, each the sum over the answer's trained tokens.

    batch = pair_batch(pairs, pad_id)                # [chosen_1..n, rejected_1..n], right-padded
    policy = sequence_logps(model, batch, device)    # (2n,)
    terms = dpo_terms(policy, reference, beta)       # per pair: loss, rewards, margin, accuracy
    steps = draw_pair_steps(pairs, batch_size, epochs, seed)    # [(epoch, pairs)], for train/loop.py
    dpo_step(model, accelerator, pairs, pad_id, beta)           # a step's mean terms, backward done

    loss = -log sigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)))

With the policy equal to the reference (a new LoRA adapter starts at zero) every loss is ln 2.
"""
from __future__ import annotations

import random

from builder.data.pairs import Pair
from builder.templates.tokens import IGNORE_INDEX
from builder.train.batches import Batch, epoch_order, make_batches, to_tensors

TERMS = ("loss", "reward_chosen", "reward_rejected", "margin", "accuracy")
EVAL_TERMS = (*TERMS, "logp_accuracy")  # the columns of the preference stage's eval.csv


def draw_pair_steps(pairs: list, batch_size: int, epochs: int, seed: int) -> list[tuple[int, list]]:
    """Every step's (epoch, pairs), drawn up front: a seeded shuffle per epoch, batch_size pairs a step."""
    rng = random.Random(seed)
    steps = []
    for epoch in range(epochs):
        order = epoch_order(pairs, rng, shuffle=True)
        steps += [(epoch, order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    return steps


def pair_batch(pairs: list[Pair], pad_id: int) -> Batch:
    """One padded batch: every pair's prompt+chosen, then every pair's prompt+rejected."""
    rows = [(p.chosen_ids, p.chosen_labels) for p in pairs] + [(p.rejected_ids, p.rejected_labels) for p in pairs]
    width = max(len(ids) for ids, _ in rows)
    return make_batches(rows, len(rows), False, width, pad_id)[0]


def sequence_logps(model, batch: Batch, device):
    """Each row's summed log-probability of its trained tokens (labels shifted by one, as the loss does)."""
    import torch

    tensors = to_tensors(batch, device)
    labels = tensors.pop("labels")[:, 1:]
    logits = model(**tensors, use_cache=False).logits[:, :-1].float()
    mask = labels != IGNORE_INDEX
    logps = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(dim=-1)


def dpo_terms(policy, reference, beta: float) -> dict:
    """Per pair: the DPO loss, the implicit rewards beta * (policy - reference) of both answers,
    their margin and whether chosen's reward is higher (accuracy)."""
    from torch.nn.functional import logsigmoid

    policy_chosen, policy_rejected = policy.chunk(2)
    ref_chosen, ref_rejected = reference.chunk(2)
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    margin = chosen - rejected
    return {"loss": -logsigmoid(margin), "reward_chosen": chosen, "reward_rejected": rejected, "margin": margin,
            "accuracy": (margin > 0).float()}


def reference_logps(model, batch: Batch, device):
    """The reference model's log-probabilities: the SFT model, i.e. the policy with its adapter off."""
    import torch

    with torch.no_grad(), model.disable_adapter():
        return sequence_logps(model, batch, device)


def evaluate_pairs(model, pairs: list[Pair], batch_size: int, pad_id: int, device, beta: float) -> dict:
    """Mean DPO terms over held-out pairs (eval mode, no dropout), and the plain preference accuracy
    of the policy and of the reference: how often each gives chosen the higher log-probability."""
    import torch

    if not pairs:
        return {}
    sums = dict.fromkeys(TERMS, 0.0)
    wins = {"policy": 0, "reference": 0}
    gaps = {"policy": 0.0, "reference": 0.0}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = pair_batch(pairs[start:start + batch_size], pad_id)
            logps = {"policy": sequence_logps(model, batch, device), "reference": reference_logps(model, batch, device)}
            for name, value in dpo_terms(logps["policy"], logps["reference"], beta).items():
                sums[name] += float(value.sum())
            for who, value in logps.items():
                chosen, rejected = value.chunk(2)
                wins[who] += int((chosen > rejected).sum())
                gaps[who] += float((chosen - rejected).sum())
    model.train(was_training)
    n = len(pairs)
    return {**{k: v / n for k, v in sums.items()}, "pairs": n,
            "logp_accuracy": wins["policy"] / n, "logp_accuracy_reference": wins["reference"] / n,
            "logp_margin": gaps["policy"] / n, "logp_margin_reference": gaps["reference"] / n}


def dpo_step(model, accelerator, group: list[Pair], pad_id: int, beta: float) -> list[float]:
    """Forward and backward of one step's pairs (this process's share), returning the step's mean
    DPO terms (in TERMS order) over all its pairs, however they fall into processes."""
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
    return [float(v) / len(group) for v in sums.tolist()]


def held_out_metrics(final: dict) -> dict:
    """metrics.json's `held_out`: the SFT model's preference accuracy and margin against the tuned
    model's, from evaluate_pairs at the end ({} without held-out pairs)."""
    if not final:
        return {}
    return {"pairs": final["pairs"], "accuracy_sft": round(final["logp_accuracy_reference"], 6),
            "accuracy": round(final["logp_accuracy"], 6),
            "accuracy_delta": round(final["logp_accuracy"] - final["logp_accuracy_reference"], 6),
            "logp_margin_sft": round(final["logp_margin_reference"], 6), "logp_margin": round(final["logp_margin"], 6),
            "reward_accuracy": round(final["accuracy"], 6), "loss": round(final["loss"], 6)}
