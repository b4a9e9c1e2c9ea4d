"""Pseudo-labels: resume after a kill is byte-identical, stale shards are never reused, counts add up;
both decoders agree when greedy, sampling is seeded per answer, throughput is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.data.pseudo_labels import GenerationParams, generate_pseudo_labels, read_prompts
from pipeline.errors import PipelineError
from tests.tiny_teacher import build_tiny_teacher

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: extra threads only contend on a shared CPU

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


def without_timings(value):
    """A sidecar or manifest less its ``generation`` records (seconds and tokens/s differ from run to run)."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k != "generation"}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def snapshot(directory: Path) -> dict[str, object]:
    """Every file: shards as bytes, sidecars and the manifest as JSON without their timings."""
    return {p.name: p.read_bytes() if p.suffix == ".jsonl" else without_timings(json.loads(p.read_text()))
            for p in sorted(directory.iterdir())}


def read_rows(directory: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(directory.glob("shard-*.jsonl")) for line in p.read_text().splitlines()]


@pytest.mark.parametrize("overrides", [{}, {"decoder": "transformers"}, {"answers_per_prompt": 2}],
                         ids=["static_cache", "transformers", "two_answers"])
def test_killed_run_resumes_to_byte_identical_output(prompts, teacher, tmp_path, overrides):
    run(prompts, teacher, tmp_path / "whole", **overrides)

    written = []
    with pytest.raises(Killed):
        run(prompts, teacher, tmp_path / "resumed", written=written, kill_after=2, **overrides)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    resumed_written = []
    run(prompts, teacher, tmp_path / "resumed", written=resumed_written, **overrides)

    assert written == [0, 1] and resumed_written == [2, 3]  # finished shards were kept, not regenerated
    assert snapshot(tmp_path / "resumed") == snapshot(tmp_path / "whole")
    assert {p.name for p in (tmp_path / "whole").glob("*.jsonl")} == {f"shard-0000{i}.jsonl" for i in range(4)}


def test_greedy_answers_are_the_same_with_both_decoders(prompts, teacher, tmp_path):
    greedy = dict(do_sample=False, max_new_tokens=10, batch_size=4, shard_size=10)  # one left-padded batch of 4 lengths
    ours = run(prompts, teacher, tmp_path / "static", decoder="static_cache", **greedy)
    theirs = run(prompts, teacher, tmp_path / "hf", decoder="transformers", **greedy)

    assert read_rows(tmp_path / "static") == read_rows(tmp_path / "hf")
    assert (tmp_path / "static" / "shard-00000.jsonl").read_bytes() == (tmp_path / "hf" / "shard-00000.jsonl").read_bytes()
    assert ours["response_tokens"] == theirs["response_tokens"] > 0
    assert len({r["messages"][-1]["content"] for r in read_rows(tmp_path / "static")}) > 1  # not one degenerate answer


def test_every_answer_samples_with_its_own_seed(prompts, teacher, tmp_path):
    many = dict(answers_per_prompt=3, max_new_tokens=8)
    run(prompts, teacher, tmp_path / "a", **many)
    rows = read_rows(tmp_path / "a")

    assert [r["id"] for r in rows] == [f"{i}#{k}" for i in range(10) for k in range(3)]
    assert [(r["prompt_id"], r["answer_index"]) for r in rows] == [(i, k) for i in range(10) for k in range(3)]
    by_prompt = [rows[3 * i : 3 * i + 3] for i in range(10)]
    assert all(len({r["messages"][-1]["content"] for r in answers}) > 1 for answers in by_prompt)  # the answers differ
    assert all(r["messages"][:-1] == answers[0]["messages"][:-1] for answers in by_prompt for r in answers)
    # an answer is a function of (seed, prompt, answer index), not of the batch it was sampled in
    run(prompts, teacher, tmp_path / "b", **many, batch_size=5, shard_size=4)
    assert read_rows(tmp_path / "b") == rows
    run(prompts, teacher, tmp_path / "c", **many, seed=8)
    assert [r["messages"] for r in read_rows(tmp_path / "c")] != [r["messages"] for r in rows]


