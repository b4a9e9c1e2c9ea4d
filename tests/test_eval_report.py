"""The results page: per-profile results files merged, RESULTS.md rendered with tags, units, smoke
labels and judge gating, plots and headline metrics."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.errors import PipelineError
from pipeline.eval.report import ReportParams, headline, write_report

MODELS = ("teacher", "0.5", "0.75")


def _write(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))


def _metrics(root, scale=1.0, judge=None, tiny_speed=False):
    """Per-model metrics files as the stages write them; ``judge`` is judge_check.json's body."""
    m = root / "reports" / "metrics"
    for model, score in [("teacher", 0.6), ("0.5", 0.54), ("0.75", 0.45)]:
        _write(m / f"lm_eval_{model}.json", {"model": model, "zero_shot/average": score * scale,
                                             "extra/lambada_openai/acc": score / 2, "skipped": ["race"]})
        _write(m / f"alpaca_eval_{model}.json", {"model": model, "length_controlled_winrate": 100 * score / 4,
                                                 "win_rate": 10.0, "n_total": 8.0})
        _write(m / f"mt_bench_{model}.json", {"model": model, "average": 10 * score, "n_rated": 8.0})
        plain = {"b1_p48": {"tokens_per_s": 100 / score}, "b1_p2048": {"tokens_per_s": 50 / score},
                 "b2_p48": {"tokens_per_s": 150 / score}}
        _write(m / f"speed_{model}.json", {"plain": plain, "settings": {"new_tokens": 8, "kernels": "reference"}, "tiny_cpu_settings": tiny_speed,
                                           "hardware": {"device": "cpu", "cpu": "x86_64", "cpu_count": 2}})
        if model != "teacher":
            _write(m / f"distill_{model}.json", {"held_out": {"trained": {"kl": 2 * score, "top1_agreement": score, "tokens": 152}},
                                                 "train_tokens": 8192, "attention_layers": [0, 2, 5], "num_layers": 10})
    if judge is not None:
        _write(m / "judge_check.json", judge)
    return m


def _run(root, profile, judge=None, min_spearman=0.7, scale=1.0, date="2026-01-02", commit="abc1234", device=None,
         lm_eval_dir=None):
    metrics = _metrics(root, scale=scale, judge=judge)
    params = ReportParams(profile=profile, models=MODELS, judge_min_spearman=min_spearman)
    device = device or ("NVIDIA H100 80GB HBM3" if profile == "gpu" else None)
    return write_report(metrics, root, params, device=device, commit=commit, date=date, lm_eval_dir=lm_eval_dir)


def _table_rows(page, section):
    """The table lines of one profile's section of RESULTS.md."""
    body = page.split(section, 1)[1].split("\n## ", 1)[0]
    return [line for line in body.splitlines() if line.startswith("| **")]


def test_page_renders_both_profiles_with_tags(tmp_path):
    _run(tmp_path, "gpu", commit="1111111", date="2026-01-01")
    out = _run(tmp_path, "cpu", commit="2222222", date="2026-01-02")
    page = (tmp_path / "RESULTS.md").read_text()
    assert "## GPU profile" in page and "## CPU profile" in page
    assert "git history" in page and "dvc metrics diff" in page and "dvc exp show" in page
    gpu_rows, cpu_rows = _table_rows(page, "## GPU profile"), _table_rows(page, "## CPU profile")
    assert len(gpu_rows) == len(cpu_rows) == 3
    assert all(r.endswith("| gpu | NVIDIA H100 80GB HBM3 | 1111111 | 2026-01-01 |") for r in gpu_rows)
    assert all(r.endswith("| cpu | CPU (x86_64, 2 cores) | 2222222 | 2026-01-02 |") for r in cpu_rows)  # device from speed metrics
    assert cpu_rows[1].startswith("| **0.5** (0.700 exact) | 0.540 | 90% |")  # retention = 0.54 / 0.6
    assert {p.name for p in out["plots"]} == {f"{p}_{kind}.png" for p in ("cpu", "gpu") for kind in ("retention", "speed_vs_quality")}
    assert "![gpu_retention](reports/plots/results/gpu_retention.png)" in page
    assert {p.name for p in out["headlines"]} == {f"{p}_{m}.json" for p in ("cpu", "gpu") for m in MODELS}


