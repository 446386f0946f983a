"""The `tunefile` command line: parse arguments, call one function, print.

    tunefile validate [RECIPE...]        tunefile plan RECIPE
    tunefile build RECIPE [--until S]    tunefile stage STAGE RECIPE
    tunefile preview RECIPE [-n N] [--tokens] [--html FILE]      tunefile stats RECIPE
    tunefile report RECIPE
    tunefile dvc [--check]               tunefile resolve        tunefile vendor
    tunefile doctor                      (does llama-cpp-python run GGUF files on this CPU?)
    tunefile --version
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from builder import __version__
from builder.data.preview import preview
from builder.data.report import format_stats_table
from builder.engine.build import build_recipe, quant_report, run_dvc_stage, stage_map, stage_status
from builder.engine.resolve import dvc_yaml_text, resolve
from builder.errors import RecipeError, TunefileError
from builder.evaluate.summary import format_quant_table
from builder.export.doctor import run_doctor
from builder.export.vendor import ensure_converter
from builder.files import write_atomic
from builder.recipe.project import find_root, load_project, load_standalone

DEBUG_ENV = "TUNEFILE_DEBUG"  # =1: let exceptions through with their traceback, and third-party noise
LLAMA_CPP_LOGGER = "llama-cpp-python"  # the logging.Logger whose level llama-cpp-python's log callback reads


def _project():
    return load_project()


def cmd_validate(args: argparse.Namespace) -> int:
    if find_root() is None and args.recipes:
        # Outside any project: each recipe alone, paths relative to the current folder, default
        # machine settings (params.yaml's defaults).
        projects = [(load_standalone(), ref) for ref in args.recipes]
    else:
        project = _project()
        projects = [(project, ref) for ref in args.recipes or list(project.params.recipes)]
    problems = []
    for project, ref in projects:
        try:
            project.load_recipe(ref)
            print(f"ok: {project.recipe_path(ref)}")
        except RecipeError as exc:
            problems += exc.problems
    if problems:
        raise RecipeError(problems)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    project = _project()
    recipe, plan = stage_map(project, args.recipe)
    for stage in plan.values():
        print(f"{stage.name:<20} {stage.key[:12]}  {stage_status(project, stage)}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    build_recipe(_project(), args.recipe, args.until, say=print)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    project = _project()
    # A no-op when the dataset is current; progress goes to stderr, the table to stdout.
    recipe = build_recipe(project, args.recipe, "dataset", say=lambda line: print(line, file=sys.stderr))
    folder = project.stage_dir(recipe.name, "dataset")
    stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    print(format_stats_table(stats, color=sys.stdout.isatty()), end="")
    print(f"\nrejected rows: {folder / 'rejects.jsonl'}\nmixture picture: {folder / 'mixture.png'}")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    run_dvc_stage(_project(), args.recipe, args.stage, say=print)
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    for line in resolve():
        print(line)
    return 0


def cmd_dvc(args: argparse.Namespace) -> int:
    path, text = dvc_yaml_text()
    current = path.read_text() if path.is_file() else None
    if args.check:
        if current != text:
            raise TunefileError(f"{path} is stale; run `tunefile dvc` and commit it")
        print(f"{path}: up to date")
        return 0
    if current != text:
        write_atomic(path, text)
        print(f"wrote {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    print(format_quant_table(*quant_report(_project(), args.recipe)), end="")
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    color = sys.stdout.isatty() and not args.no_color
    html_path = Path(args.html) if args.html else None
    print(preview(_project(), args.recipe, n=args.n, html_path=html_path, show_tokens=args.tokens, color=color),
          end="")
    return 0


def cmd_vendor(args: argparse.Namespace) -> int:
    print(ensure_converter())
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    run_doctor()
    print("doctor: llama-cpp-python loads and decodes f16, q8_0 and q4_k_m files on this CPU")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunefile", description="Declarative builds for instruction tuning.")
    parser.add_argument("--version", action="version", version=f"tunefile {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check recipes without building")
    p.add_argument("recipes", nargs="*", help="recipe names or paths (default: params.yaml's list)")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("build", help="build a recipe without DVC (same code as the DVC stages)")
    p.add_argument("recipe")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage or kind (dataset, quantize@q8_0, quantize)")
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("stage", help="run one stage, or every stage of a kind (what dvc.yaml calls)")
    p.add_argument("stage")
    p.add_argument("recipe")
    p.set_defaults(func=cmd_stage)
    for name, func, text in (
            ("plan", cmd_plan, "each stage, its key, and whether it is up to date"),
            ("stats", cmd_stats, "mixture report: per source rows, rejects by reason, tokens, trained tokens"),
            ("report", cmd_report, "training summary and the quantization matrix (size, perplexity, speed)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("recipe")
        p.set_defaults(func=func)
    p = sub.add_parser("preview", help="render the first examples with trained text highlighted")
    p.add_argument("recipe")
    p.add_argument("-n", type=int, default=3, help="examples to show, round-robin over sources (default 3)")
    p.add_argument("--tokens", action="store_true", help="show token boundaries and which tokens carry loss")
    p.add_argument("--html", metavar="FILE", help="write a scrollable HTML page instead of printing")
    p.add_argument("--no-color", action="store_true", help="mark trained text with ⟦ ⟧ instead of colour")
    p.set_defaults(func=cmd_preview)
    p = sub.add_parser("resolve", help="write the spec files dvc.yaml's stages depend on")
    p.set_defaults(func=cmd_resolve)
    p = sub.add_parser("dvc", help="write (or --check) dvc.yaml from params.yaml")
    p.add_argument("--check", action="store_true")
    p.set_defaults(func=cmd_dvc)
    p = sub.add_parser("vendor", help="fetch llama.cpp's HF->GGUF converter for the installed llama-cpp-python")
    p.set_defaults(func=cmd_vendor)
    p = sub.add_parser("doctor", help="check that llama-cpp-python quantizes and decodes GGUF files on this CPU")
    p.set_defaults(func=cmd_doctor)
    return parser


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame of tunefile's own code that the exception passed through."""
    import traceback
    from pathlib import Path

    package = str(Path(__file__).resolve().parent)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(package)]
    frame = frames[-1] if frames else None
    return f" at {Path(frame.filename).relative_to(Path(package).parent)}:{frame.lineno}" if frame else ""


def _silence_stdout() -> None:
    # The reader went away (`tunefile plan | head -1`): drop what is still buffered, quietly.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def quiet_third_party() -> None:
    """Silence what libraries print on every stage run and nobody can act on (TUNEFILE_DEBUG=1
    keeps it): peft reading transformers' deprecated `is_gradient_checkpointing` (a FutureWarning
    per train, preference and merge), and llama.cpp's loader log on stderr (some 64 lines per
    quantize@T; llama-cpp-python prints it when its logger is below ERROR, as it is until a model
    is opened with verbose=False). llama.cpp's errors still print."""
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.getLogger(LLAMA_CPP_LOGGER).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input ends in one `error: ...` line and exit 1, never a traceback
    (TUNEFILE_DEBUG=1 shows it, and the libraries' noise quiet_third_party silences)."""
    args = make_parser().parse_args(argv)
    debug = os.environ.get(DEBUG_ENV) == "1"
    if not debug:
        quiet_third_party()
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _silence_stdout()
        return 141  # as a shell reports a command ended by SIGPIPE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except TunefileError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if debug:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except Exception as exc:
        if debug:
            raise
        print(f"error: internal error{_where(exc)}: {type(exc).__name__}: {exc} "
              f"(rerun with {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
