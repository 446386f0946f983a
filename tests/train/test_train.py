"""The train stage's options on CPU, on the tiny random Llama of conftest.py (seconds per build):
resume after an interruption gives the same adapter, gradient accumulation, schedules, NEFTune,
gradient checkpointing, full fine-tuning, padding report, eval curve, and QLoRA refused on CPU."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from helpers import REPO

from builder.engine.build import build_recipe
from builder.errors import RecipeError
from builder.recipe.project import load_project
from builder.train.batches import make_batches, to_tensors


def train(root: Path) -> dict:
    build_recipe(load_project(root), "r", "train")
    return json.loads((root / "build/r/train/manifest.json").read_text())


def curve(root: Path, name: str = "loss.csv") -> list[dict]:
    with open(root / "build/r/train" / name) as f:
        return list(csv.DictReader(f))


def test_an_interrupted_train_resumes_to_the_same_adapter(tmp_path, train_project, monkeypatch,
                                                          die_at_first_checkpoint):
    reference = train_project(tmp_path / "ref", checkpoint_steps=3)
    assert train(reference)["summary"]["resumed_from_step"] == 0
    root = train_project(tmp_path / "cut", checkpoint_steps=3)
    saves = die_at_first_checkpoint()  # the run dies right after its first checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(root)
    assert [p.name for p in saves] == ["step-00000003"] and not (root / "build/r/train").exists()
    monkeypatch.undo()
    manifest = train(root)
    assert manifest["summary"]["resumed_from_step"] == 3 and manifest["summary"]["steps"] == 9
    for name in ("adapter_model.safetensors", "adapter_config.json", "loss.csv", "eval.csv"):
        assert (root / "build/r/train" / name).read_bytes() == (reference / "build/r/train" / name).read_bytes(), name
    assert not list((root / ".tunefile").glob("checkpoints/*"))  # cleared once the stage is done


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path, train_project):
    big = train_project(tmp_path / "big", "  max_grad_norm: null")
    small = train_project(tmp_path / "small", "  max_grad_norm: null\n  gradient_accumulation: 2")
    (small / "recipes" / "r.yaml").write_text((small / "recipes" / "r.yaml").read_text().replace("batch_size: 4",
                                                                                                 "batch_size: 2"))
    a, b = train(big)["summary"], train(small)["summary"]
    assert (a["steps"], b["steps"], b["micro_batches"]) == (9, 9, 18)
    for x, y in zip(curve(big), curve(small)):
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), abs=2e-4)


WARMUP = [0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3]  # 18 steps, warmup_ratio 0.2: 4 warmup steps from 0


@pytest.mark.parametrize("scheduler,check", [
    ("linear", lambda lrs: lrs[-1] == pytest.approx(1e-3 / 14) and all(a > b for a, b in zip(lrs[4:], lrs[5:]))),
    ("cosine", lambda lrs: lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 - 0.974928), rel=1e-3)
     and lrs[11] == pytest.approx(5e-4)),
    ("constant", lambda lrs: lrs[4:] == [pytest.approx(1e-3)] * 14),
])
def test_schedules_with_warmup(tmp_path, train_project, scheduler, check):
    root = train_project(tmp_path / scheduler, f"  scheduler: {scheduler}\n  warmup_ratio: 0.2\n  epochs: 2")
    train(root)
    lrs = [float(row["lr"]) for row in curve(root)]
    assert len(lrs) == 18 and lrs[:5] == [pytest.approx(x) for x in WARMUP] and check(lrs)


def test_neftune_changes_the_training_loss_but_not_the_eval_loss(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    from builder.train.setup import add_neftune

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    batch = to_tensors(make_batches([([5, 17, 99, 250, 31, 8, 40], [-100, -100, 99, 250, 31, 8, 40])], 1, True,
                                    64, 0)[0], "cpu")
    with torch.no_grad():
        model.eval()
        clean = float(model(**batch).loss)
        handle = add_neftune(model, 5.0)
        assert float(model(**batch).loss) == clean  # eval mode: no noise
        model.train()
        torch.manual_seed(0)
        noisy = float(model(**batch).loss)
        handle.remove()
        assert float(model(**batch).loss) == pytest.approx(clean, abs=1e-6) and abs(noisy - clean) > 1e-4


def test_packing_on_and_off_give_the_same_loss_for_one_example(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    example = [([5, 17, 99, 250, 31, 8, 40], [-100, -100, 99, 250, 31, 8, 40])]
    with torch.no_grad():
        losses = [float(model(**to_tensors(make_batches(example, 1, packing, 64, 0)[0], "cpu")).loss)
                  for packing in (True, False)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_gradient_checkpointing_and_neftune_train(tmp_path, train_project):
    plain = train_project(tmp_path / "plain")
    ckpt = train_project(tmp_path / "ckpt", "  gradient_checkpointing: true")
    noisy = train_project(tmp_path / "noisy", "  neftune_alpha: 5.0")
    for root in (plain, ckpt, noisy):
        train(root)
    loss = [[float(r["loss"]) for r in curve(root)] for root in (plain, ckpt, noisy)]
    assert loss[0] == pytest.approx(loss[1], abs=1e-5)  # recomputing activations changes nothing
    assert loss[0][0] == pytest.approx(loss[2][0], abs=0.1) and loss[0] != loss[2]  # noise moves every step


def test_full_fine_tuning_saves_a_whole_model(tmp_path, train_project):
    root = train_project(tmp_path / "full", "  method: full")
    summary = train(root)["summary"]
    out = root / "build/r/train"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    assert summary["trainable_parameters"] > 100_000


def test_metrics_report_padding_and_an_eval_curve(tmp_path, train_project):
    root = train_project(tmp_path / "m", "  eval_steps: 3")
    recipe = root / "recipes" / "r.yaml"  # rows of up to 256 tokens hold several examples each
    recipe.write_text(recipe.read_text().replace("max_length: 96", "max_length: 256"))
    summary = train(root)["summary"]
    assert summary["padding_fraction"] == summary["padding_fraction_unpacked"] > summary["padding_fraction_packed"]
    assert [int(r["step"]) for r in curve(root, "eval.csv")] == [3, 6, 9]
    metrics = json.loads((root / "build/r/train/metrics.json").read_text())
    assert metrics["precision"] == "fp32" and "resumed_from_step" not in metrics


def test_qlora_on_a_machine_without_cuda_fails_validation_with_file_and_line(tmp_path, train_project):
    root = train_project(tmp_path / "q", "  method: qlora")
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+: train.method: qlora needs a CUDA GPU"):
        load_project(root).load_recipe("r")


def test_two_processes_train_like_one_with_accumulation(tmp_path, train_project):
    """params.yaml `launch: {num_processes: 2}`: `tunefile stage train` starts accelerate launch with
    2 CPU processes (gloo DDP); each trains its share of every step; rank 0 alone publishes. The
    same adapter as one process accumulating over the same micro-batches, within float tolerance:
    not bit for bit, since each launched process runs on one thread and gradients are summed across
    processes in another order, and CPU GEMM results depend on both."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    one = train_project(tmp_path / "one", "  gradient_accumulation: 2")
    train(one)
    two = train_project(tmp_path / "two")
    build_recipe(load_project(two), "r", "dataset")
    with open(two / "params.yaml", "a") as f:
        f.write("launch: {num_processes: 2}\n")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([str(bin_dir / "tunefile"), "stage", "train", "r"],
                          cwd=two, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "r/train: accelerate launch --multi_gpu --num_processes 2" in done.stderr
    assert done.stdout.count("r/train: built") == 1  # rank 0 reports, rank 1 does not
    summary = json.loads((two / "build/r/train/manifest.json").read_text())["summary"]
    assert (summary["processes"], summary["steps"], summary["micro_batches"]) == (2, 5, 9)
    ours, theirs = (load_file(str(p / "build/r/train/adapter_model.safetensors")) for p in (two, one))
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-6), name
    # Training did move the adapter: a wrong split of the work would differ far beyond the tolerance.
    assert any(not torch.allclose(ours[n], torch.zeros_like(ours[n]), atol=1e-4) for n in ours if "lora_B" in n)
    rows = [[line.split(",") for line in (p / "build/r/train/loss.csv").read_text().splitlines()] for p in (two, one)]
    assert [r[:2] for r in rows[0]] == [r[:2] for r in rows[1]]  # header, steps and epochs
    for a, b in zip(rows[0][1:], rows[1][1:]):
        assert [float(x) for x in a[2:]] == pytest.approx([float(x) for x in b[2:]], rel=1e-4, abs=1e-7)
    assert sorted(p.name for p in (two / "build/r").iterdir()) == [".lock", "base", "dataset", "train"]


