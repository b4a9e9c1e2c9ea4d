"""Configuration of the hybrid attention/Mamba model ("Mamba in the Llama").

The config holds everything needed to rebuild the model without the teacher: the teacher's
architecture fields (sizes, RoPE, norms, biases), which layers keep attention, and the mixer
type and sizes of the Mamba layers. The Mamba sizes are not free parameters: they are derived
from the attention shapes they are initialised from (``d_inner = heads * head_dim``,
``d_xb = kv_heads * head_dim``, ``d_state = head_dim``), which is what lets q/k/v/o map onto
C/B/x/out exactly.

``mamba_gate_bias`` gives the z gate a bias (Mamba2: the ``in_proj`` bias, whose z slice is the
gate's; Mamba1: ``in_proj_z``'s). The attention-mimicking init needs it: with z's weights at zero,
the bias makes the gate a constant, neutral at the start and trainable from there.
"""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

MIXER_TYPES = ("mamba2", "mamba1")


class HybridMambaConfig(PreTrainedConfig):
    model_type = "hybrid_mamba"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 576,
        intermediate_size: int = 1536,
        num_hidden_layers: int = 30,
        num_attention_heads: int = 9,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 8192,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        attention_out_bias: bool | None = None,
        mlp_bias: bool = False,
        sliding_window: int | None = None,
        attention_layers: list[int] | None = None,
        mixer_type: str = "mamba2",
        mamba_d_conv: int = 4,
        mamba_conv_bias: bool = True,
        mamba_gate_bias: bool = False,
        mamba_chunk_size: int = 64,
        mamba_dt_rank: int | str = "auto",
        mamba_dt_min: float = 0.001,
        mamba_dt_max: float = 0.1,
        mamba_dt_init_floor: float = 1e-4,
        mamba_a_init_range: tuple[float, float] | list[float] = (1.0, 16.0),
        kernel_backend: str = "auto",
        teacher_model_type: str = "llama",
        teacher_name_or_path: str | None = None,
        pretraining_tp: int = 1,
        attention_dropout: float = 0.0,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.rope_parameters.setdefault("rope_type", "default")
        self.attention_bias = attention_bias
        self.attention_out_bias = attention_bias if attention_out_bias is None else attention_out_bias
        self.mlp_bias = mlp_bias
        self.sliding_window = sliding_window
        self.attention_layers = sorted(int(i) for i in (attention_layers if attention_layers is not None else range(num_hidden_layers)))
        self.mixer_type = mixer_type
        self.mamba_d_conv = mamba_d_conv
        self.mamba_conv_bias = mamba_conv_bias
        self.mamba_gate_bias = mamba_gate_bias
        self.mamba_chunk_size = mamba_chunk_size
        self.mamba_dt_rank = math.ceil(hidden_size / 16) if mamba_dt_rank == "auto" else int(mamba_dt_rank)
        self.mamba_dt_min = mamba_dt_min
        self.mamba_dt_max = mamba_dt_max
        self.mamba_dt_init_floor = mamba_dt_init_floor
        self.mamba_a_init_range = list(mamba_a_init_range)
        self.kernel_backend = kernel_backend
        self.teacher_model_type = teacher_model_type
        self.teacher_name_or_path = teacher_name_or_path
        self.pretraining_tp = pretraining_tp
        self.attention_dropout = attention_dropout
        self.use_cache = use_cache
        self._validate()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _validate(self) -> None:
        if self.mixer_type not in MIXER_TYPES:
            raise ValueError(f"mixer_type must be one of {MIXER_TYPES}, got {self.mixer_type!r}")
        bad = [i for i in self.attention_layers if not 0 <= i < self.num_hidden_layers]
        if bad or len(set(self.attention_layers)) != len(self.attention_layers):
            raise ValueError(
                f"attention_layers {self.attention_layers} must be distinct indices in [0, {self.num_hidden_layers})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    # Derived Mamba sizes: fixed by the attention shapes the mixers are initialised from.
    @property
    def mamba_d_inner(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def mamba_d_xb(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def mamba_d_state(self) -> int:
        return self.head_dim

    @property
    def mamba_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if i not in set(self.attention_layers)]

    @property
    def attention_fraction(self) -> float:
        return len(self.attention_layers) / self.num_hidden_layers

    @property
    def mamba_ratio(self) -> float:
        """Exact fraction of layers whose attention was replaced by Mamba."""
        return 1.0 - self.attention_fraction

    def is_attention_layer(self, layer_idx: int) -> bool:
        return layer_idx in set(self.attention_layers)
