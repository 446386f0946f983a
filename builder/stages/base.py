"""base stage: the base model as an HF folder (config, safetensors, tokenizer).

builtin:NAME is generated deterministically; a local folder is copied; hf:org/name@revision is
downloaded at exactly that revision (needs network; offline it fails at once with a message).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from builder.data.tokenizer import verify_fast_load
from builder.errors import StageError
from builder.models import BUILTIN_MODELS, MODEL_FILES, model_files
from builder.models.tiny_llama import build_tiny_llama
from builder.stages import StageContext


def copy_model_files(src: Path, dst: Path) -> None:
    for path in model_files(src):
        shutil.copy2(path, dst / path.name)


def download_model(repo: str, revision: str, dst: Path) -> None:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id=repo, revision=revision, local_dir=dst, allow_patterns=list(MODEL_FILES))
    except Exception as exc:  # noqa: BLE001 (hub errors have many types; all mean "could not fetch")
        raise StageError(f"could not download hf:{repo}@{revision} ({type(exc).__name__}: {exc}); "
                         "this needs network access to the Hugging Face hub, or point base.model at a "
                         "local folder") from None
    shutil.rmtree(dst / ".cache", ignore_errors=True)


def run(ctx: StageContext) -> dict:
    model, ref = ctx.recipe.base.model, ctx.recipe.base.ref
    summary: dict = {}
    if ref.builtin is not None:
        summary = build_tiny_llama(BUILTIN_MODELS[ref.builtin], ctx.out_dir)
    elif ref.hub is not None:
        download_model(ref.hub.repo, ref.hub.revision, ctx.out_dir)
    else:
        copy_model_files(ctx.project.root / ref.folder, ctx.out_dir)
    if not (ctx.out_dir / "config.json").is_file():
        raise StageError(f"base model {model} has no config.json")
    # Settled here, where transformers is loaded anyway: the dataset stage can then skip importing it.
    summary["tokenizer_fast_load"] = verify_fast_load(ctx.out_dir, ctx.project.cache_dir)
    return {"model": model, **summary}
