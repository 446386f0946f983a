"""Benchmark: training throughput and padding, tunefile's batches (packed and padded) against TRL.

    .venv/bin/python bench/train.py [--steps N] [--batch-size B] [--max-length L]

All runs in one process, on the same data and the same randomly initialised model of the
builtin tiny-llama shape (hidden 256, intermediate 512, 2 layers), LoRA r=8 on q/k/v/o, AdamW,
fp32 on CPU (bf16 on CUDA when run on a GPU machine):
1. tunefile packed: the train stage's packed rows (positions restart per example, no padding
   inside a row);
2. tunefile padded: one example per row, padded to the longest in the batch;
3. TRL SFTTrainer (the baseline), packing off and on (its default best-fit packing), on the same
   pre-tokenized examples with the same labels.
Prints per run: steps, seconds, real (non-padding) tokens per second, padding fraction, and the
ratio of tunefile's packed tokens/s to each baseline. Data: the repo's demo sources rendered with
ChatML (data/), repeated to fill the steps.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.data.sources import read_source
from builder.recipe.schema import SourceSpec
from builder.templates import BUILTIN_TEMPLATES
from builder.templates.tokens import tokenize_chats
from builder.train.batches import make_batches, padding_fraction, to_tensors

ROOT = Path(__file__).resolve().parents[1]


def demo_examples(tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    conversations = []
    for name, path, fmt in (("a", "data/demo_alpaca.jsonl", "alpaca"), ("c", "data/demo_chats.json", "sharegpt")):
        conversations += read_source(SourceSpec(name=name, path=path, format=fmt), ROOT)[0]
    chats = tokenize_chats(BUILTIN_TEMPLATES["chatml"].read_text(), [c.to_dicts() for c in conversations], tokenizer)
    return [(c.input_ids, c.labels) for c in chats if not isinstance(c, Exception) and len(c.input_ids) <= max_length]


def fresh_model(tokenizer, device: str, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from builder.models import BUILTIN_MODELS

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), **BUILTIN_MODELS["tiny-llama"].config)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def run_tunefile(examples, tokenizer, packing: bool, args, device: str, dtype) -> dict:
    import torch

    batches = make_batches(examples, args.batch_size, packing, args.max_length, tokenizer.pad_token_id)
    batches = (batches * (args.steps // max(1, len(batches)) + 1))[:args.steps]
    model = fresh_model(tokenizer, device, dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    real = sum(len(row) - pad for b in batches for row, pad in zip(b.input_ids, b.pads))
    started = time.perf_counter()
    for batch in batches:
        loss = model(**to_tensors(batch, device), use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"steps": len(batches), "seconds": seconds, "tokens_per_second": real / seconds,
            "padding_fraction": padding_fraction(batches)}


def run_trl(examples, tokenizer, packing: bool, args, device: str, dtype) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    # TRL takes pre-tokenized rows (input_ids) and trains on every token unless told otherwise:
    # our labels' mask is given as its completion_mask, so both runs train the same tokens.
    rows = [{"input_ids": ids, "completion_mask": [int(label != -100) for label in labels]} for ids, labels in examples]
    data = Dataset.from_list(rows * (args.steps * args.batch_size // len(rows) + 1))
    model = fresh_model(tokenizer, device, dtype)
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                           learning_rate=2e-4, lr_scheduler_type="constant", packing=packing,
                           max_length=args.max_length,
                           completion_only_loss=True, report_to=[], logging_steps=10_000, save_strategy="no",
                           use_cpu=device == "cpu", bf16=dtype == torch.bfloat16, dataloader_num_workers=0,
                           seed=0, disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
        real, total = [0], [0]

        def count(module, args_, kwargs):  # tokens the model really sees, per forward
            ids = kwargs.get("input_ids")
            mask = kwargs.get("attention_mask")
            total[0] += ids.numel()
            real[0] += int(mask.sum()) if mask is not None else ids.numel()

        handle = model.register_forward_pre_hook(count, with_kwargs=True)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        handle.remove()
    return {"steps": args.steps, "seconds": seconds, "tokens_per_second": real[0] / seconds,
            "padding_fraction": 1 - real[0] / total[0] if total[0] else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    import torch
    from transformers.utils import logging as hf_logging

    from builder.models import BUILTIN_MODELS
    from builder.models.tiny_llama import train_tokenizer

    hf_logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = train_tokenizer(BUILTIN_MODELS["tiny-llama"])
    examples = demo_examples(tokenizer, args.max_length)
    print(f"device {device} ({dtype}), {len(examples)} demo examples, {args.steps} steps of batch {args.batch_size}, "
          f"max_length {args.max_length}, torch threads {torch.get_num_threads()}")
    results = {
        "tunefile packed": run_tunefile(examples, tokenizer, True, args, device, dtype),
        "tunefile padded": run_tunefile(examples, tokenizer, False, args, device, dtype),
        "TRL SFTTrainer, no packing": run_trl(examples, tokenizer, False, args, device, dtype),
        "TRL SFTTrainer, packing": run_trl(examples, tokenizer, True, args, device, dtype),
    }
    print(f"{'run':<28} {'steps':>5} {'seconds':>8} {'real tok/s':>11} {'padding':>8}")
    for name, r in results.items():
        print(f"{name:<28} {r['steps']:>5} {r['seconds']:>8.2f} {r['tokens_per_second']:>11.0f} "
              f"{100 * r['padding_fraction']:>7.1f}%")
    ours = results["tunefile packed"]["tokens_per_second"]
    for name in list(results)[1:]:
        print(f"tunefile packed vs {name}: {ours / results[name]['tokens_per_second']:.2f}x real tokens/s")
    print(json.dumps({k: {m: round(v, 4) for m, v in r.items()} for k, r in results.items()}, sort_keys=True))


if __name__ == "__main__":
    main()
