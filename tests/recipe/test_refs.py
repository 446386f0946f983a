"""builder/recipe/refs.py: `base.model` and hub `path:` strings parsed into exactly one kind of
reference, and printed back as written."""
from __future__ import annotations

import pytest

from builder.recipe.refs import HubRef, ModelRef, is_hub, parse_hub


@pytest.mark.parametrize("text,expected", [
    ("builtin:tiny-llama", ModelRef(builtin="tiny-llama")),
    ("hf:Qwen/Qwen2.5-0.5B@7ae557604adf67be50417f59c2c2f167def9a775",
     ModelRef(hub=HubRef("Qwen/Qwen2.5-0.5B", "7ae557604adf67be50417f59c2c2f167def9a775"))),
    ("models/tok", ModelRef(folder="models/tok")),
    ("builtin/tiny-llama", ModelRef(folder="builtin/tiny-llama")),  # a prefix without its colon: a folder
])
def test_a_model_string_is_exactly_one_kind_and_prints_back(text, expected):
    ref = ModelRef.parse(text)
    assert ref == expected
    assert str(ref) == text


def test_a_hub_reference_needs_org_name_and_revision():
    assert parse_hub("hf:org/name@v1.0") == HubRef("org/name", "v1.0")
    assert parse_hub("hf:org/name@main@x") == HubRef("org/name", "main@x")  # the first @ splits
    for text in ("hf:org/name", "hf:name@abc", "hf:org/name@", "hf:@abc", "org/name@abc"):
        with pytest.raises(ValueError) as caught:
            parse_hub(text, pinned="rows")
        assert str(caught.value) == (f"'{text}' must be hf:org/name@revision (the revision pins the exact rows, "
                                     "e.g. a commit hash)")
    with pytest.raises(ValueError, match="pins the exact files"):
        ModelRef.parse("hf:org/name")


def test_is_hub_reads_the_prefix_only():
    assert [is_hub(t) for t in ("hf:a/b@c", "hf:", "data/hf:x.jsonl", "HF:a/b@c")] == [True, True, False, False]
