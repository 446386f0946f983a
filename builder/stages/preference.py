"""preference stage: DPO on the pairs stage's pairs, a LoRA adapter over the SFT model.

Top to bottom, as train.py: setup (the seed; the accelerator; the pairs, every epoch's steps drawn
up front from the seed; the SFT model, i.e. the train stage's adapter folded into the base in fp32,
then cast to the compute dtype, with a fresh LoRA adapter of train.lora's shape on it, so the
reference model is the same weights with the adapter disabled (no second copy in memory) and the
first step's loss is exactly ln 2; the optimizer and schedule), train (builder/train/loop.py: resume
from the newest checkpoint of these exact inputs, the steps, held-out terms at step 0, every
eval_steps and at the end), save. Writes adapter_model.safetensors + adapter_config.json (merge
folds it in after the SFT adapter), steps.csv (step, epoch, loss, reward_chosen, reward_rejected,
margin, accuracy, lr), eval.csv (the same terms on the held-out pairs, and logp_accuracy) and
metrics.json, whose `held_out` holds the preference accuracy of the SFT model and of the model
after DPO (does it give chosen the higher log-probability?).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from builder.data.pairs import Pair, read_pairs
from builder.errors import StageError
from builder.files import write_json
from builder.stages import StageContext
from builder.train import loop
from builder.train.adapters import load_policy, save_adapter
from builder.train.checkpoints import checkpoint_folder
from builder.train.dpo import EVAL_TERMS, TERMS, dpo_step, draw_pair_steps, evaluate_pairs, held_out_metrics
from builder.train.setup import make_accelerator, make_trainer, pad_token_id, seed_everything


@dataclass
class Components:
    """What setup builds and the loop and save use."""

    trainer: loop.Trainer
    precision: str
    pad_id: int
    train_pairs: list[Pair]
    held_out: list[Pair]
    steps: list[tuple[int, list[Pair]]]  # every optimizer step's (epoch, pairs)


def setup(ctx: StageContext) -> Components:
    """The run's components, in the order they depend on each other."""
    from transformers import AutoTokenizer

    spec = ctx.recipe.preference
    # The seed first, as in train: the adapter's A matrices are drawn at random when it is built.
    # Then the device: its precision is the dtype the SFT model is cast to.
    seed_everything(spec.seed)
    accelerator, cuda, precision = make_accelerator(ctx.project.params.device, ctx.recipe.train)
    base_dir, pairs_dir = ctx.input_dir("base"), ctx.input_dir("pairs")
    pad_id = pad_token_id(AutoTokenizer.from_pretrained(base_dir))
    train_pairs, held_out = read_pairs(pairs_dir / "train.parquet"), read_pairs(pairs_dir / "eval.parquet")
    # The steps before the optimizer: the schedule needs their exact number.
    steps = draw_pair_steps(train_pairs, spec.batch_size, spec.epochs, spec.seed)
    if not steps:
        raise StageError("the preference train split is empty; check the pairs stage's stats.json")
    model = load_policy(ctx.recipe.train, base_dir, ctx.input_dir("train"), precision)
    # The optimizer last: it takes the new adapter's weights.
    trainer = make_trainer(model, accelerator, cuda, spec, len(steps), weight_decay=0.0)
    return Components(trainer, precision, pad_id, train_pairs, held_out, steps)


def train(ctx: StageContext, parts: Components) -> loop.Progress:
    """The loop (builder/train/loop.py) with DPO's step, and the held-out terms from step 0 on."""
    spec, trainer = ctx.recipe.preference, parts.trainer
    accelerator = trainer.accelerator
    folder = checkpoint_folder(ctx.project.cache_dir, ctx.stage.key)
    schedule = loop.Schedule(folder, ctx.project.params.checkpoint_steps, spec.eval_steps, eval_at_start=True)
    evaluate = partial(evaluate_pairs, accelerator.unwrap_model(trainer.model), parts.held_out, spec.batch_size,
                       parts.pad_id, accelerator.device, spec.beta)
    step = partial(dpo_step, trainer.model, accelerator, pad_id=parts.pad_id, beta=spec.beta)
    return loop.train_loop(trainer, parts.steps, step, evaluate, schedule)


def save(ctx: StageContext, parts: Components, progress: loop.Progress) -> dict:
    """The adapter, the CSV logs and metrics.json."""
    spec, trainer = ctx.recipe.preference, parts.trainer
    trainer.accelerator.wait_for_everyone()
    save_adapter(trainer.accelerator.unwrap_model(trainer.model), ctx.out_dir, ctx.recipe.base.model)
    loop.write_curve(ctx.out_dir / "steps.csv", TERMS, progress.curve)
    loop.write_evals(ctx.out_dir / "eval.csv", EVAL_TERMS,
                [(s, [values[k] for k in EVAL_TERMS]) for s, values in progress.evals if values])
    first, last = progress.curve[0], progress.curve[-1]  # [step, epoch, loss, ..., accuracy, lr]
    metrics = {**loop.run_metrics(trainer, len(parts.steps), parts.precision), "pairs": len(parts.train_pairs),
               "first_loss": round(first[2], 6), "train_loss": round(last[2], 6),
               "train_accuracy": round(last[2 + TERMS.index("accuracy")], 6),
               "held_out": held_out_metrics(progress.evals[-1][1]), "beta": spec.beta}
    write_json(ctx.out_dir / "metrics.json", metrics)
    loop.finish(trainer, checkpoint_folder(ctx.project.cache_dir, ctx.stage.key))
    # Speed and threads in the manifest only: metrics.json has the same bytes on every rebuild.
    pairs_done = sum(len(group) for _, group in parts.steps[progress.start:])
    return {**metrics, **loop.run_summary(trainer, progress),
            "pairs_per_second": round(pairs_done / progress.seconds, 2) if progress.seconds else None}


def run(ctx: StageContext) -> dict:
    parts = setup(ctx)
    progress = train(ctx, parts)
    return save(ctx, parts, progress)
