"""Preference tuning (stages `pairs` and `preference`): pairs tokenized with labels on the answer,
rejects with reasons, DPO whose first loss is ln 2, resume after a kill to the same bytes, the
per-step losses of TRL's DPOTrainer on the same pairs, keys that move only downstream of an edit,
and merge/GGUF lineage reading the last training stage. A tiny random Llama, on CPU, in seconds."""
from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from builder.engine.build import build_recipe
from builder.recipe.project import load_project

PREFERENCE = """preference:
  sources: [{name: pairs, path: data/pairs.jsonl, format: preference}]
  beta: 0.1
  lr: 5.0e-3
  batch_size: 4
  max_length: 96
  eval_size: 6
  seed: 7
%s
"""
OUTPUTS = ("adapter_model.safetensors", "adapter_config.json", "steps.csv", "eval.csv", "metrics.json")
RAMBLE = " Well, numbers are a big topic and people have thought about them for ages, so let me say more."


def pair_rows(n: int = 30) -> list[dict]:
    """Chosen: the short right answer. Rejected: a rambling or off-task one."""
    rows = []
    for i in range(n):
        rejected = f"{i} plus {i} is {2 * i}.{RAMBLE}" if i % 2 else "I would rather talk about the weather today."
        rows.append({"prompt": f"What is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}.", "rejected": rejected})
    return rows


@pytest.fixture(scope="session")
def dpo_project(train_project) -> Callable[..., Path]:
    """make(root, extra="", checkpoint_steps=50, rows=None) -> root: conftest's train project with a
    preference section (`extra`: more lines of it) on pairs.jsonl (`rows`, default pair_rows())."""

    def make(root: Path, extra: str = "", checkpoint_steps: int = 50, rows: list[dict] | None = None) -> Path:
        train_project(root, checkpoint_steps=checkpoint_steps)
        recipe = root / "recipes" / "r.yaml"
        recipe.write_text(recipe.read_text() + PREFERENCE % extra)
        (root / "data" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows or pair_rows()))
        return root

    return make


def build(root: Path, until: str = "preference") -> dict:
    build_recipe(load_project(root), "r", until)
    return json.loads((root / "build/r/preference/manifest.json").read_text())


def rows_of(root: Path, name: str) -> list[dict]:
    with open(root / "build/r/preference" / name) as f:
        return list(csv.DictReader(f))


def tunefile_env() -> tuple[str, dict]:
    """The venv's tunefile and an environment whose PATH finds it (and accelerate's launcher)."""
    import os
    import sys

    bin_dir = Path(sys.executable).parent
    return str(bin_dir / "tunefile"), {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_pairs_have_labels_on_the_answer_only_and_a_shared_prompt(tiny_tokenizer):
    from builder.data.pairs import tokenize_pairs
    from builder.data.records import make_conversation
    from builder.templates import BUILTIN_TEMPLATES
    from builder.templates.tokens import IGNORE_INDEX

    template = BUILTIN_TEMPLATES["chatml"].read_text()
    turns = [("user", "What is 2 plus 2?"), ("assistant", "4."), ("rejected", "Let us talk about cats instead.")]
    long_prompt = [("user", "many words " * 60), ("assistant", "ok"), ("rejected", "no")]
    conversations = [make_conversation(turns, "s", 1), make_conversation(long_prompt, "s", 2),
                     make_conversation(turns, "s", 3)]
    pairs, rejects = tokenize_pairs(conversations, template, tiny_tokenizer, max_length=64)
    assert [(r.row, r.reason) for r in rejects] == [(2, "prompt_too_long"), (3, "duplicate")]
    assert "the same pair as row 1" in rejects[1].detail
    (pair,) = pairs
    p = pair.prompt_tokens
    assert pair.chosen_ids[:p] == pair.rejected_ids[:p]
    for ids, labels, answer in ((pair.chosen_ids, pair.chosen_labels, "4."),
                                (pair.rejected_ids, pair.rejected_labels, "Let us talk about cats instead.")):
        assert labels[:p] == [IGNORE_INDEX] * p and IGNORE_INDEX not in labels[p:] and labels[p:] == ids[p:]
        assert tiny_tokenizer.decode(ids[p:]) == answer + "<|im_end|>"  # the answer and its end of turn
    assert tiny_tokenizer.decode(pair.chosen_ids[:p]).endswith("<|im_start|>assistant\n")
    cut, _ = tokenize_pairs(conversations[:1], template, tiny_tokenizer, max_length=p + 2)
    assert len(cut[0].rejected_ids) == p + 2 and len(cut[0].chosen_ids) <= p + 2  # answers cut, prompt kept


def test_bad_pair_rows_are_rejected_with_a_reason(tmp_path, dpo_project):
    rows = pair_rows(12) + [{"prompt": "Same?", "chosen": "Yes.", "rejected": " Yes. "},
                            {"prompt": "No answer?", "chosen": "Here."}]
    root = dpo_project(tmp_path / "bad", rows=rows)
    build_recipe(load_project(root), "r", "pairs")
    out = root / "build/r/pairs"
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["reason"]) for r in rejects] == [(13, "same_answers"), (14, "missing_field")]
    stats = json.loads((out / "stats.json").read_text())["pairs"]
    assert (stats["rows"], stats["train"], stats["eval"]) == (14, 6, 6)
    assert stats["rejected"] == {"missing_field": 1, "same_answers": 1}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dpo_project) -> Path:
    """One DPO build (6 steps: the 24 train pairs of 30, 6 held out, 4 a step; checkpoints every 3
    steps): what the ln 2, resume, TRL, merge and two-process tests read."""
    root = dpo_project(tmp_path_factory.mktemp("dpo") / "ref", checkpoint_steps=3)
    build(root)
    return root


