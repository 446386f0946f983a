"""The one training loop, for SFT (train stage) and DPO (preference stage): resume from the newest
checkpoint, the steps, eval every N steps, periodic checkpoints, then the CSV logs and metrics.

    trainer = make_trainer(model, accelerator, cuda, spec, len(steps), weight_decay)   # train/setup.py
    progress = train_loop(trainer, steps, train_step, evaluate, Schedule(...))
    write_curve(out_dir / "loss.csv", ("loss",), progress.curve)
    finish(trainer, schedule.folder)                                                 # outputs written

A stage passes in what differs. `steps` is every optimizer step's (epoch, work), drawn up front
from the seed; `train_step(work)` runs that step's forward and backward and returns its loss
terms (SFT: [loss]; DPO: loss, rewards, margin, accuracy); `evaluate()` measures the model on
held-out data (SFT: the eval loss, DPO: a dict of terms) and is stored as is. The curve holds
[step, epoch, *terms, lr] per step and the evals [step, value]; a checkpoint stores both (as JSON,
so rows come back as lists: rows are lists from the start, and a resumed run is the same run).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.files import write_atomic
from builder.train.checkpoints import clear_checkpoints, load_latest, save_checkpoint


@dataclass
class Trainer:
    """What every step touches: the prepared model and optimizer, the schedule, the weights it trains."""

    model: Any
    accelerator: Any
    optimizer: Any
    scheduler: Any
    trainable: list
    cuda: bool
    max_grad_norm: float | None


@dataclass(frozen=True)
class Schedule:
    """When the loop evaluates and checkpoints, and where checkpoints go (keyed by the stage key)."""

    folder: Path
    checkpoint_steps: int
    eval_steps: int | None  # also evaluated once at the end, always
    eval_at_start: bool = False  # DPO: the held-out terms of the SFT model itself, at step 0


@dataclass
class Progress:
    """What a run has done: what a checkpoint saves besides the model, optimizer and RNG states."""

    start: int = 0  # the step this run resumed from (0: a fresh run)
    curve: list[list] = field(default_factory=list)  # per step: [step, epoch, *terms, lr]
    evals: list[list] = field(default_factory=list)  # [step, evaluate()'s value]
    seconds: float = 0.0  # wall time of this run's steps (a timing: manifests only)


def optimizer_step(trainer: Trainer) -> float:
    """Clip, step and advance the schedule; return the learning rate this step used."""
    if trainer.max_grad_norm is not None:
        trainer.accelerator.clip_grad_norm_(trainer.trainable, trainer.max_grad_norm)
    lr = trainer.scheduler.get_last_lr()[0]
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return lr


def checkpoint_state(trainer: Trainer, progress: Progress) -> dict:
    """Everything the rest of a run depends on (see builder/train/checkpoints.py)."""
    import torch

    named = trainer.accelerator.unwrap_model(trainer.model).named_parameters()
    return {"trainable": {n: p.detach().cpu().clone() for n, p in named if p.requires_grad},
            "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if trainer.cuda else None,
            "curve": progress.curve, "evals": progress.evals}


def resume(trainer: Trainer, folder: Path) -> Progress:
    """Put the newest checkpoint's weights, optimizer, schedule and RNG states back in place, and
    return its progress; a fresh Progress when an earlier run of these inputs left none."""
    import torch

    state = load_latest(folder)
    if state is None:
        return Progress()
    named = dict(trainer.accelerator.unwrap_model(trainer.model).named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            named[name].copy_(value)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if trainer.cuda and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return Progress(start=state["step"], curve=state["curve"], evals=state["evals"])


def train_loop(trainer: Trainer, steps: list[tuple[int, Any]], train_step: Callable[[Any], list[float]],
               evaluate: Callable[[], Any], schedule: Schedule) -> Progress:
    """Run the steps not yet done, evaluating and checkpointing on schedule, then evaluate at the end."""
    progress = resume(trainer, schedule.folder)
    if progress.start == 0 and schedule.eval_at_start:
        progress.evals.append([0, evaluate()])
    started = time.time()
    for index in range(progress.start, len(steps)):
        epoch, work = steps[index]
        terms = train_step(work)
        lr = optimizer_step(trainer)
        step = index + 1
        progress.curve.append([step, epoch, *terms, lr])
        if step == len(steps):
            break  # the last step: evaluated below, and nothing is left to resume
        if schedule.eval_steps and step % schedule.eval_steps == 0:
            progress.evals.append([step, evaluate()])
        if step % schedule.checkpoint_steps == 0 and trainer.accelerator.is_main_process:
            save_checkpoint(schedule.folder, step, checkpoint_state(trainer, progress))
    progress.seconds = time.time() - started
    progress.evals.append([len(steps), evaluate()])
    return progress


def finish(trainer: Trainer, folder: Path) -> None:
    """Once every process has written its outputs: the checkpoints are no longer needed."""
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        clear_checkpoints(folder)


def write_csv(path: Path, header: str, rows: list[str]) -> None:
    write_atomic(path, "".join(f"{line}\n" for line in [header, *rows]))


def write_curve(path: Path, terms: tuple[str, ...], curve: list[list]) -> None:
    """A per-step log for `dvc plots`: step, epoch, the step's terms (6 decimals), lr."""
    write_csv(path, ",".join(("step", "epoch", *terms, "lr")),
              [f"{s},{e}," + ",".join(f"{v:.6f}" for v in values) + f",{lr:.8g}" for s, e, *values, lr in curve])


def write_evals(path: Path, terms: tuple[str, ...], rows: list[tuple[int, list[float]]]) -> None:
    """eval.csv for `dvc plots`: step and the held-out terms (6 decimals)."""
    write_csv(path, ",".join(("step", *terms)),
              [",".join([str(s), *(f"{v:.6f}" for v in values)]) for s, values in rows])


def run_metrics(trainer: Trainer, steps: int, precision: str) -> dict:
    """What every training stage's metrics.json holds (the same bytes on every rebuild)."""
    return {"steps": steps, "trainable_parameters": sum(p.numel() for p in trainer.trainable),
            "device": str(trainer.accelerator.device), "precision": precision}


def run_summary(trainer: Trainer, progress: Progress) -> dict:
    """What only the manifest records: how this run went, which differs between rebuilds.
    CPU results depend on the thread count (GEMM kernels split sums by thread): recorded, so two
    manifests show whether their bytes could be expected to match."""
    import torch

    return {"resumed_from_step": progress.start, "processes": trainer.accelerator.num_processes,
            "torch_threads": torch.get_num_threads()}
