"""The merged model stops at the end of a turn in every runtime (issue 24): a base whose EOS (`</s>`,
1) is not the template's end of turn (ChatML's `<|im_end|>`, 4). transformers' `generate` reads
generation_config.json; llama.cpp reads the GGUF's `tokenizer.ggml.eot_token_id`. A tiny random
Llama with the builtin tokenizer, LoRA-tuned and merged on CPU in seconds."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from builder.engine.build import build_recipe
from builder.export.convert import convert_model
from builder.recipe.project import load_project

IM_END, EOS = 4, 1
MAX_NEW, FORCED_AT = 12, 3  # <|im_end|> is made the argmax at the 4th new token


@pytest.fixture(scope="module")
def built(tmp_path_factory, train_project) -> Path:
    """build/r/ of a project that trains and merges (no GGUF)."""
    root = train_project(tmp_path_factory.mktemp("eos") / "p")
    recipe = root / "recipes" / "r.yaml"
    recipe.write_text(recipe.read_text().replace("export: {merge: false, gguf: null}",
                                                 "export: {merge: true, gguf: null}"))
    build_recipe(load_project(root), "r", "merge")
    return root / "build" / "r"


def _processor(prompt_length: int):
    """Never EOS; <|im_end|> at new token FORCED_AT: the toy model may never write it by itself."""
    import torch
    from transformers import LogitsProcessor

    class ForceEndOfTurn(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, EOS] = -torch.inf
            if input_ids.shape[1] - prompt_length == FORCED_AT:
                scores[:, IM_END] = scores.max() + 1.0
            return scores

    return ForceEndOfTurn()


def test_generate_on_the_merged_folder_stops_at_the_end_of_turn(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessorList

    merged = built / "merge"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id) == (IM_END, EOS)
    assert GenerationConfig.from_pretrained(merged).eos_token_id == [IM_END, EOS]  # end of turn first
    assert GenerationConfig.from_pretrained(built / "base").eos_token_id == EOS
    model = AutoModelForCausalLM.from_pretrained(merged)  # its generation_config.json comes with it
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}], tokenize=False,
                                         add_generation_prompt=True)
    prompt = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    start = prompt.shape[1]

    def generate(**settings) -> list[int]:
        out = model.generate(prompt, attention_mask=prompt.new_ones(prompt.shape), max_new_tokens=MAX_NEW,
                             do_sample=False, logits_processor=LogitsProcessorList([_processor(start)]), **settings)
        return out[0, start:].tolist()

    new = generate()
    assert len(new) == FORCED_AT + 1 and new[-1] == IM_END  # it ends at <|im_end|>: nothing follows
    # The base's generation_config (EOS only) runs through the end of turn to max_new_tokens.
    base = generate(generation_config=GenerationConfig.from_pretrained(built / "base"))
    assert len(base) == MAX_NEW and base[FORCED_AT] == IM_END


def test_the_gguf_names_its_end_of_turn_token(built, tmp_path):
    """The converted merged model carries tokenizer.ggml.eot_token_id, and llama.cpp reads it; the
    base folder (no chat template) gets none."""
    import llama_cpp
    from gguf import GGUFReader

    builtin = SimpleNamespace(base=SimpleNamespace(ref=SimpleNamespace(builtin="tiny-llama")))  # gpt-2 split
    for name in ("merge", "base"):
        convert_model(builtin, built / name, tmp_path / f"{name}.gguf", "f16", name, {"tunefile.recipe": "r"})
    fields = GGUFReader(tmp_path / "merge.gguf").fields
    assert fields["tokenizer.ggml.eot_token_id"].contents() == IM_END
    assert fields["tokenizer.ggml.eos_token_id"].contents() == EOS
    assert "tokenizer.ggml.eot_token_id" not in GGUFReader(tmp_path / "base.gguf").fields
    llm = llama_cpp.Llama(model_path=str(tmp_path / "merge.gguf"), n_ctx=64, verbose=False)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        assert llm.metadata["tokenizer.ggml.eot_token_id"] == str(IM_END)
        assert llama_cpp.llama_vocab_eot(vocab) == IM_END and llama_cpp.llama_vocab_eos(vocab) == EOS
        assert llama_cpp.llama_vocab_is_eog(vocab, IM_END) and llama_cpp.llama_vocab_is_eog(vocab, EOS)
    finally:
        llm.close()
