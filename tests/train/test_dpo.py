"""builder/train/dpo.py without a model: the DPO terms on hand-computed log-probabilities, a row's
summed log-probability over its trained tokens, the steps drawn from the seed, the held-out metrics."""
from __future__ import annotations

import math
import random

import pytest

from builder.data.pairs import Pair
from builder.train.dpo import TERMS, dpo_terms, draw_pair_steps, held_out_metrics, pair_batch, sequence_logps


def pair(chosen_ids: list[int], rejected_ids: list[int], prompt_tokens: int = 2) -> Pair:
    """A pair whose labels are its ids after the prompt (what the pairs stage writes)."""
    def labels(ids: list[int]) -> list[int]:
        return [-100] * prompt_tokens + ids[prompt_tokens:]

    return Pair("s", "f.jsonl", 1, (), "c", "r", prompt_tokens, chosen_ids, labels(chosen_ids), rejected_ids,
                labels(rejected_ids), "d")


def test_the_loss_is_ln_2_and_every_reward_zero_when_the_policy_is_the_reference():
    import torch

    logps = torch.tensor([-12.5, -30.0, -7.25, -40.0], dtype=torch.float64)  # chosen 1, 2, then rejected 1, 2
    terms = dpo_terms(logps, logps.clone(), beta=0.1)
    assert list(terms) == list(TERMS)
    assert terms["loss"].tolist() == [math.log(2), math.log(2)]
    assert [terms[k].tolist() for k in TERMS[1:]] == [[0.0, 0.0]] * 4  # rewards, margin, accuracy (a tie loses)


def test_the_terms_of_a_hand_computed_pair_and_of_one_the_policy_gets_wrong():
    import torch

    # Pair 1: the policy raised chosen by 2 nats and lowered rejected by 1 against the reference;
    # pair 2: it lowered rejected's gap, so rejected gets the higher reward.
    policy = torch.tensor([-10.0, -20.0, -14.0, -10.0], dtype=torch.float64)
    reference = torch.tensor([-12.0, -20.0, -13.0, -12.0], dtype=torch.float64)
    terms = {k: v.tolist() for k, v in dpo_terms(policy, reference, beta=0.5).items()}
    assert terms["reward_chosen"] == [1.0, 0.0] and terms["reward_rejected"] == [-0.5, 1.0]
    assert terms["margin"] == [1.5, -1.0] and terms["accuracy"] == [1.0, 0.0]
    # -log sigmoid(m) = log(1 + e^-m)
    assert terms["loss"] == [pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-15),
                             pytest.approx(math.log1p(math.e), rel=1e-15)]


def test_a_rows_log_probability_sums_its_trained_tokens_after_the_shift():
    import torch

    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])

    class Fixed(torch.nn.Module):  # the same next-token distribution at every position
        def forward(self, input_ids, use_cache, **kwargs):
            return type("Out", (), {"logits": probs.log().expand(*input_ids.shape, 4).clone()})

    batch = pair_batch([pair([0, 1, 2, 3], [0, 1, 1])], pad_id=0)
    assert batch.input_ids == [[0, 1, 2, 3], [0, 1, 1, 0]] and batch.labels[1] == [-100, -100, 1, -100]
    logps = sequence_logps(Fixed(), batch, "cpu").tolist()
    # chosen predicts tokens 2 and 3 (the prompt's two tokens carry no loss); rejected token 1, not its padding
    assert logps == [pytest.approx(math.log(0.3) + math.log(0.4), abs=1e-6), pytest.approx(math.log(0.2), abs=1e-6)]


def test_steps_are_drawn_up_front_one_shuffle_per_epoch_from_one_seeded_rng():
    pairs = list(range(10))
    steps = draw_pair_steps(pairs, batch_size=4, epochs=2, seed=7)
    rng = random.Random(7)
    first, second = list(pairs), list(pairs)
    rng.shuffle(first)
    rng.shuffle(second)  # the second epoch continues the same generator: a new order
    assert steps == [(0, first[:4]), (0, first[4:8]), (0, first[8:]), (1, second[:4]), (1, second[4:8]),
                     (1, second[8:])]
    assert first != second and first != pairs
    assert draw_pair_steps(pairs, 4, 2, 7) == steps


def test_held_out_metrics_compare_the_sft_model_with_the_tuned_one():
    final = {"loss": 0.61234567, "reward_chosen": 0.1, "reward_rejected": -0.2, "margin": 0.3, "accuracy": 0.75,
             "pairs": 8, "logp_accuracy": 0.875, "logp_accuracy_reference": 0.5, "logp_margin": 12.3456789,
             "logp_margin_reference": 3.0000004}
    assert held_out_metrics(final) == {
        "pairs": 8, "accuracy_sft": 0.5, "accuracy": 0.875, "accuracy_delta": 0.375, "logp_margin_sft": 3.0,
        "logp_margin": 12.345679, "reward_accuracy": 0.75, "loss": 0.612346}
    assert held_out_metrics({}) == {}  # no held-out pairs