def test_a_run_replaces_its_profile_and_keeps_the_other(tmp_path):
    _run(tmp_path, "gpu", scale=1.0, date="2026-01-01")
    gpu_file = (tmp_path / "reports" / "results_gpu.json").read_bytes()
    _run(tmp_path, "cpu", scale=1.0, date="2026-01-02")
    _run(tmp_path, "cpu", scale=0.5, date="2026-01-03")  # a second CPU run with other numbers
    assert (tmp_path / "reports" / "results_gpu.json").read_bytes() == gpu_file
    cpu = json.loads((tmp_path / "reports" / "results_cpu.json").read_text())
    assert cpu["date"] == "2026-01-03" and [r["model"] for r in cpu["rows"]] == list(MODELS)
    assert cpu["rows"][0]["zero_shot_avg"] == pytest.approx(0.3)
    page = (tmp_path / "RESULTS.md").read_text()
    assert "| gpu | NVIDIA H100 80GB HBM3 | abc1234 | 2026-01-01 |" in page and "2026-01-02" not in page


def test_a_profile_that_never_ran_is_said_so(tmp_path):
    _run(tmp_path, "cpu")
    page = (tmp_path / "RESULTS.md").read_text()
    assert "No results yet" in page.split("## GPU profile", 1)[1]
    assert json.loads((tmp_path / "reports" / "results_gpu.json").read_text())["rows"] == []


def test_judge_gating_labels_figures_below_the_threshold(tmp_path):
    judge = {"mt_bench/spearman": 0.8, "alpaca_eval/length_controlled_winrate/spearman": 0.1,
             "alpaca_eval/win_rate/spearman": -0.55}
    out = _run(tmp_path, "gpu", judge=judge, min_spearman=0.7)
    page = (tmp_path / "RESULTS.md").read_text()
    teacher = _table_rows(page, "## GPU profile")[0]
    assert "| 6.00 |" in teacher  # MT-Bench: judge above the threshold, a plain score
    assert "| 15.0 *unvalidated* | 10.0 *unvalidated* |" in teacher  # AlpacaEval LC and WR: judge below
    assert "Judge check, MT-Bench:" in page and "are validated" in page
    assert "runs roughly in reverse (Spearman -0.55; threshold 0.70)" in page
    assert "agrees no better than chance (Spearman +0.10" in page
    flat = json.loads((tmp_path / "reports" / "headline" / "gpu_teacher.json").read_text())
    assert flat["mt_bench"] == 6.0 and "alpaca_lc_winrate_unvalidated" in flat and "alpaca_lc_winrate" not in flat
    trust = next(line for line in page.splitlines() if line.startswith("- **GPU profile:**"))
    assert trust.startswith("- **GPU profile:** trust held-out KL and top-1 agreement, decode speed (on NVIDIA H100 80GB HBM3), MT-Bench.")
    assert "Do not read the AlpacaEval LC win-rate, AlpacaEval win-rate figures as scores" in trust
    assert "items per task the lm-eval accuracies rest on was not recorded" in trust
    # a stricter threshold turns the MT-Bench figure unvalidated too, in the page and the headline metrics
    assert "mt_bench_unvalidated" in headline(out["record"], 0.9)["0.5"]
    _run(tmp_path, "gpu", judge=judge, min_spearman=0.9)
    assert "| 6.00 *unvalidated* |" in _table_rows((tmp_path / "RESULTS.md").read_text(), "## GPU profile")[0]


