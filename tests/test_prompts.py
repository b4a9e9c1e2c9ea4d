"""Prompt sources: every file shape, malformed-row reporting, eval exclusion, and Magpie self-generation."""

from __future__ import annotations

import gzip
import json

import pytest

from pipeline.data.magpie import MagpieParams, generate_user_prompts, rejection_reason, user_turn_prefix
from pipeline.data.prompts import load_prompts, normalise_text, prompt_messages
from pipeline.errors import PipelineError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: extra threads only contend on a shared CPU

ROWS = [
    {"instruction": "Name three primes.", "input": "", "output": "2, 3, 5"},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]},
    {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Tell a joke"}]},
    {"chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water.", "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: No."},
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now make it rhyme."]},
    {"instruction": "What is the tallest mountain?", "output": "Everest", "generator": "gpt4", "dataset": "helpful_base"},
    {"instruction": "Summarise the plot of Hamlet."},
]
EXPECTED_SHAPES = {"alpaca": 2, "messages": 1, "sharegpt": 1, "hh_rlhf": 1, "mt_bench": 1, "alpaca_eval": 2}


def write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def load(paths, tmp_path, **kwargs):
    return load_prompts({"kind": "files", "paths": [str(p) for p in paths]}, base_dir=tmp_path, eval_files=[], **kwargs)


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz", "rows.json"])
def test_every_row_shape_loads(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(ROWS, indent=2))
    else:
        write_jsonl(path, ROWS)
    prompt_set = load([path], tmp_path)
    assert prompt_set.report.rows_by_shape == EXPECTED_SHAPES and prompt_set.report.malformed_count == 0
    by_first_user = {prompt_messages(c)[-1]["content"]: c for c in prompt_set.conversations}
    assert by_first_user["Translate to French.\n\nGood morning"][1] == {"role": "assistant", "content": "Bonjour"}
    assert prompt_messages(by_first_user["Why is the sky blue?"])[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in by_first_user["Hi there"]] == ["user", "assistant", "user"]
    assert by_first_user["How do I boil an egg?"][1]["content"] == "Put it in boiling water."
    assert [m["content"] for m in by_first_user["Write a haiku."]] == ["Write a haiku.", "Now make it rhyme."]
    assert by_first_user["Summarise the plot of Hamlet."] == [{"role": "user", "content": "Summarise the plot of Hamlet."}]
    assert len(prompt_set) == len(ROWS)


def test_malformed_rows_are_reported_with_their_lines(tmp_path):
    bad = ['{"instruction": ', '{"foo": 1}', '{"messages": [{"role": "user", "content": ""}]}',
           '{"messages": [{"role": "robot", "content": "x"}]}', '{"turns": "not a list"}', '[1, 2]',
           '{"instruction": 42}']
    path = write_jsonl(tmp_path / "mixed.jsonl", ROWS[:2], raw_lines=bad)
    report = load([path], tmp_path).report
    assert report.rows_read == 9 and report.rows_used == 2 and report.malformed_count == 7
    lines = {m.line: m.reason for m in report.malformed}
    assert sorted(lines) == list(range(3, 10)) and all(m.file == str(path) for m in report.malformed)
    assert "invalid JSON" in lines[3] and "unknown row shape" in lines[4] and "empty" in lines[5]
    assert "unknown role" in lines[6] and "turns" in lines[7] and "not an object" in lines[8] and "not a string" in lines[9]


def test_json_array_rows_get_line_numbers(tmp_path):
    path = tmp_path / "array.json"
    path.write_text('[\n  {"instruction": "Ok row"},\n  {"nope": true},\n  {"prompt": "Also ok"}\n]\n')
    report = load([path], tmp_path).report
    assert [(m.line, m.reason.split(" (")[0]) for m in report.malformed] == [(3, "unknown row shape")]


