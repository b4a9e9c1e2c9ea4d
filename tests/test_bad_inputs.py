"""Hand-made broken inputs, as a new user makes them: each is a clear error naming the file, the line
or field and what to do, or (a minority of bad rows) a counted, printed warning; never a library
traceback, and nothing silently wrong. The teacher-config cases are in test_teacher_configs.py."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.preferences import load_preference_pairs
from pipeline.data.pseudo_labels import GenerationParams, generate_pseudo_labels
from pipeline.errors import PipelineError
from pipeline.io import atomic_directory
from pipeline.models.teacher import import_teacher, smollm2_gguf_path
from pipeline.train.data import read_conversations
from pipeline.train.dpo import DPOParams, build_pairs
from pipeline.train.sft import load_sft_conversations
from tests.tiny_teacher import REPO_ROOT, build_tiny_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- a corrupt GGUF as teacher.source


@pytest.fixture(scope="module")
def gguf_bytes() -> bytes:
    return smollm2_gguf_path().read_bytes()


@pytest.mark.parametrize("case, message", [
    ("truncated", r"is truncated: it has 49181216 bytes, but its 272 tensors need 98362432"),
    ("100 bytes", r"is truncated: its 100 bytes end inside the header \(metadata and tensor list\)"),
    ("empty", r"is empty \(0 bytes\)"),
    ("wrong magic", r"is not a GGUF file: it starts with b'GGML', not b'GGUF'"),
])
def test_a_corrupt_gguf_teacher_names_the_file_and_the_fix(gguf_bytes, tmp_path, case, message):
    data = {"truncated": gguf_bytes[: len(gguf_bytes) // 2], "100 bytes": gguf_bytes[:100], "empty": b"",
            "wrong magic": b"GGML" + gguf_bytes[4:4096]}[case]
    path = tmp_path / "teacher.gguf"
    path.write_bytes(data)
    with pytest.raises(PipelineError, match=message) as err:
        import_teacher(str(path), tmp_path / "out")
    assert str(path) in str(err.value) and err.value.where == "teacher.source"
    assert "download or copy the .gguf file again" in err.value.fix
    assert not (tmp_path / "out").exists()
