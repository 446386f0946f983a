"""Training batches and stages, on the real tiny model and tokenizer (labels: test_templates.py)."""
from __future__ import annotations

import os
import subprocess

import pytest

from builder.train.batches import make_batches, pack_rows, to_tensors


def test_pack_rows_restarts_positions_and_drops_boundary_labels():
    examples = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9], [-100, -100, 8, 9])]
    rows = pack_rows(examples, max_length=6)
    assert rows == [([1, 2, 3, 4, 5], [-100, 2, 3, -100, 5], [0, 1, 2, 0, 1]),
                    ([6, 7, 8, 9], [-100, -100, 8, 9], [0, 1, 2, 3])]
    batch = make_batches(examples, batch_size=2, packing=True, max_length=6, pad_id=0)[0]
    assert batch.attention_mask is None
    assert batch.position_ids == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch.labels[1] == [-100, -100, 8, 9, -100]


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from builder.models import BUILTIN_MODELS

    spec = BUILTIN_MODELS["tiny-llama"]
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), **spec.config)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_packing_does_not_leak_attention_across_examples(tiny_model):
    """The loss of a packed row equals the loss of its examples run one by one."""
    import torch

    examples = [([5, 17, 99, 250, 31], [-100, -100, 99, 250, 31]),
                ([8, 400, 12, 77], [-100, 400, 12, 77]),
                ([3, 3, 900], [-100, -100, 900])]
    with torch.no_grad():
        packed = make_batches(examples, batch_size=1, packing=True, max_length=64, pad_id=2)
        assert len(packed) == 1
        packed_logits = tiny_model(**{k: v for k, v in to_tensors(packed[0], "cpu").items() if k != "labels"},
                                   use_cache=False).logits[0]
        offset = 0
        for ids, _ in examples:
            single = tiny_model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed_logits[offset:offset + len(ids)], single, rtol=1e-4, atol=1e-4)
            offset += len(ids)


def test_publish_and_abandoned_temp_folders(tmp_path):
    """Temp folders of killed builds are removed; a live build's folder is not; publish swaps."""
    from builder.engine.runner import publish, remove_abandoned

    out = tmp_path / "train"
    out.mkdir()
    (out / "old.txt").write_text("old")
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid now belongs to no process
    live = tmp_path / f".train.tmp-{os.getpid()}"
    for folder in (tmp_path / f".train.tmp-{dead.pid}", tmp_path / f".train.old-{dead.pid}", live):
        folder.mkdir()
    removed = remove_abandoned(out)
    assert sorted(p.name for p in removed) == [f".train.old-{dead.pid}", f".train.tmp-{dead.pid}"]
    assert live.is_dir()
    (live / "new.txt").write_text("new")
    publish(live, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]