def test_lm_eval_item_counts_bound_what_the_summary_trusts(tmp_path):
    for model in MODELS:  # lm-eval's own results, as the lm_eval stage keeps them: items scored per task
        tasks = {"arc_easy": {"n": 16}, "piqa": {"n": 16}, "mmlu": {"n": None}}
        _write(tmp_path / "lm_eval" / model / "results.json", {"suites": {"zero_shot": {"tasks": tasks}}})
    _run(tmp_path, "gpu", lm_eval_dir=tmp_path / "lm_eval")
    page = (tmp_path / "RESULTS.md").read_text()
    assert "lm-eval 16 items per task (standard error up to ±0.12)" in page
    assert "rest on 16 items per task: differences under about 0.25 (two standard errors) are noise" in page


def test_judged_figures_without_a_judge_check_are_unvalidated(tmp_path):
    _run(tmp_path, "gpu", judge=None)
    page = (tmp_path / "RESULTS.md").read_text()
    assert "Judge check, MT-Bench: not run" in page
    assert all("*unvalidated*" in row for row in _table_rows(page, "## GPU profile"))
    assert "Do not read the MT-Bench, AlpacaEval LC win-rate, AlpacaEval win-rate figures as scores" in page


def test_summary_labels_smoke_values_units_and_empty_columns(tmp_path):
    _run(tmp_path, "cpu", judge={"mt_bench/spearman": 0.9})
    page = (tmp_path / "RESULTS.md").read_text()
    assert "**CPU profile: smoke values only.**" in page and "## CPU profile (`params.yaml`, the default): smoke values" in page
    header = next(line for line in page.splitlines() if line.startswith("| model |"))
    for unit in ("(acc, 0–1)", "(÷ teacher)", "(nats/token)", "MT-Bench (1–10)", "win rate (%)",
                 "decode (tok/s, batch 1, 48-token prompt)", "decode (tok/s, batch 1, 2,048-token prompt)"):
        assert unit in header
    assert "MMLU" not in header  # no row has it: left out, and said why
    assert "Not measured in this run (columns left out): MMLU 5-shot: no `mmlu_5shot` suite in `lm_eval.suites`." in page
    teacher = _table_rows(page, "## CPU profile")[0]
    assert "| 0 (ref.) | 1 (ref.) |" in teacher  # the teacher's own KL / agreement, not a blank
    assert "held-out KL and top-1 over 152 answer tokens" in page and "8,192 distillation tokens per ratio" in page
    assert "MT-Bench 4 questions × 2 turns" in page and "AlpacaEval 8 instructions" in page
    assert "speed: 8 new tokens after prompts of 48 / 2,048 tokens, `reference` decoding step" in page


def test_report_params_defaults_and_unknown_keys():
    assert ReportParams.from_cfg({}) == ReportParams(profile="cpu", judge_min_spearman=0.7)
    assert ReportParams.from_cfg({"profile": "gpu", "models": ["teacher", 0.5]}).models == ("teacher", "0.5")
    with pytest.raises(PipelineError, match="unknown report params"):
        ReportParams.from_cfg({"speed_key": "tokens_per_second"})
    with pytest.raises(PipelineError, match="not one of"):
        ReportParams.from_cfg({"profile": "tpu"})


