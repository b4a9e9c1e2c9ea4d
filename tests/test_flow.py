"""The flow's plan: DVC's stage graph, the part a --target needs, dependency order, params profiles."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.flow import repro_command, stage_graph, topological_order, upstream_closure, use_params

REPO = Path(__file__).resolve().parents[1]
GRAPH = {"teacher": set(), "prompts": {"teacher"}, "pseudo_labels": {"teacher", "prompts"},
         "distill@0.5": {"pseudo_labels"}, "distill@0.25": {"pseudo_labels"}, "report": {"distill@0.5", "distill@0.25"}}


def test_stage_graph_comes_from_dvc_yaml():
    graph = stage_graph(REPO)
    assert graph["pseudo_labels"] >= {"teacher", "prompts"} and graph["teacher"] == set()


def test_order_puts_ratios_side_by_side_after_their_inputs():
    order = topological_order(GRAPH)
    assert order == ["teacher", "prompts", "pseudo_labels", "distill@0.25", "distill@0.5", "report"]
    assert upstream_closure(GRAPH, "distill@0.5") == {k: GRAPH[k] for k in ("teacher", "prompts", "pseudo_labels", "distill@0.5")}
    with pytest.raises(PipelineError, match="no stage"):
        upstream_closure(GRAPH, "distill@0.75")
    with pytest.raises(PipelineError, match="cycle"):
        topological_order({"a": {"b"}, "b": {"a"}})
    assert repro_command("distill@0.5")[-2:] == ["--single-item", "distill@0.5"]


def test_params_profile_never_overwrites_uncommitted_edits(tmp_path):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("a: 1\n")
    subprocess.run([*git, "add", "params.yaml"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "p"], cwd=tmp_path, check=True)
    (tmp_path / "small.yaml").write_text("a: 2\n")

    use_params(tmp_path / "small.yaml", tmp_path)
    assert (tmp_path / "params.yaml").read_text() == "a: 2\n"
    (tmp_path / "other.yaml").write_text("a: 3\n")
    with pytest.raises(PipelineError, match="uncommitted"):
        use_params(tmp_path / "other.yaml", tmp_path)


def fake_stages(monkeypatch, fail=(), seconds=0.05):
    """Replace the DVC subprocess by a sleep that records which stages ran at the same time."""
    import threading
    import time

    from pipeline import flow

    lock, running, overlaps, started = threading.Lock(), set(), [], []

    def fake(root, stage, parent):
        with lock:
            started.append(stage)
            overlaps.append((stage, frozenset(running)))
            running.add(stage)
        time.sleep(seconds)
        with lock:
            running.discard(stage)
        return (3 if stage in fail else 0), [f"{stage} output"], seconds

    monkeypatch.setattr(flow, "repro_stage_process", fake)
    return overlaps, started


def test_threads_runner_runs_side_by_side_but_speed_alone(monkeypatch):
    from pipeline.flow import run_threads

    graph = {"a": set(), "lm_eval@x": {"a"}, "lm_eval@y": {"a"}, "mt_bench@x": {"a"}, "speed@x": {"a"}, "speed@y": {"a"},
             "report": {"lm_eval@x", "lm_eval@y", "mt_bench@x", "speed@x", "speed@y"}}
    overlaps, started = fake_stages(monkeypatch)
    outcome = run_threads(Path("."), graph, jobs=4, parent={}, log=lambda line: None)
    assert all(result == "done" for result, _ in outcome.values()) and set(outcome) == set(graph)
    assert started[0] == "a" and started[-1] == "report"
    together = {stage: others for stage, others in overlaps}
    assert together["speed@x"] == frozenset() and together["speed@y"] == frozenset()
    assert not any("speed@" in s for others in together.values() for s in others)
    assert any(len(others) >= 1 for stage, others in overlaps if stage.startswith(("lm_eval", "mt_bench")))
    assert set(started[-3:-1]) == {"speed@x", "speed@y"}  # timing stages wait for everything else


def test_threads_runner_starts_the_longest_chain_first(monkeypatch):
    from pipeline.flow import chain_lengths, run_threads

    graph = {"teacher": set(), "side": {"teacher"}, "prompts": {"teacher"}, "labels": {"prompts"}, "distill": {"labels"}}
    assert chain_lengths(graph) == {"teacher": 4, "side": 1, "prompts": 3, "labels": 2, "distill": 1}
    _, started = fake_stages(monkeypatch)
    run_threads(Path("."), graph, jobs=1, parent={}, log=lambda line: None)
    assert started == ["teacher", "prompts", "labels", "side", "distill"]  # side waits behind the chain


def test_threads_runner_keeps_going_past_a_failure(monkeypatch):
    from pipeline.flow import outcome_table, run_threads, topological_order

    graph = {"a": set(), "b": {"a"}, "c": {"b"}, "d": {"a"}, "e": {"c", "d"}}
    fake_stages(monkeypatch, fail=("b",))
    outcome = run_threads(Path("."), graph, jobs=2, parent={}, log=lambda line: None)
    assert outcome["a"][0] == outcome["d"][0] == "done"
    assert outcome["b"][0] == "failed (exit 3)"
    assert outcome["c"][0] == "skipped (after b)" and outcome["e"][0] == "skipped (after c)"
    table = outcome_table(outcome, topological_order(graph))
    assert "failed (exit 3)" in table and table.count("\n") == len(graph)


def test_dvc_yaml_resolves_with_file_sources_for_sft_and_dpo(tmp_path, monkeypatch):
    """The documented alternatives to the pseudo-labels (sft.data / dpo.pairs from files) carry no
    ``dir`` key, so dvc.yaml must not interpolate one."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sft"]["data"] = {"kind": "files", "paths": ["sft.jsonl"]}
    params["dpo"]["pairs"] = {"kind": "files", "paths": ["pairs.jsonl"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy2(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)  # DVC addresses stages relative to the working directory
    graph = stage_graph(tmp_path)
    assert {"sft@0.5", "dpo@0.875"} <= set(graph) and "sft@0.5" in graph["dpo@0.5"]


def test_stage_gate_lets_an_exclusive_stage_run_alone():
    """The Prefect flow submits every task at once; the gate alone keeps speed@* away from the rest."""
    import threading
    import time

    from pipeline.flow import StageGate, is_exclusive

    gate, lock, running, seen = StageGate(), threading.Lock(), set(), {}

    def stage(name):
        with gate.admit(is_exclusive(name)):
            with lock:
                seen[name] = frozenset(running)
                running.add(name)
            time.sleep(0.05)
            with lock:
                running.discard(name)

    names = ["lm_eval@a", "speed@a", "lm_eval@b", "mt_bench@a", "speed@b", "alpaca_eval@a"]
    threads = [threading.Thread(target=stage, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
        time.sleep(0.005)
    for thread in threads:
        thread.join()
    assert seen["speed@a"] == frozenset() and seen["speed@b"] == frozenset()
    assert not any(s.startswith("speed@") for others in seen.values() for s in others)
    assert any(others for name, others in seen.items() if not is_exclusive(name))


def test_stage_output_streams_to_its_log_file(tmp_path, monkeypatch):
    """A stage's output is in logs/<stage>.log while it still runs (so a killed stage leaves its log)."""
    import threading

    from pipeline import flow

    go = tmp_path / "go"
    # prints without flushing, then waits (at most 20 s) until the test has seen the line in the log
    script = ("import os, sys, time; print('step 1'); print('warn', file=sys.stderr)\n"
              f"deadline = time.time() + 20\nwhile not os.path.exists({str(go)!r}) and time.time() < deadline: time.sleep(0.05)\n"
              "sys.exit(5)")
    monkeypatch.setattr(flow, "repro_command", lambda stage: [sys.executable, "-c", script])
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # the flow itself must make the stage unbuffered
    log = flow.stage_log_path(tmp_path, "distill@0.5")
    seen = []

    def watch():
        for _ in range(400):
            if log.is_file() and "step 1" in log.read_text():
                seen.append(True)
                break
            time.sleep(0.05)
        go.touch()

    watcher = threading.Thread(target=watch)
    watcher.start()
    code, lines, seconds = flow.repro_stage_process(tmp_path, "distill@0.5", {})
    watcher.join()
    assert seen, "the stage's output did not reach its log file while it ran"
    assert code == 5 and sorted(lines) == ["step 1", "warn"] and seconds >= 0
    first_run = log.read_text()
    assert first_run.startswith("==== ") and sorted(first_run.splitlines()[1:]) == ["step 1", "warn"]

    # a second run (DVC skipping the stage, say) is appended after its own header: the first stays
    # the flow's parent-run group reaches the stage process (its first stage creates the MLflow parent)
    script = "import os; print('skipping', os.environ['PIPELINE_PARENT_GROUP'], os.environ['PIPELINE_PARENT_NAME'])"
    monkeypatch.setattr(flow, "repro_command", lambda stage: [sys.executable, "-c", script])
    code, lines, _ = flow.repro_stage_process(tmp_path, "distill@0.5", flow.parent_env("g-1", "flow x"))
    assert code == 0 and lines == ["skipping g-1 flow x"]
    text = log.read_text()
    assert text.startswith(first_run) and text.count("==== ") == 2 and text.rstrip().endswith("skipping g-1 flow x")


def test_dry_run_prints_the_plan_and_touches_nothing(capsys, monkeypatch):
    """``--dry-run`` (what the README test uses for flow commands): checked arguments, the order, no run."""
    from pipeline.flow import main

    monkeypatch.chdir(REPO)
    before = (REPO / "params.yaml").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["--target", "pseudo_labels", "--runner", "threads", "--dry-run"])
    assert exit_info.value.code == 0
    assert "stages in DVC order: teacher, prompts, pseudo_labels" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--params", "no-such-profile.yaml", "--dry-run"])
    assert exit_info.value.code == 2 and "no-such-profile.yaml not found" in capsys.readouterr().err
    assert (REPO / "params.yaml").read_bytes() == before