def test_throughput_is_recorded_per_shard_and_in_total(prompts, teacher, tmp_path):
    manifest = run(prompts, teacher, tmp_path / "out")
    sidecars = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("shard-*.done.json"))]

    for sidecar in sidecars:
        speed = sidecar["generation"]
        assert speed["seconds"] > 0 and 0 < speed["decode_seconds"] <= speed["seconds"]
        assert speed["prompt_tokens_per_second"] == pytest.approx(sidecar["prompt_tokens"] / speed["seconds"])
        assert speed["response_tokens_per_second"] == pytest.approx(sidecar["response_tokens"] / speed["seconds"])
    total = manifest["generation"]
    assert total["seconds"] == pytest.approx(sum(s["generation"]["seconds"] for s in sidecars))
    assert total["response_tokens_per_second"] == pytest.approx(manifest["response_tokens"] / total["seconds"])
    assert total["prompt_tokens_per_second"] == pytest.approx(manifest["prompt_tokens"] / total["seconds"])
    assert run(prompts, teacher, tmp_path / "hf", decoder="transformers")["generation"]["decode_seconds"] is None


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
    rows = read_rows(tmp_path / "out")

    assert manifest == json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows"] == manifest["prompts"] == len(rows) == 10 and [r["id"] for r in rows] == list(range(10))
    assert "prompt_id" not in rows[0]  # one answer per prompt: the rows are as before
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
    with pytest.raises(PipelineError, match="decoder must be one of"):
        GenerationParams.from_cfg({**PARAMS, "decoder": "vllm"})
    with pytest.raises(PipelineError, match="would repeat one answer") as err:
        GenerationParams.from_cfg({**PARAMS, "do_sample": False, "answers_per_prompt": 2})
    assert err.value.where == "pseudo_labels.answers_per_prompt"


# ---------------------------------------------------------------- several answers per prompt, downstream


def test_consumers_keep_the_answers_of_one_prompt_together(prompts, teacher, tmp_path, monkeypatch):
    from pipeline.data import preferences
    from pipeline.data.preferences import PreferenceReport, SelfPairParams, build_self_pairs, read_pseudo_labels
    from pipeline.train.data import prompt_key, read_conversations, split_held_out
    from pipeline.train.sft import sft_examples

    run(prompts, teacher, tmp_path / "out", answers_per_prompt=3)
    conversations = read_conversations(tmp_path / "out")
    assert len(conversations) == 30

    # distillation's held-out split: whole prompts, all three answers on one side
    groups = [prompt_key(c) for c in conversations]
    train, held = split_held_out(len(conversations), 0.2, seed=0, groups=groups)
    assert len(held) == 2 * 3 and sorted(train + held) == list(range(30))
    assert not {groups[i] for i in train} & {groups[i] for i in held}
    for seed in range(5):  # with one conversation per prompt the split is the ungrouped one
        assert split_held_out(10, 0.3, seed, groups=[f"p{i}" for i in range(10)]) == split_held_out(10, 0.3, seed)
    with pytest.raises(PipelineError, match="leaves 0 of 10 prompts"):
        split_held_out(30, 10, seed=0, groups=groups)

    # SFT trains on every answer; each row keeps its own origin
    rows = read_pseudo_labels(tmp_path / "out")
    assert len({origin for origin, _ in rows}) == 30 and rows[1][0] == "shard-00000.jsonl:0#1"
    examples, counts = sft_examples(rows)
    assert counts["examples"] + counts["empty_answer"] == 30

    # DPO's self-built pairs: one per prompt (its first answer), max_prompts counts prompts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.models.builder import build_hybrid

    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    student = build_hybrid(model, [1], seed=1)
    monkeypatch.setattr(preferences, "sample_answers", lambda m, tok, prompts, params: ["a reply"] * len(prompts))
    report = PreferenceReport(source={"kind": "self_built"})
    pairs = build_self_pairs(rows, student, model, AutoTokenizer.from_pretrained(teacher), SelfPairParams(max_prompts=4), report)
    assert report.rows_read == 4 and report.repeated_prompts_skipped == 6  # rows 1, 2, 4, 5, 7 and 8 of prompts 0-3
    assert len({json.dumps(p["prompt"]) for p in pairs}) == len(pairs)
    assert {p["origin"].rsplit("#", 1)[1] for p in pairs} <= {"0"}