def test_a_recipe_without_export_builds_placeholders_for_the_dvc_outs(tmp_path, train_project):
    """dvc.yaml has the same stages for every recipe: kinds a recipe does not build still get the
    folder DVC expects, saying why it is empty."""
    root = train_project(tmp_path / "x")
    build_recipe(load_project(root), "r", None)
    build = root / "build/r"
    for kind in ("pairs", "preference", "merge", "gguf", "quantize"):
        manifest = json.loads((build / kind / "manifest.json").read_text())
        assert manifest["key"] is None and "builds no" in manifest["not_built"]
    assert "see its preference section" in json.loads((build / "preference" / "manifest.json").read_text())["not_built"]
    assert json.loads((build / "preference" / "metrics.json").read_text()) == {}  # dvc.yaml lists it for every recipe
    assert sorted(p.name for p in (build / "quantize").iterdir()) == ["manifest.json"]
    assert json.loads((build / "eval" / "metrics.json").read_text()) == {}


def test_only_the_train_stage_runs_under_a_multi_process_launch(tmp_path, train_project, monkeypatch):
    from builder.engine.plan import plan_stages
    from builder.engine.runner import run_stage
    from builder.errors import StageError

    root = train_project(tmp_path / "w")
    project = load_project(root)
    recipe = project.load_recipe("r")
    plan = {s.name: s for s in plan_stages(recipe, project)}
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(StageError, match="only the train and preference stages run under a multi-process launch"):
        run_stage(project, recipe, plan["dataset"], plan)


