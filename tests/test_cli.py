"""The command line on bad input: every command, over a corpus of ordinary mistakes (bad recipes,
bad params, bad rows and encodings, missing files, unknown stages, a closed stdout), exits non-zero
with one `error:` line and never a traceback. Also: RECIPE by name or by path, the project root
found from a subfolder, and `validate` outside any project."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder.cli import main

GOOD = ("name: r\nbase: {model: models/tok}\ntemplate: chatml\nmixture: {eval_fraction: 0.0}\n"
        "sources:\n  - {name: a, path: data/a.jsonl, format: alpaca}\n")
ROWS = "".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}."}) + "\n" for i in range(12))


@pytest.fixture
def project(tokenizer_project):
    """A project with a tokenizer-only base and one good recipe `r`."""
    (tokenizer_project / "recipes" / "r.yaml").write_text(GOOD)
    (tokenizer_project / "data" / "a.jsonl").write_text(ROWS)
    return tokenizer_project


def recipe(root: Path, text: str, name: str = "r") -> None:
    (root / "recipes" / f"{name}.yaml").write_text(text)


# (what is wrong, how to set it up, the command). Each must end in a one-line-cause error.
BAD = {
    "unknown recipe": (None, ["plan", "nope"]),
    "recipe path that does not exist": (None, ["validate", "recipes/missing.yaml"]),
    "recipe path that is a folder": (None, ["validate", "recipes"]),
    "invalid YAML": (lambda r: recipe(r, "name: r\nbase: [unclosed\n"), ["validate", "r"]),
    "recipe not UTF-8": (lambda r: (r / "recipes" / "r.yaml").write_bytes(b"name: r\n# caf\xe9\n"), ["plan", "r"]),
    "unknown key": (lambda r: recipe(r, GOOD + "trian: {lr: 1}\n"), ["build", "r"]),
    "wrong type": (lambda r: recipe(r, GOOD.replace("eval_fraction: 0.0", "eval_fraction: lots")), ["plan", "r"]),
    "missing source file": (lambda r: (r / "data" / "a.jsonl").unlink(), ["build", "r", "--until", "dataset"]),
    "missing template file": (lambda r: recipe(r, GOOD.replace("chatml", "nope.jinja")), ["preview", "r"]),
    "template that does not parse": (
        lambda r: ((r / "t.jinja").write_text("{% for m in messages %}{{ m.content "),
                   recipe(r, GOOD.replace("chatml", "t.jinja"))), ["build", "r", "--until", "dataset"]),
    "every row malformed": (lambda r: (r / "data" / "a.jsonl").write_text("{not json\n" * 5),
                            ["build", "r", "--until", "dataset"]),
    "a .json source that is not JSON": (
        lambda r: ((r / "data" / "b.json").write_text("[{"), recipe(r, GOOD.replace("a.jsonl", "b.json"))),
        ["stats", "r"]),
    "a .csv source with bad bytes only": (
        lambda r: ((r / "data" / "b.csv").write_bytes(b"instruction,output\nx\xff,y\n"),
                   recipe(r, GOOD.replace("a.jsonl", "b.csv"))), ["build", "r", "--until", "dataset"]),
    "a parquet source that is not parquet": (
        lambda r: ((r / "data" / "b.parquet").write_text("nope"), recipe(r, GOOD.replace("a.jsonl", "b.parquet"))),
        ["build", "r", "--until", "dataset"]),
    "decontamination file not UTF-8": (
        lambda r: ((r / "bench.txt").write_bytes(b"caf\xe9\n"),
                   recipe(r, GOOD + "decontaminate: {files: [bench.txt]}\n")), ["build", "r", "--until", "dataset"]),
    "unknown stage": (None, ["stage", "train@x", "r"]),
    "unknown --until stage": (None, ["build", "r", "--until", "nothing"]),
    "report before a build": (None, ["report", "r"]),
    "preview -n 0": (None, ["preview", "r", "-n", "0"]),
    "bad params.yaml key": (lambda r: (r / "params.yaml").write_text("recipes: [r]\ndevise: cpu\n"), ["plan", "r"]),
    "params.yaml not YAML": (lambda r: (r / "params.yaml").write_text("recipes: [r\n"), ["validate"]),
    "params.yaml lists a missing recipe": (lambda r: (r / "params.yaml").write_text("recipes: [r, gone]\n"),
                                           ["dvc", "--check"]),
    "stale dvc.yaml": (lambda r: (r / "dvc.yaml").write_text("stages: {}\n"), ["dvc", "--check"]),
    "unreadable source file": (lambda r: (r / "data" / "a.jsonl").chmod(0) if os.geteuid() else
                               ((r / "data" / "a.jsonl").unlink(), (r / "data" / "a.jsonl").mkdir()),
                               ["build", "r", "--until", "dataset"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_error_line_never_a_traceback(project, capsys, case):
    setup, argv = BAD[case]
    if setup is not None:
        setup(project)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code != 0, (out, err)
    assert "Traceback" not in out + err
    message = err[err.find("error: "):] if "error: " in err else ""
    assert message and "internal error" not in message, err
    assert len(message.strip().splitlines()) <= 3, err  # a cause, not a dump (a recipe may list a few problems)


def run_cli(args: list[str], cwd: Path, shell: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = shell if shell is not None else [sys.executable, "-m", "builder", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, shell=shell is not None)


def test_a_closed_stdout_and_a_bug_are_not_tracebacks(project, monkeypatch, capsys):
    done = run_cli([], project, shell=f"{sys.executable} -m builder plan r | head -n 1")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith("base ")
    # A bug of ours is still one line saying where, and TUNEFILE_DEBUG=1 shows the traceback.
    monkeypatch.setattr("builder.cli.cmd_plan", lambda args: {}["boom"])
    assert main(["plan", "r"]) == 1
    err = capsys.readouterr().err
    assert "internal error" in err and "KeyError" in err and "TUNEFILE_DEBUG=1" in err and "Traceback" not in err
    monkeypatch.setenv("TUNEFILE_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["plan", "r"])


def test_recipe_by_name_or_path_from_anywhere_in_the_project(project, capsys):
    assert main(["build", "recipes/r.yaml", "--until", "dataset"]) == 0
    assert "r/dataset: built" in capsys.readouterr().out
    assert main(["plan", "r"]) == 0
    by_name = capsys.readouterr().out
    assert main(["plan", "recipes/r.yaml"]) == 0
    assert capsys.readouterr().out == by_name
    assert "dataset" in by_name and by_name.splitlines()[1].endswith("up to date")
    os.chdir(project / "recipes")  # the project root is found by walking up
    assert main(["plan", "r.yaml"]) == 0
    assert capsys.readouterr().out == by_name
    assert main(["validate", "r.yaml"]) == 0
    assert capsys.readouterr().out.strip() == f"ok: {project / 'recipes' / 'r.yaml'}"


def test_validate_outside_any_project(tmp_path, capsys, monkeypatch):
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "a.jsonl").write_text(ROWS)
    (alone / "r.yaml").write_text(GOOD.replace("models/tok", "builtin:tiny-llama").replace("data/a.jsonl", "a.jsonl"))
    monkeypatch.chdir(alone)
    assert main(["validate", "r.yaml"]) == 0
    assert capsys.readouterr().out.strip() == f"ok: {alone / 'r.yaml'}"
    (alone / "a.jsonl").unlink()
    assert main(["validate", "r.yaml"]) == 1
    assert "no file matches 'a.jsonl'" in capsys.readouterr().err
    assert main(["plan", "r.yaml"]) == 1  # building needs a project
    assert "no params.yaml" in capsys.readouterr().err


def test_version_prints_the_package_version(capsys):
    import re

    from helpers import REPO

    pinned = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"tunefile {pinned}\n"


def test_a_recipe_error_names_the_file_as_the_docs_show(tmp_path, monkeypatch, capsys):
    """docs/recipes.md quotes `tunefile validate recipes/default.yaml` on a misspelt key: the same
    line, with the project-relative path, is what the command prints."""
    from helpers import REPO, make_project

    quoted = next(line for line in (REPO / "docs" / "recipes.md").read_text().splitlines()
                  if line.startswith("error: recipes/default.yaml:"))
    root = make_project(tmp_path / "p")
    path = root / "recipes" / "default.yaml"
    text = path.read_text()
    assert "  lr: 2.0e-4\n" in text
    path.write_text(text.replace("  lr: 2.0e-4\n", "  lr: 2.0e-4\n  lrr: 3\n"))
    monkeypatch.chdir(root)
    assert main(["validate", "recipes/default.yaml"]) == 1
    assert capsys.readouterr().err == quoted + "\n"


def test_preview_html_writes_the_page_and_prints_one_line(project, capsys):
    assert main(["preview", "r", "--html", "page.html"]) == 0
    assert capsys.readouterr().out == "wrote page.html: 3 examples, 0 rejected\n"
    assert (project / "page.html").read_text().startswith("<!doctype html>")


# A stage's run with the libraries' usual noise: peft reading transformers' deprecated
# is_gradient_checkpointing (train, preference, merge), and llama.cpp's quantizer (quantize@T).
NOISY_STAGE = """
import sys
from pathlib import Path

