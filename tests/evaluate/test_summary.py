"""The eval summary (builder/evaluate/summary.py): each tuned file against the base model, the
eval/metrics.json and metrics.png of a recipe, and the `tunefile report` table."""
from __future__ import annotations

import json

from builder.evaluate.summary import eval_metrics, eval_panels, format_quant_table, write_eval_png, write_eval_summary
from builder.files import write_json

BASE = {"perplexity": 800.0, "file_bytes": 2**20,
        "checks": {"stop_rate": 0.25, "eos_stop_rate": 0.5, "prompt_strict": 0.5, "prompts": 4},
        "tasks": {"mc": {"acc": 0.25, "acc_norm": 0.5, "samples": 8}}}
TUNED = {"perplexity": 600.0, "file_bytes": 3 * 2**19, "generation_tokens_per_second": 41.5,
         "checks": {"stop_rate": 0.75, "eos_stop_rate": 0.0, "prompt_strict": 0.5, "prompts": 4},
         "tasks": {"mc": {"acc": 0.375, "acc_norm": 0.5, "samples": 8}},
         "template_roundtrip": {"template_equal": True, "tokens_equal": True},
         "template_checks": {"no_double_bos": True}}


def _folders(tmp_path, metrics: dict[str, dict]) -> dict:
    folders = {}
    for name, m in metrics.items():
        folders[name] = tmp_path / "eval" / name
        write_json(folders[name] / "metrics.json", m)
    return folders


def test_each_tuned_file_gets_its_numbers_against_the_base_models(tmp_path):
    folders = _folders(tmp_path, {"base": BASE, "f16": TUNED})
    write_json(tmp_path / "preference" / "metrics.json", {"held_out": {"accuracy": 0.75, "accuracy_sft": 0.5}})
    metrics = eval_metrics(folders, tmp_path / "preference")
    assert list(metrics) == ["base", "f16"] and metrics["base"] == BASE
    assert metrics["f16"]["vs_base"] == {
        "perplexity_base": 800.0, "perplexity_delta": -200.0, "perplexity_ratio": 0.75,
        "stop_rate_base": 0.25, "stop_rate_delta": 0.5, "eos_stop_rate_base": 0.5, "eos_stop_rate_delta": -0.5,
        "prompt_strict_base": 0.5, "prompt_strict_delta": 0.0,
        "tasks": {"mc": {"acc_delta": 0.125, "acc_norm_delta": 0.0, "acc_base": 0.25, "acc_norm_base": 0.5}}}
    assert metrics["f16"]["preference"] == {"accuracy": 0.75, "accuracy_sft": 0.5}


def test_a_missing_base_or_unbuilt_stage_gives_no_comparison(tmp_path):
    folders = _folders(tmp_path, {"f16": TUNED})
    folders["q8_0"] = tmp_path / "eval" / "q8_0"  # never written: {}
    assert eval_metrics(folders) == {"f16": TUNED, "q8_0": {}}


def test_the_summary_files_are_the_metrics_and_a_panel_per_common_metric(tmp_path):
    folders = _folders(tmp_path, {"base": BASE, "f16": TUNED})
    metrics = write_eval_summary(tmp_path / "eval", folders)
    written = (tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8")
    assert written == json.dumps(metrics, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    assert [title for title, _ in eval_panels(metrics)] == [
        "perplexity (assistant tokens)", "stop rate", "stops at EOS, not at the end of turn",
        "instructions followed, strict (prompts)", "mc: acc", "mc: acc_norm"]


def test_eval_plot_has_a_panel_per_metric_every_type_has(tmp_path):
    from PIL import Image

    metrics = {"base": {"perplexity": 800.0, "checks": {"stop_rate": 0.3}, "tasks": {"mc": {"acc": 0.25}}},
               "f16": {"perplexity": 760.0, "checks": {"stop_rate": 0.6}, "tasks": {"mc": {"acc": 0.3}}},
               "q8_0": {"perplexity": 761.0, "checks": {"stop_rate": 0.6}}}
    panels = eval_panels(metrics)
    assert [title for title, _ in panels] == ["perplexity (assistant tokens)", "stop rate"]  # q8_0 ran no task
    assert panels[1][1] == {"base": 0.3, "f16": 0.6, "q8_0": 0.6}
    write_eval_png(metrics, tmp_path / "a.png")
    write_eval_png(metrics, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert Image.open(tmp_path / "a.png").size == (800, 2 * 300)


def test_the_report_table_has_a_row_per_file_with_deltas_and_the_judge(tmp_path):
    folders = _folders(tmp_path, {"base": BASE, "f16": TUNED})
    metrics = eval_metrics(folders)
    metrics["f16"]["judge"] = {"win_rate": 0.625, "win_rate_ci95": [0.25, 1.0]}
    train = {"steps": 60, "train_loss": 6.5, "eval_loss": 6.6, "tokens_per_second": 4080.1, "device": "cpu",
             "precision": "fp32", "padding_fraction": 0.11}
    assert format_quant_table(train, {"base": metrics["base"], "model-f16.gguf": metrics["f16"]}).splitlines() == [
        "train: 60 steps, train loss 6.5, eval loss 6.6, 4080.1 tokens/s on cpu (fp32), padding 11.0%",
        "gguf             MiB  perplexity  vs base  vs first       stop rate       EOS stops       IF strict"
        "          mc acc     judge win vs base  gen tok/s  template",
        "--------------  ----  ----------  -------  --------  --------------  --------------  --------------"
        "  --------------  --------------------  ---------  --------",
        "base            1.00    800.0000        -         -           0.250           0.500           0.500"
        "           0.250                     -          -  -",
        "model-f16.gguf  1.50    600.0000  0.7500x   1.0000x  0.750 (+0.500)  0.000 (-0.500)  0.500 (+0.000)"
        "  0.375 (+0.125)  0.625 [0.250, 1.000]       41.5  ok",
    ]
