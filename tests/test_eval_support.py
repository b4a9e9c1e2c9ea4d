"""Tiny random chat models for the scoring-stage tests (built here, never downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

MIRROR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def need_mirror() -> Path:
    if not MIRROR.is_dir():
        pytest.skip("shared/data mirror not present")
    return MIRROR.resolve()


def _corpus() -> list[str]:
    texts = ["The quick brown fox jumps over the lazy dog. Answer: yes no maybe A B C D m M [[5]]"] * 20
    ref = MIRROR / "alpaca_eval" / "model_outputs" / "gpt4_1106_preview.jsonl"
    if ref.is_file():
        rows = [json.loads(line) for line in ref.open()][:200]
        texts += [r["instruction"] + "\n" + r["output"] for r in rows]
    return texts


def build_tiny_chat_model(path: Path, chat_template: str | None = CHATML, seed: int = 0) -> Path:
    """A 2-layer random Llama with a small byte-level BPE tokenizer and (optionally) a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model")


def test_tiny_chat_model_loads_with_a_chat_template(tiny_chat_model):
    from pipeline.eval.generation import load_chat_model

    model, tokenizer = load_chat_model(tiny_chat_model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert model.config.num_hidden_layers == 2