class RecordingTracker:
    def __init__(self):
        self.metrics, self.tags, self.artifacts = {}, {}, []

    def log_metrics(self, values, step=None):
        self.metrics.update(values)

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_artifact(self, path):
        self.artifacts.append(str(path))


def test_stage_logs_generation_throughput(prompts, teacher, tmp_path):
    from pipeline.stage import StageContext
    from stages.pseudo_labels import main

    cfg = {**PARAMS, "answers_per_prompt": 2, "out_dir": str(tmp_path / "out")}
    params = {"teacher": {"out_dir": str(teacher)}, "prompts": {"out_dir": str(prompts.parent)}, "pseudo_labels": cfg}
    tracker = RecordingTracker()
    main(StageContext("pseudo_labels", "pseudo_labels", None, params, tmp_path / "params.yaml", cfg, tracker))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())

    metrics = tracker.metrics
    assert metrics["pseudo_labels.prompts"] == 10 and metrics["pseudo_labels.rows"] == 20 == manifest["rows"]
    assert metrics["pseudo_labels.prompt_tokens_per_second"] == manifest["generation"]["prompt_tokens_per_second"] > 0
    assert metrics["pseudo_labels.response_tokens_per_second"] == manifest["generation"]["response_tokens_per_second"] > 0
    assert metrics["pseudo_labels.generation_seconds"] == manifest["generation"]["seconds"] > 0
    assert tracker.tags["pseudo_labels.decoder"] == "static_cache"


def test_seeded_choice_follows_the_distribution_and_depends_only_on_the_row():
    import torch

    from pipeline.decoding.speculative import row_seed, seeded_choice, seeded_uniform

    seeds = torch.tensor([row_seed(0, i) for i in range(20000)])
    u = seeded_uniform(seeds, step=3, width=5)
    assert 0 < float(u.min()) and float(u.max()) < 1 and torch.equal(u, seeded_uniform(seeds, step=3, width=5))
    assert not torch.equal(u, seeded_uniform(seeds, step=4, width=5))
    assert torch.equal(seeded_uniform(seeds[7:9], step=3, width=5), u[7:9])  # a row's draws ignore the other rows
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0]).expand(len(seeds), 4)
    counts = torch.bincount(seeded_choice(probs, seeds, step=0), minlength=4) / len(seeds)
    assert counts.tolist() == pytest.approx([0.5, 0.3, 0.2, 0.0], abs=0.015)
    assert len({row_seed(s, i, k) for s in (0, 1) for i in range(50) for k in range(4)}) == 400


def test_seeded_top_k_choice_is_the_full_computation_on_k_columns():
    import torch

    from pipeline.decoding.speculative import Sampling, row_seed, seeded_choice, seeded_top_k_choice

    logits = torch.randn(512, 300, generator=torch.Generator().manual_seed(0)) * 3
    seeds = torch.tensor([row_seed(5, i) for i in range(512)])
    for sampling in (Sampling(True, 0.7, 40, 0.9), Sampling(True, 1.3, 5, 1.0), Sampling(True, 1.0, 300, 0.5)):
        for step in (0, 9):
            fast = seeded_top_k_choice(logits, sampling, seeds, step)
            assert torch.equal(fast, seeded_choice(sampling.probs(logits), seeds, step))
    assert len(set(seeded_top_k_choice(logits, Sampling(True, 1.0, 40, 1.0), seeds, 0).tolist())) > 1