def test_empty_and_garbage_files_fail_clearly(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(PipelineError, match="is empty"):
        load([tmp_path / "empty.jsonl"], tmp_path)
    (tmp_path / "garbage.jsonl").write_text("lorem ipsum\nnot json either\n")
    with pytest.raises(PipelineError, match="no usable row.*garbage.jsonl:1: invalid JSON"):
        load([tmp_path / "garbage.jsonl"], tmp_path)
    (tmp_path / "binary.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(PipelineError, match="not readable"):
        load([tmp_path / "binary.jsonl.gz"], tmp_path)
    with pytest.raises(PipelineError, match="does not exist"):
        load([tmp_path / "missing.jsonl"], tmp_path)


def test_duplicates_and_eval_prompts_are_removed(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": "Write a haiku about  autumn."}, {"prompt": "write a HAIKU about autumn."},
        {"prompt": "What is the tallest mountain?"}, {"prompt": "Keep me"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                      {"role": "user", "content": "Now make it rhyme."}]},
    ])
    alpaca_eval = write_jsonl(tmp_path / "alpaca_eval.jsonl", [{"instruction": "What is the  tallest mountain?", "output": "x", "generator": "g", "dataset": "d"}])
    mt_bench = write_jsonl(tmp_path / "question.jsonl", [{"question_id": 1, "turns": ["Write a poem.", "Now make it rhyme."]}])
    prompt_set = load_prompts({"kind": "files", "paths": ["train.jsonl"]}, base_dir=tmp_path,
                              eval_files=[alpaca_eval.name, mt_bench.name, "absent.jsonl"])
    report = prompt_set.report
    assert [c[0]["content"] for c in prompt_set.conversations] == ["Write a haiku about  autumn.", "Keep me"]
    assert report.duplicates_removed == 1 and report.eval_excluded == 2
    assert report.eval_files_used == {"alpaca_eval.jsonl": 1, "question.jsonl": 2}
    assert report.eval_files_missing == ["absent.jsonl"] and "NOT excluded" in report.warnings[0]
    assert prompt_set.origins == ["train.jsonl:1", "train.jsonl:4"]


def test_bad_specs_and_offline_hub_fail_clearly(tmp_path):
    with pytest.raises(PipelineError, match="kind one of"):
        load_prompts({"kind": "web"}, eval_files=[])
    with pytest.raises(PipelineError, match="unknown key"):
        load_prompts({"kind": "files", "paths": ["a.jsonl"], "colum": "x"}, eval_files=[])
    with pytest.raises(PipelineError, match="hub.*unreachable"):
        load_prompts({"kind": "hub", "name": "HuggingFaceH4/ultrachat_200k", "split": "train_sft"}, eval_files=[])
    with pytest.raises(PipelineError, match="dvc repro teacher"):
        load_prompts({"kind": "self_generated", "num_prompts": 2}, base_dir=tmp_path, eval_files=[])


def test_prompts_stage_writes_what_pseudo_labels_reads(tmp_path, monkeypatch):
    from pipeline.data.pseudo_labels import read_prompts
    from pipeline.params import load_params
    from pipeline.stage import StageContext
    from stages.prompts import main

    write_jsonl(tmp_path / "train.jsonl", ROWS, raw_lines=["{broken"])
    (tmp_path / "params.yaml").write_text(
        "prompts:\n  source: {kind: files, paths: [train.jsonl]}\n  eval_files: []\n  out_dir: out\n")
    monkeypatch.chdir(tmp_path)
    params = load_params("params.yaml")
    main(StageContext("prompts", "prompts", None, params, tmp_path / "params.yaml", params["prompts"]))  # no MLflow run
    prompts = read_prompts(tmp_path / "out" / "prompts.jsonl")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [p.id for p in prompts] == list(range(len(ROWS))) and manifest["num_prompts"] == len(ROWS)
    assert manifest["malformed"] == [{"file": "train.jsonl", "line": len(ROWS) + 1, "reason": manifest["malformed"][0]["reason"]}]
    # target_prompts reaches the library: one more prompt than the file gives needs the teacher
    cfg = {**params["prompts"], "target_prompts": len(ROWS) + 1, "teacher_dir": "no_teacher"}
    with pytest.raises(PipelineError, match="dvc repro teacher"):
        main(StageContext("prompts", "prompts", None, params, tmp_path / "params.yaml", cfg))


# ---------------------------------------------------------------- self-generated (Magpie)


def test_rejection_reasons():
    params = MagpieParams(min_chars=5, max_chars=40)
    markers = ["<|im_start|>", "<|im_end|>"]
    assert rejection_reason("How do tides work?", True, markers, params) is None
    assert rejection_reason("How do tides work?", False, markers, params) == "unfinished"
    assert rejection_reason("", True, markers, params) == "empty"
    assert rejection_reason("Hi<|im_start|>assistant", True, markers, params) == "role_marker"
    assert rejection_reason("Explain it.\nAssistant: sure", True, markers, params) == "role_marker"
    assert rejection_reason("Hey", True, markers, params) == "too_short"
    assert rejection_reason("Why " * 20, True, markers, params) == "too_long"
    assert rejection_reason("12345 + 678 = ???", True, markers, params) == "non_text"