def test_the_first_step_loss_is_ln_2_and_held_out_accuracy_is_measured(trained):
    steps = rows_of(trained, "steps.csv")
    assert len(steps) == 6 and float(steps[0]["loss"]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(steps[0]["margin"]) == 0.0 and float(steps[-1]["loss"]) < math.log(2) - 0.05
    metrics = json.loads((trained / "build/r/preference/metrics.json").read_text())
    assert metrics["first_loss"] == pytest.approx(math.log(2), abs=1e-4)
    held = metrics["held_out"]
    assert held["pairs"] == 6 and held["logp_margin"] > held["logp_margin_sft"] and held["reward_accuracy"] == 1.0
    evals = rows_of(trained, "eval.csv")
    assert [int(r["step"]) for r in evals] == [0, 6] and float(evals[0]["loss"]) == pytest.approx(math.log(2), abs=1e-6)


def test_a_killed_preference_stage_resumes_to_the_same_bytes(tmp_path, trained, monkeypatch,
                                                              die_at_first_checkpoint):
    root = tmp_path / "cut"  # the same project with its SFT stages built, not the preference stage
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns(".tunefile", "preference"))
    saves = die_at_first_checkpoint()  # the run dies right after its first checkpoint
    with pytest.raises(KeyboardInterrupt):
        build(root)
    assert [p.name for p in saves] == ["step-00000003"] and not (root / "build/r/preference").exists()
    monkeypatch.undo()
    assert build(root)["summary"]["resumed_from_step"] == 3
    for name in OUTPUTS:
        ours, reference = (project / "build/r/preference" / name for project in (root, trained))
        assert ours.read_bytes() == reference.read_bytes(), name
    assert not list((root / ".tunefile").glob("checkpoints/*"))


# Per-step loss, absolute, fp32 on CPU. The first step's gradients agree to 1e-7 relative, the losses
# of steps 1-2 exactly; after that Adam's normalised updates (g / (|g| + eps)) amplify the summation-order
# noise of entries with near-zero gradients: measured 1.1e-4 at lr 5e-3 and 1.3e-4 at lr 5e-4, step 6.
TRL_TOLERANCE = 5e-4