def test_launch_commands_from_params_and_the_shipped_accelerate_configs(tmp_path):
    """What `tunefile stage train` runs under params.yaml's `launch`, and the FSDP/DeepSpeed configs
    the README points to load in accelerate's own config parser."""
    from accelerate.commands.config.config_args import load_config_from_file

    from builder.engine.launch import launch_command, wants_launch
    from builder.errors import StageError

    root = tmp_path / "l"
    root.mkdir()
    (root / "params.yaml").write_text("recipes: [r]\n")
    assert not wants_launch(load_project(root))
    (root / "params.yaml").write_text("recipes: [r]\nlaunch: {num_processes: 4}\n")
    cmd = launch_command(load_project(root), "r")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[-5:] == ["-m", "builder", "stage", "train", "r"]
    assert cmd[cmd.index("--num_processes") + 1] == "4" and "--multi_gpu" in cmd
    (root / "params.yaml").write_text("recipes: [r]\nlaunch: {config_file: fsdp.yaml}\n")
    with pytest.raises(StageError, match="launch.config_file: .*fsdp.yaml does not exist"):
        launch_command(load_project(root), "r")
    shutil.copy(REPO / "configs" / "accelerate" / "fsdp.yaml", root / "fsdp.yaml")
    cmd = launch_command(load_project(root), "r")
    assert cmd[3:5] == ["--config_file", str(root / "fsdp.yaml")] and "--num_processes" not in cmd
    kinds = {name: load_config_from_file(str(REPO / "configs" / "accelerate" / name)).distributed_type
             for name in ("fsdp.yaml", "deepspeed-zero2.yaml")}
    assert {k: v.value for k, v in kinds.items()} == {"fsdp.yaml": "FSDP", "deepspeed-zero2.yaml": "DEEPSPEED"}


def test_curriculum_keeps_the_split_order_and_shuffle_draws_a_new_one_every_epoch():
    import random

    from builder.train.batches import epoch_order

    examples = list(range(50))
    rng = random.Random(3)
    assert epoch_order(examples, rng, shuffle=False) == examples  # simple to complex, as written
    first, second = epoch_order(examples, rng, shuffle=True), epoch_order(examples, rng, shuffle=True)
    assert sorted(first) == examples and first != examples and second != first
