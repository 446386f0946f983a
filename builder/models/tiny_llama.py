"""Generate `builtin:tiny-llama`: a tokenizer trained on the shipped corpus, a seeded Llama pretrained on it.

Run by the `base` stage; the same version, seed and corpus give the same files, byte for byte.
"""
from __future__ import annotations

import random
from pathlib import Path

from builder.models import CORPUS, BuiltinModel

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(spec: BuiltinModel, corpus: Path = CORPUS):
    """A byte-level BPE with the GPT-2 split regex (llama.cpp's `gpt-2` pre-tokenizer matches it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Untrimmed offsets: a token's characters are exactly the ones it encodes (loss masks use them).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = corpus.read_text(encoding="utf-8").splitlines()
    tok.train_from_iterator(lines, trainer, length=len(lines))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=spec.config["max_position_embeddings"],
                                   additional_special_tokens=SPECIAL_TOKENS[3:])


def pretrain(model, tokenizer, spec: BuiltinModel, corpus: Path = CORPUS) -> list[float]:
    """Full training on random windows of the corpus; returns the loss curve."""
    import torch

    settings = spec.pretrain
    # One stream of paragraphs, each closed by eos (as documents are in real pretraining).
    paragraphs = [p for p in corpus.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    ids = [t for row in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]
           for t in row + [tokenizer.eos_token_id]]
    rng = random.Random(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / settings["steps"])
    width = settings["seq_len"]
    losses = []
    model.train()
    for _ in range(settings["steps"]):
        starts = [rng.randrange(len(ids) - width) for _ in range(settings["batch_size"])]
        batch = torch.tensor([ids[s:s + width] for s in starts])
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def build_tiny_llama(spec: BuiltinModel, out_dir: Path) -> dict:
    """Write an HF model folder (config, safetensors weights, tokenizer) to out_dir; return the
    pretraining loss at the first and last step."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(spec)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **spec.config)
    with torch.random.fork_rng(devices=[]):  # seed locally; the caller's RNG state is untouched
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config).to(torch.float32)
        losses = pretrain(model, tokenizer, spec)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"pretrain_loss_first": round(losses[0], 4), "pretrain_loss_last": round(losses[-1], 4)}