def test_per_step_losses_match_trls_dpo_trainer(trained, tmp_path):
    """TRL's DPOTrainer (loss_type sigmoid) from the same starting weights (the SFT model with the
    same fresh LoRA adapter, reference = adapter disabled), on the same token ids in the same order,
    with the same optimizer, schedule and clipping: the same loss at every step."""
    from accelerate.utils import set_seed
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from builder.data.pairs import read_pairs
    from builder.train.adapters import load_policy
    from builder.train.dpo import draw_pair_steps

    recipe = load_project(trained).load_recipe("r")
    spec, build_dir = recipe.preference, trained / "build/r"
    steps = draw_pair_steps(read_pairs(build_dir / "pairs/train.parquet"), spec.batch_size, 1, spec.seed)
    order = [p for _, group in steps for p in group]
    assert all(-100 not in p.chosen_labels[p.prompt_tokens:] + p.rejected_labels[p.prompt_tokens:] for p in order)
    rows = [{"prompt_ids": p.chosen_ids[:p.prompt_tokens], "chosen_ids": p.chosen_ids[p.prompt_tokens:],
             "rejected_ids": p.rejected_ids[p.prompt_tokens:]} for p in order]
    set_seed(spec.seed)  # as the stage does before building the adapter
    model = load_policy(recipe.train, build_dir / "base", build_dir / "train", "fp32")

    class Peer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already tokenized, by the pairs stage

    config = DPOConfig(output_dir=str(tmp_path / "trl"), beta=spec.beta, learning_rate=spec.lr,
                       per_device_train_batch_size=spec.batch_size, num_train_epochs=1, lr_scheduler_type="linear",
                       warmup_steps=spec.warmup_ratio, max_grad_norm=spec.max_grad_norm, weight_decay=0.0,
                       optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                       seed=spec.seed, train_sampling_strategy="sequential", max_length=None,
                       gradient_checkpointing=False, dataloader_num_workers=0)
    from accelerate.state import AcceleratorState

    try:
        peer = Peer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                    processing_class=AutoTokenizer.from_pretrained(build_dir / "base"))
        peer.train()
    finally:  # the Trainer's process-wide accelerate state would refuse the stages' own settings later
        AcceleratorState._reset_state(reset_partial_state=True)
    theirs = [h["loss"] for h in peer.state.log_history if "loss" in h]
    ours = [float(r["loss"]) for r in rows_of(trained, "steps.csv")]
    assert len(theirs) == len(ours) == 6
    assert theirs[0] == pytest.approx(math.log(2), abs=1e-6)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < TRL_TOLERANCE, (ours, theirs)
    assert ours[-1] < ours[0] - 0.05  # and the steps did move the model


def test_keys_a_beta_edit_reruns_only_preference_and_what_follows(tmp_path):
    from helpers import make_project

    from builder.engine.plan import plan_stages

    section = PREFERENCE.replace("data/pairs.jsonl", "data/p.jsonl") % ""
    root = make_project(tmp_path / "p")
    (root / "data" / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pair_rows(4)))
    recipe = root / "recipes" / "default.yaml"
    plain = {s.name: s for s in plan_stages(load_project(root).load_recipe("default"), load_project(root))}
    recipe.write_text(recipe.read_text() + section)

    def keys() -> dict:
        project = load_project(root)
        return {s.name: s for s in plan_stages(project.load_recipe("default"), project)}

    before = keys()
    assert list(before)[:6] == ["base", "dataset", "pairs", "train", "preference", "merge"]
    assert before["merge"].upstream == ("base", "train", "preference") and plain["merge"].upstream == ("base", "train")
    assert {n: s.key for n, s in before.items() if n in ("base", "dataset", "train", "eval@base")} == {
        n: s.key for n, s in plain.items() if n in ("base", "dataset", "train", "eval@base")}
    recipe.write_text(recipe.read_text().replace("beta: 0.1", "beta: 0.2"))
    after = keys()
    assert [n for n in before if before[n].key != after[n].key] == [
        "preference", "merge", "gguf", "eval@f16", "quantize@q8_0", "eval@q8_0", "quantize@q4_k_m", "eval@q4_k_m"]
    from builder.engine.build import stage_status
    assert stage_status(load_project(root), after["preference"]) == "not built"
    from builder.engine.plan import explain_changes
    assert explain_changes(before["preference"].inputs, after["preference"].inputs) == ["preference.beta 0.1 -> 0.2"]
    with open(root / "data" / "p.jsonl", "a") as f:  # a new pair: pairs and everything after it
        f.write(json.dumps({"prompt": "New?", "chosen": "Yes.", "rejected": "No."}) + "\n")
    edited = keys()
    assert [n for n in after if after[n].key != edited[n].key][:2] == ["pairs", "preference"]
    assert edited["train"].key == after["train"].key


