"""The caller's side of HF -> GGUF conversion (builder/export/convert.py) and the model card: file
names, the lineage keys written into a tuned GGUF, the end-of-turn token ids read from a model
folder's template, and the card's lineage table. (The converter itself, writing the end-of-turn
key, is run in tests/train/test_merge_eos.py on a merged model.)"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from builder import __version__
from builder.export.convert import added_token_ids, end_of_turn_ids, gguf_name, lineage_metadata
from builder.export.modelcard import render_model_card
from builder.recipe.project import load_project
from builder.templates import BUILTIN_TEMPLATES

# A template with no end-of-turn token: a blank line, then the next turn's header.
PLAIN = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
         "{% if add_generation_prompt %}### assistant:\n{% endif %}")
KEYS = {"base": "kb", "dataset": "kd", "train": "kt", "merge": "km", "gguf": "kg"}


def _recipe(policy: str = "append_eos") -> SimpleNamespace:
    return SimpleNamespace(name="demo", no_end_of_turn=policy, base=SimpleNamespace(model="builtin:tiny-llama"))


def test_gguf_file_names():
    assert [gguf_name(t) for t in ("f16", "q8_0", "q4_k_m")] == ["model-f16.gguf", "model-q8_0.gguf",
                                                                 "model-q4_k_m.gguf"]


def test_lineage_names_the_recipe_and_every_upstream_key():
    assert lineage_metadata(_recipe(), KEYS) == {
        "tunefile.version": __version__, "tunefile.recipe": "demo", "tunefile.base_model": "builtin:tiny-llama",
        "tunefile.base_key": "kb", "tunefile.dataset_key": "kd", "tunefile.train_key": "kt", "tunefile.gguf_key": "kg"}


def test_lineage_adds_preference_keys_and_a_policy_off_its_default():
    lineage = lineage_metadata(_recipe("eos_only"), {**KEYS, "pairs": "kp", "preference": "kpr"})
    assert {k: v for k, v in lineage.items() if k not in lineage_metadata(_recipe(), KEYS)} == {
        "tunefile.no_end_of_turn": "eos_only", "tunefile.pairs_key": "kp", "tunefile.preference_key": "kpr"}


def test_the_model_card_lists_the_lineage_keys_it_is_given(tokenizer_project, tmp_path):
    (tokenizer_project / "data" / "a.jsonl").write_text('{"instruction": "Say 1.", "output": "1."}\n')
    (tokenizer_project / "recipes" / "r.yaml").write_text(
        "name: r\nbase: {model: models/tok}\ntemplate: chatml\n"
        "sources: [{name: a, path: data/a.jsonl, format: alpaca}]\n")
    recipe = load_project(tokenizer_project).load_recipe("r")
    card = render_model_card(recipe, KEYS, lambda name: tmp_path / name, "model-f16.gguf")
    lines = card.splitlines()
    start = lines.index("| stage | key |")
    assert lines[start:start + 7] == ["| stage | key |", "|---|---|", "| base | `kb` |", "| dataset | `kd` |",
                                      "| train | `kt` |", "| merge | `km` |", "| gguf | `kg` |"]
    assert "Final train loss None, eval loss None" in card  # no train metrics.json: an empty one


@pytest.mark.parametrize(("template", "ids"), [
    ("chatml", [4]),      # <|im_end|>, not EOS (</s> is 1)
    ("llama-2", [1]),     # ` </s>` closes every answer: EOS is the end of turn
    ("zephyr", [1]),      # `</s>` after each answer, then a newline
    ("alpaca", [1]),      # EOS after each response
    ("plain", []),        # no end-of-turn token: answers end at the EOS training appends
    (None, []),           # no template at all
])
def test_end_of_turn_ids_are_the_tokens_that_close_an_answer(tiny_tokenizer, tmp_path, template, ids):
    folder = tmp_path / "model"
    tiny_tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    if template is not None:
        (folder / "chat_template.jinja").write_text(
            PLAIN if template == "plain" else BUILTIN_TEMPLATES[template].read_text(encoding="utf-8"))
    assert added_token_ids(folder) == {"<s>": 0, "</s>": 1, "<pad>": 2, "<|im_start|>": 3, "<|im_end|>": 4}
    assert end_of_turn_ids(folder) == ids
    assert end_of_turn_ids(tmp_path / "no-such-folder") == [] and added_token_ids(tmp_path) == {}