def test_report_stage_runs_from_params(tmp_path, monkeypatch):
    from pipeline.stage import run_stage
    from stages.report import main

    _metrics(tmp_path, judge={"mt_bench/spearman": 0.1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"report": {"profile": "cpu", "models": ["teacher", "0.5"]}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PIPELINE_GIT_COMMIT", "0123456789abcdef")
    run_stage("report", main, ["--params", str(tmp_path / "params.yaml")])
    assert (tmp_path / "reports" / "plots" / "results" / "cpu_retention.png").is_file()
    record = json.loads((tmp_path / "reports" / "results_cpu.json").read_text())
    assert record["commit"] == "0123456" and [r["model"] for r in record["rows"]] == ["teacher", "0.5"]
    assert json.loads((tmp_path / "reports" / "headline" / "cpu_0.5.json").read_text())["mt_bench_unvalidated"] == 5.4
    assert "| cpu | CPU (x86_64, 2 cores) | 0123456 |" in (tmp_path / "RESULTS.md").read_text()
    from pipeline.tracking import client

    mlflow_client, experiment_id = client({})
    (run,) = [r for r in mlflow_client.search_runs([experiment_id]) if r.info.run_name == "report"]
    metrics, tags = run.data.metrics, run.data.tags
    assert metrics["0.5/mt_bench_unvalidated"] == 5.4 and "0.5/mt_bench" not in metrics  # never logged as a score
    assert metrics["judge_check/mt_bench/spearman"] == 0.1 and tags["judge.mt_bench"] == "unvalidated"
    assert metrics["0.5/held_out_kl"] == pytest.approx(1.08) and run.data.params["report.profile"] == "cpu"


def _lm_eval_results(root, patterns, limit=None, tasks=("arc_easy", "piqa")):
    """results.json + items.jsonl per model as the lm_eval stage writes them, from 0/1 item patterns;
    the lm_eval metrics file gets the same zero-shot average."""
    import math

    from pipeline.eval.lm_eval_tasks import items_jsonl

    for model, per_task in patterns.items():
        summary, records = {}, []
        for task in tasks:
            values = per_task[task]
            acc = sum(values) / len(values)
            summary[task] = {"acc": acc, "acc_stderr": math.sqrt(acc * (1 - acc) / (len(values) - 1)), "n": len(values)}
            records.append({"suite": "zero_shot", "task": task, "subtask": task, "doc_id": list(range(len(values))),
                            "doc_hash": f"h-{task}", "acc": "".join(str(v) for v in values)})
        average = sum(t["acc"] for t in summary.values()) / len(summary)
        _write(root / "lm_eval" / model / "results.json",
               {"limit": limit, "suites": {"zero_shot": {"num_fewshot": 0, "tasks": summary, "average": average, "skipped": {}}}})
        (root / "lm_eval" / model / "items.jsonl").write_text(items_jsonl(records))
        metrics = root / "reports" / "metrics" / f"lm_eval_{model}.json"
        body = json.loads(metrics.read_text())
        body["zero_shot/average"] = average
        metrics.write_text(json.dumps(body))


def _patterns(n=400):
    """teacher: 60% right; 0.5: the teacher's answers exactly; 0.75: wrong on a fixed 30% of the teacher's right items."""
    import random

    out = {"teacher": {}, "0.5": {}, "0.75": {}}
    for k, task in enumerate(("arc_easy", "piqa")):
        rng = random.Random(k)
        teacher = [1] * int(0.6 * n) + [0] * (n - int(0.6 * n))
        rng.shuffle(teacher)
        right = [i for i, v in enumerate(teacher) if v]
        dropped = set(rng.sample(right, int(0.3 * len(right))))
        out["teacher"][task] = teacher
        out["0.5"][task] = list(teacher)
        out["0.75"][task] = [0 if i in dropped else v for i, v in enumerate(teacher)]
    return out


def test_retention_carries_a_paired_bootstrap_interval_and_is_called_only_outside_it(tmp_path):
    from pipeline.eval.report import retention_metrics

    metrics = _metrics(tmp_path, judge={"mt_bench/spearman": 0.9})
    _lm_eval_results(tmp_path, _patterns())
    params = ReportParams(profile="gpu", models=MODELS, bootstrap_iters=1000)
    out = write_report(metrics, tmp_path, params, device="NVIDIA H100 80GB HBM3", commit="abc1234", date="2026-01-02",
                       lm_eval_dir=tmp_path / "lm_eval")
    page = (tmp_path / "RESULTS.md").read_text()
    teacher, same, worse = _table_rows(page, "## GPU profile")[:3]
    assert "| 0.600 | 100% |" in teacher
    assert "| 0.600 | 100% [100%–100%] |" in same  # identical answers: every resample agrees, not called
    cell = worse.split(" | ")[2]
    assert cell.startswith("**70% [") and cell.endswith("%]**")  # bold: the interval excludes 100%
    low, high = (int(x.rstrip("%]*")) for x in cell[len("**70% ["):].split("–"))  # [low%–high%]
    assert 60 <= low < 70 < high <= 80
    assert "Zero-shot retention, 95% paired-bootstrap interval over items: below the teacher for 0.75; not called for 0.5" in page

    per_task = page.split("### lm-eval per task: `zero_shot` (0-shot)", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in per_task.splitlines() if line.startswith("| ")]
    assert lines[0] == ("| task | items | metric | teacher (score ± s.e.) | 0.5 (score ± s.e.) | 0.75 (score ± s.e.) "
                        "| 0.5 ÷ teacher (95% CI) | 0.75 ÷ teacher (95% CI) |")
    assert lines[1].startswith("| ARC-Easy | 400 | acc | 0.600 ± 0.025 | 0.600 ± 0.025 | 0.420 ± 0.025 | 100% [100%–100%] | **70% [")
    assert lines[2].startswith("| PIQA | 400 | acc |") and lines[3].startswith("| **average** |  | mean of tasks | 0.600 |")
    assert "Items: every item of each task (`lm_eval.limit: null`)." in per_task
    assert "paired bootstrap (1,000 resamples of the items" in per_task

    record = json.loads((tmp_path / "reports" / "results_gpu.json").read_text())
    arc = record["lm_eval"]["suites"]["zero_shot"]["tasks"][0]
    assert arc["task"] == "arc_easy" and arc["retention"]["0.75"]["called"] and not arc["retention"]["0.5"]["called"]
    assert arc["retention"]["0.75"]["difference"][0] == pytest.approx(-0.18)
    flat = json.loads((tmp_path / "reports" / "headline" / "gpu_0.75.json").read_text())
    assert flat["zero_shot_retention"] == pytest.approx(0.7) and flat["zero_shot_retention_high"] < 1
    logged = retention_metrics(out["record"])
    assert logged["0.75/retention/zero_shot/average_called"] == 1.0 and logged["0.5/retention/zero_shot/piqa"] == 1.0
    assert logged["0.75/retention/zero_shot/arc_easy_low"] < 0.7 < logged["0.75/retention/zero_shot/arc_easy_high"]
    # the same run again: the same intervals (seeded)
    again = write_report(metrics, tmp_path, params, device="NVIDIA H100 80GB HBM3", commit="abc1234", date="2026-01-02",
                         lm_eval_dir=tmp_path / "lm_eval")
    assert retention_metrics(again["record"]) == logged


def test_a_limited_run_says_so_and_other_items_are_not_paired(tmp_path):
    metrics = _metrics(tmp_path)
    patterns = _patterns(n=10)
    _lm_eval_results(tmp_path, patterns, limit=10)
    other = tmp_path / "lm_eval" / "0.5" / "items.jsonl"  # 0.5 scored on other documents of piqa
    other.write_text(other.read_text().replace('"doc_hash":"h-piqa"', '"doc_hash":"other"'))
    write_report(metrics, tmp_path, ReportParams(profile="cpu", models=MODELS, bootstrap_iters=200), commit="abc1234",
                 date="2026-01-02", lm_eval_dir=tmp_path / "lm_eval")
    page = (tmp_path / "RESULTS.md").read_text()
    assert "Items: each task cut to its first 10 (`lm_eval.limit: 10`; MMLU: 10 per subject), so these are smoke values" in page
    assert "PIQA: 0.5 scored on other items than the teacher: no retention." in page
    same = _table_rows(page, "## CPU profile")[1]
    assert "| 100% |" in same  # no interval for an average whose items are not all paired
    assert "lm-eval 10 items per task" in page


def test_long_context_rows_and_skipped_lengths(tmp_path):
    metrics = _metrics(tmp_path)
    settings = {"passkey": {"lengths": [1024, 4096, 8192], "depths": [0.0, 0.5, 1.0], "items": 10, "seed": 0},
                "perplexity": {"source": "alpaca_eval/model_outputs/gpt4_1106_preview.jsonl", "length": 4096, "streams": 8}}
    for model, acc in [("teacher", 1.0), ("0.5", 0.6)]:
        buckets = [{"label": "0-512", "ppl": 12.0 / acc, "tokens": 4000}, {"label": "512-1024", "ppl": 10.0 / acc, "tokens": 4096}]
        _write(metrics / f"long_context_{model}.json", {
            "model": model, "settings": settings,
            "passkey": {"1024": {"accuracy": acc, "n": 30, "by_depth": {"0": acc}}, "4096": {"accuracy": acc / 2, "n": 30}},
            "perplexity": {"buckets": buckets},
            "skipped": [{"kind": "passkey", "length": 8192, "note": "passkey at 8,192 tokens: beyond the model's 4,096 positions"}],
        })
    write_report(metrics, tmp_path, ReportParams(profile="gpu", models=MODELS), device="H100", commit="abc1234",
                 date="2026-01-02")
    page = (tmp_path / "RESULTS.md").read_text()
    section = page.split("### Long-context recall", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows[0] == ("| model | passkey @1k (exact, 0–1) | passkey @4k (exact, 0–1) | passkey @8k (exact, 0–1) "
                       "| ppl tokens 0-512 | ppl tokens 512-1024 |")
    assert rows[1] == "| **teacher** | 1.00 | 0.50 | skipped | 12.0 | 10.0 |"
    assert rows[2] == "| **0.5** (0.700 exact) | 0.60 | 0.30 | skipped | 20.0 | 16.7 |"
    assert "| **0.75**" not in section  # no long-context metrics: no row
    assert "depths 0%, 50%, 100% of the context, 10 keys per length and depth" in section
    assert "Skipped: passkey at 8,192 tokens: beyond the model's 4,096 positions" in section
    flat = json.loads((tmp_path / "reports" / "headline" / "gpu_0.5.json").read_text())
    assert flat["passkey_1024"] == 0.6 and flat["ppl_0-512"] == pytest.approx(20.0)
    assert "long-context recall" in next(line for line in page.splitlines() if line.startswith("- **GPU profile:**"))


def test_studies_render_with_their_provenance(tmp_path):
    """A study file under reports/studies/ becomes a section of the page naming device, commit, date and command."""
    from pipeline.eval.studies import studies_markdown

    assert studies_markdown(tmp_path) == []
    held = {w: {"kl": kl, "top1_agreement": t} for w, kl, t in (("init", 1.5, 0.45), ("aligned", 0.3, 0.75), ("trained", 0.2, 0.8))}
    run = {"held_out": held, "train_tokens": 1024, "align": {"tokens": 2048}, "throughput": {"tokens_per_s": 30000.0, "mfu": 0.04}}
    study = {"tuned": {"meta": {"device": "NVIDIA H100", "commit": "abc1234", "date": "2026-12-08", "what": "the recipe",
                                "argv": ["--tokens", "1024"]},
                       "align": {"overrides": {}, "runs": {"0.5": run}}}}
    folder = tmp_path / "reports" / "studies"
    folder.mkdir(parents=True)
    (folder / "distill_recipe.json").write_text(json.dumps(study))
    text = "\n".join(studies_markdown(tmp_path))
    assert "## Studies" in text and "NVIDIA H100, commit abc1234, 2026-12-08. The recipe." in text
    assert "`python3 benchmarks/distill_ablation.py --tokens 1024`" in text
    assert "| fit + layer alignment | 0.5 | 1,024 | 2,048 | 1.500 / 0.450 | 0.300 / 0.750 | 0.200 / 0.800 | 30,000 | 4.0% |" in text