def test_merge_folds_the_preference_adapter_in_after_the_sft_one(trained, tmp_path):
    """merge reads the last training stage; the GGUF lineage names the pairs and preference keys."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from builder.engine.plan import plan_stages
    from builder.export.convert import lineage_metadata
    from builder.train.adapters import load_sft_model

    root = tmp_path / "m"
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns(".tunefile"))
    recipe = root / "recipes" / "r.yaml"
    recipe.write_text(recipe.read_text().replace("export: {merge: false, gguf: null}",
                                                 "export: {merge: true, gguf: null}"))
    build_recipe(load_project(root), "r", "merge")
    merged = load_file(str(root / "build/r/merge/model.safetensors"))
    build_dir = root / "build/r"
    expected = PeftModel.from_pretrained(load_sft_model(build_dir / "base", build_dir / "train"),
                                         build_dir / "preference").merge_and_unload().state_dict()
    sft = load_sft_model(build_dir / "base", build_dir / "train").state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(merged[name], expected[name]) and not torch.equal(merged[name], sft[name])
    project = load_project(root)
    plan = {s.name: s for s in plan_stages(project.load_recipe("r"), project)}
    keys = {name: s.key for name, s in plan.items()}  # as the gguf stage passes them (this recipe builds none)
    lineage = lineage_metadata(project.load_recipe("r"), {**keys, "gguf": "0" * 32})
    assert lineage["tunefile.preference_key"] == plan["preference"].key
    assert lineage["tunefile.pairs_key"] == plan["pairs"].key


def test_two_processes_train_preference_like_one(trained, tmp_path):
    """params.yaml `launch: {num_processes: 2}`: `tunefile stage preference` runs under accelerate
    launch (gloo DDP on CPU), each process takes half of every step's pairs, rank 0 publishes. The
    same losses and adapter as one process, within float tolerance (threads and reduction order differ)."""
    import subprocess

    import torch
    from safetensors.torch import load_file

    root = tmp_path / "two"
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns(".tunefile", "preference"))
    with open(root / "params.yaml", "a") as f:
        f.write("launch: {num_processes: 2}\n")
    tunefile, env = tunefile_env()
    done = subprocess.run([tunefile, "stage", "preference", "r"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "r/preference: accelerate launch --multi_gpu --num_processes 2" in done.stderr
    assert done.stdout.count("r/preference: built") == 1
    assert json.loads((root / "build/r/preference/manifest.json").read_text())["summary"]["processes"] == 2
    ours, theirs = (rows_of(p, "steps.csv") for p in (root, trained))
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for a, b in zip(ours, theirs):
        for column in ("loss", "margin", "accuracy"):
            assert float(a[column]) == pytest.approx(float(b[column]), abs=1e-5), (a, b)
    two, one = (load_file(str(p / "build/r/preference/adapter_model.safetensors")) for p in (root, trained))
    assert sorted(two) == sorted(one) and all(torch.allclose(two[n], one[n], rtol=1e-4, atol=1e-6) for n in two)


def test_sigkill_during_the_preference_stage_then_a_rerun_gives_the_same_bytes(trained, tmp_path):
    """`tunefile stage preference` killed (SIGKILL, the whole process group) once it has written a
    checkpoint; the rerun resumes from it and publishes the bytes of an uninterrupted build."""
    import os
    import signal
    import subprocess
    import time

    root = tmp_path / "killed"
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns(".tunefile", "preference"))
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("checkpoint_steps: 3", "checkpoint_steps: 2"))
    tunefile, env = tunefile_env()
    cmd = [tunefile, "stage", "preference", "r"]
    process = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while not list(root.glob(".tunefile/checkpoints/*/step-*")):
        assert process.poll() is None and time.time() < deadline, "no checkpoint was written"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (root / "build/r/preference").exists()
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((root / "build/r/preference/manifest.json").read_text())["summary"]
    assert summary["resumed_from_step"] in (2, 4)
    for name in OUTPUTS:
        ours, reference = (project / "build/r/preference" / name for project in (root, trained))
        assert ours.read_bytes() == reference.read_bytes(), name


@pytest.mark.parametrize("edit,message", [
    ("format: preference}", r"r\.yaml:\d+: preference.sources: .*preference source 'pairs' has format alpaca"),
    ("beta: 0.1", r"r\.yaml:\d+: preference.beta: Input should be greater than 0"),
    ("path: data/pairs.jsonl", r"r\.yaml:\d+: source 'pairs': no file matches 'data/nope.jsonl'"),
    ("  max_length: 96\n  packing", r"r\.yaml:\d+: train.method: qlora cannot take a preference section"),
])
def test_bad_preference_sections_fail_validation_with_file_and_line(tmp_path, dpo_project, edit, message):
    from builder.errors import RecipeError

    root = dpo_project(tmp_path / "v")
    recipe = root / "recipes" / "r.yaml"
    replacement = {"format: preference}": "format: alpaca}", "beta: 0.1": "beta: 0",
                   "path: data/pairs.jsonl": "path: data/nope.jsonl",
                   "  max_length: 96\n  packing": "  method: qlora\n  max_length: 96\n  packing"}[edit]
    recipe.write_text(recipe.read_text().replace(edit, replacement))
    with pytest.raises(RecipeError, match=message):
        load_project(root).load_recipe("r")
