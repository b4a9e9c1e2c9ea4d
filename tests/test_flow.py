"""The flow's plan: DVC's stage graph, the part a --target needs, dependency order, params profiles."""

from __future__ import annotations

import subprocess
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