@pytest.fixture(scope="module")
def tiny_teacher(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


WORDS = (" why",)


def small_vocabulary(tokenizer, words=WORDS):
    """suppress_tokens that leave a random model a few words plus the turn markers, so it ends turns
    often and repeats itself (duplicates) and leaks markers (role_marker rejections)."""
    allowed = {i for w in words for i in tokenizer(w, add_special_tokens=False)["input_ids"]}
    allowed |= {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>")}
    return [i for i in range(len(tokenizer)) if i not in allowed]


class OnlyAllowed:
    """The same restriction as a precomputed mask: much cheaper per step than suppress_tokens."""

    def __init__(self, suppressed, vocab_size):
        import torch

        self.mask = torch.zeros(vocab_size, dtype=torch.bool)
        self.mask[suppressed] = True

    def __call__(self, input_ids, scores):
        return scores.masked_fill(self.mask[: scores.shape[-1]], float("-inf"))


def test_user_turn_prefix_comes_from_the_chat_template(tiny_teacher):
    _, tokenizer = tiny_teacher
    default = user_turn_prefix(tokenizer)
    assert default.startswith("<|im_start|>system\n") and default.endswith("<|im_end|>\n<|im_start|>user\n")
    assert user_turn_prefix(tokenizer, "Be terse.") == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n"


def test_self_generation_is_deterministic_dedups_and_filters(tiny_teacher):
    model, tokenizer = tiny_teacher
    from transformers import LogitsProcessorList

    params = MagpieParams(num_prompts=8, seed=3, batch_size=16, max_new_tokens=6, min_chars=3, max_batches=2,
                          system_prompts=("Ask about weather.", "Ask about maths, please, in detail."), decoder="transformers")
    restrict = {"logits_processor": LogitsProcessorList([OnlyAllowed(small_vocabulary(tokenizer), len(tokenizer))])}
    first, stats = generate_user_prompts(model, tokenizer, params, progress=False, **restrict)
    again, _ = generate_user_prompts(model, tokenizer, params, progress=False, **restrict)
    other, _ = generate_user_prompts(model, tokenizer, MagpieParams(**{**params.__dict__, "seed": 4}), progress=False, **restrict)
    assert first == again and first != other
    texts = [c[-1]["content"] for c in first]
    assert len({normalise_text(t) for t in texts}) == len(texts) and stats["kept"] == len(first)
    assert all(rejection_reason(t, True, ["<|im_start|>", "<|im_end|>"], params) is None for t in texts)
    assert {c[0]["content"] for c in first} <= set(params.system_prompts)
    assert stats["duplicates"] > 0 and stats["rejected_role_marker"] > 0
    assert stats["generated"] == 16 * stats["batches"]


def test_self_generated_source_through_load_prompts(tiny_llama_dir, monkeypatch):
    import functools

    from transformers import AutoTokenizer, LogitsProcessorList

    from pipeline.data import magpie

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    spec = {"kind": "self_generated", "num_prompts": 2, "seed": 0, "batch_size": 8, "max_new_tokens": 6, "min_chars": 3,
            "max_batches": 4, "generate_kwargs": {"repetition_penalty": 1.0}, "decoder": "transformers"}
    with pytest.raises(PipelineError, match="no prompts left"):  # an unconstrained random model never ends a turn
        load_prompts({**spec, "max_batches": 1}, teacher_dir=tiny_llama_dir, eval_files=[], progress=False)
    restricted = LogitsProcessorList([OnlyAllowed(small_vocabulary(tokenizer), len(tokenizer))])
    monkeypatch.setattr(magpie, "generate_user_prompts", functools.partial(magpie.generate_user_prompts, logits_processor=restricted))
    prompt_set = load_prompts(spec, teacher_dir=tiny_llama_dir, eval_files=[], progress=False)
    assert len(prompt_set) == 2 and prompt_set.report.generation["kept"] == 2
    assert prompt_set.origins == ["self_generated:0", "self_generated:1"]
    assert prompt_set.report.rows_read == prompt_set.report.generation["generated"]


STATIC = dict(seed=3, max_new_tokens=6, min_chars=3, system_prompts=("Ask about weather.", "Ask about maths, please, in detail."))


def test_static_cache_self_generation_is_seeded_per_row(tiny_teacher):
    model, tokenizer = tiny_teacher
    restrict = {"suppress_tokens": small_vocabulary(tokenizer)}
    params = MagpieParams(num_prompts=8, batch_size=16, max_batches=2, **STATIC)
    first, stats = generate_user_prompts(model, tokenizer, params, progress=False, **restrict)
    again, _ = generate_user_prompts(model, tokenizer, params, progress=False, **restrict)
    other, _ = generate_user_prompts(model, tokenizer, MagpieParams(**{**params.__dict__, "seed": 4}), progress=False, **restrict)
    assert first == again and first != other and len(first) == stats["kept"] > 0
    texts = [c[-1]["content"] for c in first]
    assert len({normalise_text(t) for t in texts}) == len(texts)
    assert all(rejection_reason(t, True, ["<|im_start|>", "<|im_end|>"], params) is None for t in texts)
    assert set(" ".join(texts).split()) <= {"why"}  # suppressed tokens are never sampled
    assert stats["duplicates"] > 0 and stats["generated"] == 16 * stats["batches"]
    # row r samples with its own seed: the same prompts from batches of another size
    halves, _ = generate_user_prompts(model, tokenizer, MagpieParams(num_prompts=8, batch_size=8, max_batches=4, **STATIC),
                                      progress=False, **restrict)
    assert halves == first
    # the texts already known (a prompt file's) count as duplicates
    known, known_stats = generate_user_prompts(model, tokenizer, params, progress=False, known_texts={normalise_text(texts[0])},
                                               **restrict)
    assert texts[0] not in [c[-1]["content"] for c in known] and known_stats["duplicates"] > stats["duplicates"]
    with pytest.raises(PipelineError, match="static-cache decoder takes only"):
        generate_user_prompts(model, tokenizer, params, progress=False, repetition_penalty=1.1)


def test_a_short_source_is_topped_up_by_the_teacher(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    top_up = {"batch_size": 16, "max_new_tokens": 6, "min_chars": 3, "max_batches": 3, "generate_kwargs": {"suppress_tokens": small_vocabulary(tokenizer)}}
    source = write_jsonl(tmp_path / "few.jsonl", ROWS[:3])
    kwargs = dict(teacher_dir=tiny_llama_dir, target_prompts=5, top_up=top_up, progress=False)
    topped = load([source], tmp_path, **kwargs)
    assert len(topped) == 5 and topped.origins[3:] == ["top_up:0", "top_up:1"]
    assert topped.conversations[:3] == load([source], tmp_path).conversations
    assert topped.report.rows_used == 3 and topped.report.top_up["requested"] == 2 and topped.report.top_up["kept"] == 2
    # a prompt the files already hold is never written again
    first_new = topped.conversations[3][-1]["content"]
    source = write_jsonl(tmp_path / "few.jsonl", [*ROWS[:3], {"prompt": first_new}])
    again = load([source], tmp_path, **kwargs)
    assert len(again) == 5 and [c[-1]["content"] for c in again.conversations].count(first_new) == 1
    assert again.report.top_up["duplicates"] > topped.report.top_up["duplicates"]
    # enough prompts in the files: no teacher is loaded
    assert len(load([source], tmp_path, teacher_dir=tmp_path / "none", target_prompts=4, progress=False)) == 4
    with pytest.raises(PipelineError, match="exceeds max_prompts"):
        load([source], tmp_path, target_prompts=5, max_prompts=4)
    with pytest.raises(PipelineError, match="without num_prompts"):
        load([source], tmp_path, teacher_dir=tiny_llama_dir, target_prompts=6, top_up={"num_prompts": 3})


@pytest.mark.slow
def test_real_teacher_writes_plausible_user_questions(smollm2_teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_teacher_dir)
    params = MagpieParams(num_prompts=2, seed=0, batch_size=4, max_new_tokens=40, max_batches=2)
    conversations, stats = generate_user_prompts(model, tokenizer, params, progress=False)
    texts = [c[-1]["content"] for c in conversations]
    print("\n".join(texts))
    assert len(texts) == 2 and all(len(t.split()) >= 3 for t in texts)
    assert sum(sum(ch.isalpha() for ch in t) for t in texts) > 0.6 * sum(len(t) for t in texts)
