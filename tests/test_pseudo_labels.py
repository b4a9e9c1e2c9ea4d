"""Pseudo-labels: resume after a kill is byte-identical, stale shards are never reused, counts add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.data.pseudo_labels import GenerationParams, generate_pseudo_labels, read_prompts
from pipeline.errors import PipelineError
from tests.tiny_teacher import build_tiny_teacher

PARAMS = dict(max_new_tokens=6, batch_size=2, shard_size=3, seed=7, do_sample=True, temperature=0.9, top_p=0.95, top_k=40)


class Killed(RuntimeError):
    pass


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return build_tiny_teacher(tmp_path_factory.mktemp("teacher") / "teacher")


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [[{"role": "user", "content": f"question {i}? " * (1 + i % 3)}] for i in range(10)]
    rows[4] = [{"role": "system", "content": "be brief"}, *rows[4]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(prompts, teacher, out, written=None, kill_after=None, **overrides):
    def on_shard_written(index):
        if written is not None:
            written.append(index)
        if kill_after is not None and len(written) == kill_after:
            raise Killed(f"killed after shard {index}")

    params = GenerationParams.from_cfg({**PARAMS, **overrides})
    return generate_pseudo_labels(prompts, teacher, out, params, on_shard_written=on_shard_written, progress=False)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_killed_run_resumes_to_byte_identical_output(prompts, teacher, tmp_path):
    run(prompts, teacher, tmp_path / "whole")

    written = []
    with pytest.raises(Killed):
        run(prompts, teacher, tmp_path / "resumed", written=written, kill_after=2)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    resumed_written = []
    run(prompts, teacher, tmp_path / "resumed", written=resumed_written)

    assert written == [0, 1] and resumed_written == [2, 3]  # finished shards were kept, not regenerated
    assert snapshot(tmp_path / "resumed") == snapshot(tmp_path / "whole")


def test_changed_params_regenerate_every_shard(prompts, teacher, tmp_path):
    out = tmp_path / "out"
    first = run(prompts, teacher, out)
    written = []
    second = run(prompts, teacher, out, written=written, temperature=0.5, shard_size=5)

    assert written == [0, 1]
    assert sorted(p.name for p in out.glob("shard-*.jsonl")) == ["shard-00000.jsonl", "shard-00001.jsonl"]
    assert second["fingerprint"] != first["fingerprint"] and second["params"]["temperature"] == 0.5


def test_changed_teacher_or_tampered_shard_is_not_reused(prompts, teacher, tmp_path):
    out = tmp_path / "out"
    run(prompts, teacher, out)
    (out / "shard-00002.jsonl").write_text("tampered\n")
    written = []
    run(prompts, teacher, out, written=written)
    assert written == [2]

    other = build_tiny_teacher(tmp_path / "other", seed=1)
    written = []
    run(prompts, other, out, written=written)
    assert written == [0, 1, 2, 3]


def test_manifest_counts_match_the_rows(prompts, teacher, tmp_path):
    manifest = run(prompts, teacher, tmp_path / "out")
    rows = [json.loads(line) for p in sorted((tmp_path / "out").glob("shard-*.jsonl")) for line in p.read_text().splitlines()]

    assert manifest == json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows"] == len(rows) == 10 and [r["id"] for r in rows] == list(range(10))
    assert manifest["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows)
    assert manifest["response_tokens"] == sum(r["response_tokens"] for r in rows)
    assert sum(manifest["finish_reasons"].values()) == 10
    assert [s["rows"] for s in manifest["shards"]] == [3, 3, 3, 1]
    assert all(r["messages"][-1]["role"] == "assistant" and r["response_tokens"] <= 6 for r in rows)
    assert rows[4]["messages"][0] == {"role": "system", "content": "be brief"}


def test_empty_answers_are_kept_and_counted(prompts, tmp_path):
    mute = build_tiny_teacher(tmp_path / "mute", always_eos=True)
    manifest = run(prompts, mute, tmp_path / "out", do_sample=False)

    assert manifest["rows"] == 10 and manifest["empty_responses"] == 10
    assert manifest["finish_reasons"] == {"eos": 10, "length": 0}
    assert manifest["empty_response_ids"] == list(range(10))


def test_empty_prompt_file_is_a_clear_error(teacher, tmp_path):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("\n")
    with pytest.raises(PipelineError, match="holds no prompts"):
        run(empty, teacher, tmp_path / "out")


def test_bad_prompt_lines_and_params_name_where(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps([{"role": "user", "content": "hi"}]) + "\n" + json.dumps([{"role": "assistant", "content": "x"}]) + "\n")
    with pytest.raises(PipelineError, match=r"prompts.jsonl:2"):
        read_prompts(bad)
    with pytest.raises(PipelineError, match="unknown params"):
        GenerationParams.from_cfg({**PARAMS, "temprature": 0.3})
    with pytest.raises(PipelineError, match="top_p"):
        GenerationParams.from_cfg({**PARAMS, "top_p": 0})
