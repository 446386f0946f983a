"""builder/train/loop.py on a one-weight-matrix model (no transformers): the curve and eval rows it
keeps, a run killed after a checkpoint resuming to the same curve and weights, and the CSV bytes."""
from __future__ import annotations

import pytest

import builder.train.loop as loop
from builder.train.checkpoints import save_checkpoint
from builder.train.loop import Schedule, Trainer, finish, train_loop, write_curve, write_evals
from builder.train.sft import group_steps

STEPS = 7  # two epochs of 4 and 3 batches


class OneProcess:
    """The few accelerator calls the loop makes, for one process on CPU."""

    device, num_processes, process_index, is_main_process = "cpu", 1, 0, True

    def clip_grad_norm_(self, parameters, max_norm: float) -> None:
        import torch

        torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def unwrap_model(self, model):
        return model

    def wait_for_everyone(self) -> None:
        pass


def new_trainer() -> Trainer:
    """A linear model, AdamW and a linear schedule with one warmup step, built from seed 0 (as a
    stage seeds before it builds its model)."""
    import torch
    from transformers import get_scheduler

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    trainable = list(model.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=0.05)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=STEPS)
    return Trainer(model, OneProcess(), optimizer, scheduler, trainable, False, 1.0)


def run(trainer: Trainer, folder, eval_steps: int | None = 2) -> loop.Progress:
    import torch

    data = torch.Generator().manual_seed(1)
    steps = [(int(i >= 4), (torch.randn(8, 4, generator=data), torch.randn(8, generator=data))) for i in range(STEPS)]
    held_out = (torch.randn(8, 4, generator=data), torch.randn(8, generator=data))

    def step(work) -> list[float]:
        x, y = work
        noise = 0.1 * torch.randn_like(x)  # from the global RNG, as dropout: a resumed run must restore it
        loss = ((trainer.model(x + noise).squeeze(-1) - y) ** 2).mean()
        loss.backward()
        return [loss.item()]

    def evaluate() -> float:
        with torch.no_grad():
            return ((trainer.model(held_out[0]).squeeze(-1) - held_out[1]) ** 2).mean().item()

    return train_loop(trainer, steps, step, evaluate, Schedule(folder, 3, eval_steps, eval_at_start=True))


def test_the_curve_holds_step_epoch_terms_and_lr_and_evals_come_on_schedule(tmp_path):
    trainer = new_trainer()
    progress = run(trainer, tmp_path / "ckpt")
    assert [row[:2] for row in progress.curve] == [[1, 0], [2, 0], [3, 0], [4, 0], [5, 1], [6, 1], [7, 1]]
    assert [len(row) for row in progress.curve] == [4] * STEPS
    # One warmup step from 0, then linear decay to 0 at step 8: the lr each step used.
    assert [row[3] for row in progress.curve] == pytest.approx([0.0, 0.05, 0.05 * 5 / 6, 0.05 * 4 / 6, 0.05 * 3 / 6,
                                                                0.05 * 2 / 6, 0.05 / 6], rel=1e-12)
    assert [s for s, _ in progress.evals] == [0, 2, 4, 6, 7]  # at the start, every 2 steps but the last, the end
    assert progress.start == 0 and progress.evals[-1][1] < progress.evals[0][1]  # it learned
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-00000006"]  # steps 3 and 6; the newest kept
    finish(trainer, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_curve_evals_and_weights(tmp_path, monkeypatch):
    import torch

    whole = new_trainer()
    reference = run(whole, tmp_path / "ref")

    def save_then_die(folder, step, state):
        save_checkpoint(folder, step, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(new_trainer(), tmp_path / "cut")
    monkeypatch.undo()
    torch.manual_seed(99)  # the RNG state of another process: the checkpoint must bring back its own
    resumed_trainer = new_trainer()
    torch.randn(100)
    resumed = run(resumed_trainer, tmp_path / "cut")
    assert resumed.start == 3
    assert resumed.curve == reference.curve and resumed.evals == reference.evals
    for ours, theirs in zip(resumed_trainer.trainable, whole.trainable):
        assert torch.equal(ours, theirs)


def test_the_logs_have_the_same_bytes_whether_rows_are_lists_or_tuples(tmp_path):
    rows = [[1, 0, 0.6931471805599453, 0.0], (2, 1, 0.5, 2.5e-4), [9, 1, 6.5488251, 1e-3 / 14]]
    write_curve(tmp_path / "loss.csv", ("loss",), rows)
    assert (tmp_path / "loss.csv").read_text() == ("step,epoch,loss,lr\n1,0,0.693147,0\n2,1,0.500000,0.00025\n"
                                                   "9,1,6.548825,7.1428571e-05\n")
    write_evals(tmp_path / "eval.csv", ("loss", "margin"), [(0, [0.6931471805599453, 0.0]), [6, (0.25, -1.0)]])
    assert (tmp_path / "eval.csv").read_text() == "step,loss,margin\n0,0.693147,0.000000\n6,0.250000,-1.000000\n"


def test_sft_steps_take_micro_batches_across_epoch_ends_and_carry_the_last_ones_epoch():
    epochs = [["a", "b", "c"], ["d", "e", "f"]]
    assert group_steps(epochs, 4) == [(1, ["a", "b", "c", "d"]), (1, ["e", "f"])]
    assert group_steps(epochs, 2) == [(0, ["a", "b"]), (1, ["c", "d"]), (1, ["e", "f"])]
    assert group_steps([[]], 2) == []