from builder import cli


def noisy_stage(args):
    import peft
    import transformers

    from builder.export.doctor import write_tiny_gguf
    from builder.export.quantize import quantize_file

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    folder = Path(sys.argv[1])
    write_tiny_gguf(folder / "f16.gguf")
    quantize_file(folder / "f16.gguf", folder / "q8_0.gguf", "q8_0")
    print("stage done")
    return 0


cli.cmd_stage = noisy_stage
sys.exit(cli.main(["stage", "quantize", "r"]))
"""


def test_a_stage_prints_no_third_party_noise_unless_debugging(tmp_path):
    def stage_stderr(debug: bool) -> str:
        env = {k: v for k, v in os.environ.items() if k != "TUNEFILE_DEBUG"}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
        if debug:
            env["TUNEFILE_DEBUG"] = "1"
        done = subprocess.run([sys.executable, "-c", NOISY_STAGE, str(tmp_path)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0 and done.stdout == "stage done\n", done.stderr
        return done.stderr

    quiet, noisy = stage_stderr(debug=False), stage_stderr(debug=True)
    assert "is_gradient_checkpointing" not in quiet and "llama_model_loader" not in quiet, quiet
    assert quiet == ""
    # The same run under TUNEFILE_DEBUG=1 shows both, so the assertions above can fail.
    assert "is_gradient_checkpointing" in noisy and "llama_model_loader" in noisy, noisy
