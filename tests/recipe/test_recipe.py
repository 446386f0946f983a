"""Recipe validation: good recipes load; bad ones fail with file:line, the key, and what is allowed."""
from __future__ import annotations

import pytest
import yaml
from helpers import REPO, make_project

from builder.errors import RecipeError
from builder.recipe.schema import load_recipe


def write(tmp_path, text: str):
    root = make_project(tmp_path / "p", text)
    return root / "recipes" / "default.yaml", root


def default_text() -> str:
    return (REPO / "recipes" / "default.yaml").read_text()


SHOWN = "recipes/default.yaml"  # errors name a recipe inside the project relative to its root, as the docs do


def test_default_recipe_loads():
    recipe = load_recipe(REPO / "recipes" / "default.yaml", root=REPO)
    assert recipe.name == "default"
    assert [s.name for s in recipe.sources] == ["demo_alpaca", "demo_chats"]
    assert [s.weight for s in recipe.sources] == [3, 1]
    assert recipe.export.gguf.quantize == ("q8_0", "q4_k_m")
    assert recipe.train.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")


def _leaves(value: object, loc: tuple = ()) -> dict[tuple, object]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _leaves(item, (*loc, key)).items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _leaves(item, (*loc, i)).items()}
    return {loc: value}


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads_every_value_it_writes(path):
    """Each value the YAML sets is the value the loaded recipe holds, at the same place: nothing the
    loader drops, coerces (2.0e-4 stays a float, a list keeps its order) or takes from a default."""
    written = _leaves(yaml.safe_load(path.read_text()))
    loaded = _leaves(load_recipe(path, root=REPO).model_dump(mode="json"))
    assert {loc: loaded.get(loc, "(missing)") for loc in written} == written


def test_misspelt_key_names_file_line_and_allowed_keys(tmp_path):
    path, root = write(tmp_path, default_text().replace("  lr: 2.0e-4", "  leraning_rate: 2.0e-4"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path, root=root)
    line = default_text().splitlines().index("  lr: 2.0e-4") + 1
    message = str(err.value)
    assert f"{SHOWN}:{line}: unknown key 'train.leraning_rate'" in message
    assert ("allowed here: batch_size, epochs, eval_steps, gradient_accumulation, gradient_checkpointing, lora, lr, "
            "max_grad_norm, max_length, method, neftune_alpha, packing, precision, scheduler, seed, train_on, "
            "warmup_ratio, weight_decay") in message


def test_unknown_quant_type_is_rejected_with_allowed_values(tmp_path):
    path, root = write(tmp_path, default_text().replace("quantize: [q8_0, q4_k_m]", "quantize: [q8_0, q4_k_z]"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path, root=root)
    line = next(i for i, text in enumerate(default_text().splitlines(), 1) if "quantize:" in text)
    assert f"{SHOWN}:{line}: export.gguf.quantize: unknown quant type 'q4_k_z'; allowed: " in str(err.value)
    assert "q4_k_m" in str(err.value) and "q8_0" in str(err.value)


def test_missing_source_file_is_an_error_before_building(tmp_path):
    path, root = write(tmp_path, default_text().replace("data/demo_chats.json", "data/nope.json"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path, root=root)
    line = next(i for i, text in enumerate(default_text().splitlines(), 1) if "data/demo_chats.json" in text)
    assert f"{SHOWN}:{line}: source 'demo_chats': no file matches 'data/nope.json'" in str(err.value)


@pytest.mark.parametrize("old,new,expected", [
    ("method: lora ", "method: lorra ", "train.method: Input should be 'lora', 'qlora' or 'full'"),
    ("batch_size: 8", "batch_size: eight", "train.batch_size: Input should be a valid integer"),
    ("template: chatml", "template: chatmlx", "unknown template 'chatmlx'; allowed: "),
    ("format: sharegpt", "format: shargpt", "sources.1.format: Input should be 'alpaca', 'sharegpt'"),
    ("model: builtin:tiny-llama", "model: builtin:huge", "allowed: builtin:tiny-llama"),
    ("model: builtin:tiny-llama", "model: hf:org/name", "must be hf:org/name@revision"),
])
def test_wrong_values_say_what_is_allowed(tmp_path, old, new, expected):
    assert old in default_text()
    path, root = write(tmp_path, default_text().replace(old, new))
    with pytest.raises(RecipeError) as err:
        load_recipe(path, root=root)
    assert expected in str(err.value)
    assert str(err.value).startswith(f"{SHOWN}:")


def test_repeated_key_and_bad_yaml(tmp_path):
    path, root = write(tmp_path, default_text() + "seed: 1\nmixture: {}\n")
    with pytest.raises(RecipeError, match=r"key 'mixture' repeated \(first at line \d+\)"):
        load_recipe(path, root=root)
    path.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match=r"^recipes/default.yaml:\d+: invalid YAML"):
        load_recipe(path, root=root)


def test_a_recipe_outside_the_project_is_named_by_its_absolute_path(tmp_path):
    _, root = write(tmp_path, default_text())
    outside = tmp_path / "elsewhere" / "default.yaml"
    outside.parent.mkdir()
    outside.write_text(default_text().replace("batch_size: 8", "batch_size: eight"))
    line = next(i for i, text in enumerate(default_text().splitlines(), 1) if "batch_size: 8" in text)
    with pytest.raises(RecipeError) as err:
        load_recipe(outside, root=root)
    assert str(err.value).startswith(f"{outside.resolve()}:{line}: train.batch_size: Input should be a valid integer")


def test_the_readme_walks_through_recipes_default_yaml_as_it_is():
    """The README quotes the demo recipe in full: the quote is the file, comments included."""
    readme = (REPO / "README.md").read_text()
    quoted = readme.split("This is `recipes/default.yaml`", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert quoted == default_text()


def test_name_must_match_file(tmp_path):
    path, root = write(tmp_path, default_text().replace("name: default ", "name: other "))
    with pytest.raises(RecipeError, match="name 'other' must match the file name 'default'"):
        load_recipe(path, root=root)


def test_validate_command_exit_codes(tmp_path, monkeypatch, capsys):
    from builder.cli import main

    path, root = write(tmp_path, default_text().replace("  lr: 2.0e-4", "  lr: fast"))
    monkeypatch.chdir(root)
    assert main(["validate"]) == 1
    assert "train.lr: Input should be a valid number" in capsys.readouterr().err
    path.write_text(default_text())
    assert main(["validate"]) == 0


def _schema_keys(model, prefix: str = "") -> list[str]:
    """Every leaf key of a pydantic schema as the docs write it: `train.lora.r`, `sources[].name`."""
    from builder.recipe.schema import _submodel

    keys = []
    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        path = f"{prefix}{name}"
        if sub is None:
            keys.append(path)
        else:
            listed = "tuple" in str(field.annotation) or "list" in str(field.annotation)
            keys += _schema_keys(sub, f"{path}[]." if listed else f"{path}.")
    return keys


def test_every_recipe_and_params_key_is_documented():
    """docs/recipes.md has a row naming every key of the recipe schema and of params.yaml."""
    from builder.recipe.project import Params
    from builder.recipe.schema import Recipe

    text = (REPO / "docs" / "recipes.md").read_text()
    keys = _schema_keys(Recipe) + _schema_keys(Params)
    assert "train.lora.r" in keys and "sources[].name" in keys and "launch.num_processes" in keys
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, f"undocumented keys in docs/recipes.md: {missing}"
