"""The ratio report: table, plots and metrics.json from the per-model metrics files."""

from __future__ import annotations

import json

import yaml

from pipeline.eval.report import write_report


def _write(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))


def _metrics(root):
    m = root / "reports" / "metrics"
    for model, score in [("teacher", 0.6), ("0.5", 0.55), ("0.75", 0.5)]:
        _write(m / f"lm_eval_{model}.json", {"model": model, "zero_shot/average": score, "skipped": ["race"]})
        _write(m / f"alpaca_eval_{model}.json", {"model": model, "length_controlled_winrate": 100 * score / 4, "win_rate": 10.0})
        _write(m / f"speed_{model}.json", {"tokens_per_second": 100 / score})
    _write(m / "mt_bench_teacher.json", {"model": "teacher", "average": 6.5})
    _write(m / "judge_check.json", {"mt_bench/spearman": 0.8})
    return m


def test_report_tables_plots_and_metrics(tmp_path):
    metrics = _metrics(tmp_path)
    out = write_report(metrics, tmp_path / "reports", ["teacher", "0.5", "0.75"])
    summary = (tmp_path / "reports" / "summary.md").read_text()
    assert "| lm-eval zero-shot avg | 0.6 | 0.55 | 0.5 |" in summary
    assert "missing metrics file: reports/metrics/mt_bench_0.5.json" in summary
    assert "judge check mt_bench/spearman: 0.800" in summary
    table = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert table["0.75"]["mamba_ratio"] == 0.75 and table["teacher"]["mamba_ratio"] == 0.0
    names = {p.name for p in out["plots"]}
    assert {"score_vs_ratio.png", "speed_vs_quality.png", "bar_lm_eval_zero_shot_avg.png"} <= names


def test_report_stage_runs_from_params(tmp_path, monkeypatch):
    from pipeline.stage import run_stage
    from stages.report import main

    _metrics(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"report": {"models": ["teacher", "0.5"]}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_stage("report", main, ["--params", str(tmp_path / "params.yaml")])
    assert (tmp_path / "reports" / "plots" / "compare" / "score_vs_ratio.png").is_file()
    assert "teacher" in json.loads((tmp_path / "reports" / "metrics.json").read_text())
