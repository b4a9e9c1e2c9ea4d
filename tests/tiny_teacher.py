"""A tiny random chat teacher (Llama + byte-level tokenizer with a ChatML template), built offline in ~1 s.

The pipeline tests need a teacher directory shaped like models/teacher without the 23 s GGUF import.
``<|im_end|>`` is token 0 on purpose: with a zeroed lm_head every logit ties, greedy decoding picks
token 0, and the teacher answers every prompt with an immediate EOS (an empty answer).

Also what every whole-pipeline run on a throwaway repo copy shares (test_pipeline_full.py and
benchmarks/gpu_smoke.py): the tiny params profile, its prompts, and the list of files to copy.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|im_end|>", "<|endoftext|>", "<|im_start|>"]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(sorted(byte_chars))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )


def build_tiny_teacher(out_dir: str | Path, *, seed: int = 0, always_eos: bool = False, num_layers: int = 2,
                       hidden_size: int = 32, num_heads: int = 4, num_kv_heads: int = 2,
                       max_position_embeddings: int = 512) -> Path:
    """Head size is ``hidden_size // num_heads``: 8 by default; the GPU smoke run uses 64 (Triton's dots need >= 16)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if always_eos:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about rain.",
           "What is 2 + 2?", "Say hello.", "Describe a cat.", "Why is the sky blue?", "Count to five."]


def tiny_profile(params: dict, mirror: str) -> dict:
    """The default params.yaml with every size cut down, so each stage runs in seconds."""
    models = {"0.875": "models/dpo_0.875"}
    p = params
    p["teacher"].update(source="tiny-teacher")
    p["prompts"].update(source={"kind": "files", "paths": ["prompts.jsonl"]}, eval_files=[])
    p["pseudo_labels"].update(max_new_tokens=12, batch_size=8, shard_size=4)
    p["distill"].update(seq_len=64, global_batch_size=2, max_train_tokens=256, checkpoint_every=2,
                        held_out=2, eval_batch_size=2, sensitivity_rows=2)
    p["sft"].update(max_examples=4, max_steps=2, per_device_batch_size=2, grad_accum=1, max_length=64, save_steps=1)
    p["dpo"]["pairs"].update(max_prompts=4, max_new_tokens=8, batch_size=4)
    p["dpo"].update(max_steps=2, per_device_batch_size=1, grad_accum=1, max_length=64, save_steps=1)
    p["draft"].update(num_layers=2, cpu_steps=2, batch_size=2, seq_len=32)
    p["draft_tune"].update(targets=models, cpu_steps=2, batch_size=2, seq_len=32)
    p["speed"].update(targets={key: {"model": path, "draft": f"models/draft_{key}"} for key, path in models.items()},
                      cpu={"k": [1, 2], "prompt_lengths": [24], "new_tokens": 4,
                           "plain_batch_sizes": [1], "repeats": 1, "dtype": "float32"})
    p["judge"].update(batch_size=4, max_new_tokens=8)
    p["lm_eval"].update(models=models, data_mirror=mirror, limit=2, batch_size=4,
                        suites={"zero_shot": {"num_fewshot": 0, "tasks": ["arc_easy", "piqa"]}})
    p["long_context"].update(models=models, data_mirror=mirror)
    p["long_context"]["passkey"].update(lengths=[256], depths=[0.0, 1.0], items=1)  # the tiny teacher has 512 positions
    p["long_context"]["perplexity"].update(length=256, streams=1)
    for name in ("alpaca_eval", "mt_bench"):
        p[name].update(models=models, data_mirror=mirror, limit=2)
        p[name]["generation"].update(max_new_tokens=8, batch_size=4)
    p["judge_check"].update(data_mirror=mirror)
    p["judge_check"]["alpaca_eval"].update(limit=1, models=["alpaca-7b", "gpt-3.5-turbo-1106"])
    p["judge_check"]["mt_bench"].update(limit=1, models=["Mamba2InLlama_0_50", "Mamba2InLlama_0_875"])
    p["report"].update(models=["0.875"])
    p["tracking"] = {"experiment": "full"}
    return p


def repo_files() -> list[str]:
    """Tracked files plus untracked ones git does not ignore: what a fresh clone with local edits holds."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True, check=True
    ).stdout.decode()
    return sorted({f for f in listed.split("\0") if f and (REPO_ROOT / f).is_file()})
