"""The hybrid attention/Mamba causal LM of "The Mamba in the Llama" (Wang et al., 2024).

Read top to bottom: gated norm → attention (kept layers) → Mamba2 and Mamba1 mixers (replaced
layers) → decoder layer → pretrained-model base → base model → causal LM.

A decoder layer keeps the teacher's norms and MLP; only its token mixer differs. The Mamba
mixers have exactly the teacher's attention shapes, so a layer can be initialised from the
attention it replaces (``x ← v_proj``, ``B ← k_proj``, ``C ← q_proj``, ``out ← o_proj``; see
:meth:`Mamba2Mixer.init_from_attention`). Kernels come from :mod:`pipeline.ops`; a mixer never
knows which backend ran.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from pipeline import ops
from pipeline.models.cache import HybridMambaCache
from pipeline.models.configuration_hybrid import HybridMambaConfig


def repeat_heads(t: torch.Tensor, n_rep: int, dim: int) -> torch.Tensor:
    """GQA expansion: head ``i`` of the result is head ``i // n_rep`` of ``t`` (as transformers' repeat_kv)."""
    return t if n_rep == 1 else t.repeat_interleave(n_rep, dim=dim)


class GatedRMSNorm(nn.Module):
    """RMSNorm of ``y * silu(z)`` over groups of ``group_size`` channels (one group per head).

    Normalising per head keeps each head's scale independent, as attention heads are.
    """

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        y = y.float() * F.silu(z.float())
        grouped = y.unflatten(-1, (-1, self.group_size))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return (grouped.flatten(-2) * self.weight.float()).to(dtype)


class HybridAttention(nn.Module):
    """The teacher's attention, kept as is (same parameter names, so weights copy one to one)."""

    def __init__(self, config: HybridMambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_out_bias)

    def project_qkv(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys (both rotated) and values as ``(batch, heads, tokens, head_dim)``."""
        b, l, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, l, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, l, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, l, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: HybridMambaCache | None = None,
    ) -> torch.Tensor:
        b, l, _ = hidden_states.shape
        q, k, v = self.project_qkv(hidden_states, position_embeddings)
        if cache is not None:
            k, v = cache.update_kv(self.layer_idx, k, v)
        n_rep = self.num_heads // self.num_kv_heads
        out = F.scaled_dot_product_attention(
            q,
            repeat_heads(k, n_rep, dim=1),
            repeat_heads(v, n_rep, dim=1),
            attn_mask=attention_mask,
            is_causal=attention_mask is None and l > 1,
            scale=self.scaling,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, l, -1))


def _inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def _sample_dt(n: int, config: HybridMambaConfig) -> torch.Tensor:
    """Step sizes log-uniform in [dt_min, dt_max] (Mamba's init), returned as softplus-inverse biases."""
    lo, hi = math.log(config.mamba_dt_min), math.log(config.mamba_dt_max)
    dt = torch.exp(torch.rand(n) * (hi - lo) + lo).clamp(min=config.mamba_dt_init_floor)
    return _inverse_softplus(dt)


MIXER_INITS = ("attention", "reference")
GATE_ONE = 1.2784645427610738  # silu(GATE_ONE) == 1: a z bias that makes the gate exactly neutral


def inverse_silu(y: torch.Tensor) -> torch.Tensor:
    """The z with ``silu(z) == y`` on silu's increasing branch (z > -1.2785), for ``y`` > 0 (Newton)."""
    y = y.double()
    z = torch.where(y > 1, y, torch.log(y.clamp(min=1e-30) * 2))  # silu(z) ~ z for large z, ~ e^z / ... for small
    z = z.clamp(min=-1.2784)
    for _ in range(50):
        s = torch.sigmoid(z)
        z = (z - (z * s - y) / (s * (1 + z * (1 - s)))).clamp(min=-1.2784)
    return z


@torch.no_grad()
def identity_conv_(conv: nn.Conv1d) -> None:
    """A causal depthwise conv that passes each token through: its last tap (the token itself) is 1."""
    init.zeros_(conv.weight)
    conv.weight[:, 0, -1] = 1.0
    if conv.bias is not None:
        init.zeros_(conv.bias)


def masked_causal_conv(
    x: torch.Tensor,
    conv: nn.Conv1d,
    cache: HybridMambaCache | None,
    layer_idx: int,
    padding_mask: torch.Tensor | None,
    backend: str | None,
) -> torch.Tensor:
    """The mixers' depthwise conv over a block of tokens, continuing from and updating the cache.

    Padded positions are zeroed before the conv (so they look like the zero initial state) and
    after it (so the conv bias does not leak into the scan): a left-padded row then gives exactly
    the result of the same row unpadded.
    """
    mask = None if padding_mask is None else padding_mask[..., None].to(x.dtype)
    if mask is not None:
        x = x * mask
    continuing = cache is not None and cache.has_previous_state
    out = ops.causal_conv1d(
        x,
        conv.weight.squeeze(1),
        conv.bias,
        initial_state=cache.conv_states[layer_idx] if continuing else None,
        return_final_state=cache is not None,
        backend=backend,
    )
    if cache is not None:  # final states are asked for only when kept: fast kernels skip them otherwise
        out, conv_state = out
        cache.conv_states[layer_idx].copy_(conv_state)
    return out if mask is None else out * mask


class Mamba2Mixer(nn.Module):
    """Mamba2 (SSD) mixer with the shapes of the attention it replaces.

    ``in_proj`` emits ``[z (d_inner), x (d_xb), B (d_xb), C (d_inner), dt (heads)]``; a depthwise
    causal conv runs over ``[x, B, C]``; x and B are then repeated across query groups (as GQA
    repeats k/v); the SSD scan has one scalar decay per head; the output is gated by z through a
    per-head RMSNorm.
    """

    def __init__(self, config: HybridMambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.d_inner = config.mamba_d_inner
        self.d_xb = config.mamba_d_xb
        self.d_state = config.mamba_d_state
        self.chunk_size = config.mamba_chunk_size
        self.conv_dim = self.d_inner + 2 * self.d_xb
        self.config = config
        self.in_proj = nn.Linear(
            config.hidden_size, 2 * self.d_inner + 2 * self.d_xb + self.num_heads,
            bias=config.attention_bias or config.mamba_gate_bias,
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=config.mamba_d_conv,
            groups=self.conv_dim,
            padding=config.mamba_d_conv - 1,
            bias=config.mamba_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, group_size=self.head_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=config.attention_out_bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba2's init: A uniform in ``mamba_a_init_range``, dt log-uniform, D = 1."""
        lo, hi = self.config.mamba_a_init_range
        init.copy_(self.A_log, torch.log(torch.empty(self.num_heads).uniform_(lo, hi)))
        init.copy_(self.dt_bias, _sample_dt(self.num_heads, self.config))
        init.ones_(self.D)
        init.ones_(self.norm.weight)

    @torch.no_grad()
    def init_from_attention(self, attn: nn.Module, style: str = "attention") -> None:
        """``x ← v_proj``, ``B ← k_proj``, ``C ← q_proj``, ``out_proj ← o_proj`` (biases too).

        ``style="reference"`` is the paper's code: z, dt and the conv keep PyTorch's default init
        and D = 1, so the layer starts as linear attention plus a random conv, a skip and a random
        gate. ``"attention"`` starts it as close to the attention as the architecture allows: the
        conv passes tokens through, D = 0 and the gate is exactly 1 (z's weights 0, its bias
        :data:`GATE_ONE`), leaving a linear attention with decay through the per-head norm, whose
        weight :func:`pipeline.train.align.fit_output_scales` then fits to the attention's output.
        Measured on the 135M teacher, the reference init costs more than deleting the layer.
        """
        self.in_proj.reset_parameters()
        self.conv1d.reset_parameters()
        rows = {"x": (self.d_inner, self.d_xb), "B": (self.d_inner + self.d_xb, self.d_xb),
                "C": (self.d_inner + 2 * self.d_xb, self.d_inner)}
        sources = {"x": attn.v_proj, "B": attn.k_proj, "C": attn.q_proj}
        for name, (start, size) in rows.items():
            self.in_proj.weight[start : start + size].copy_(sources[name].weight)
            if self.in_proj.bias is not None:
                src_bias = sources[name].bias
                self.in_proj.bias[start : start + size].copy_(src_bias if src_bias is not None else 0.0)
        if self.in_proj.bias is not None:
            self.in_proj.bias[: self.d_inner].zero_()
            self.in_proj.bias[-self.num_heads :].zero_()
        self.out_proj.load_state_dict(attn.o_proj.state_dict())
        self.reset_ssm_parameters()
        if style == "attention":
            self.in_proj.weight[: self.d_inner].zero_()
            self._gate_bias()[:] = GATE_ONE
            identity_conv_(self.conv1d)
            init.zeros_(self.D)
        elif style != "reference":
            raise ValueError(f"mixer init {style!r} is not one of {MIXER_INITS}")

    def _gate_bias(self) -> torch.Tensor:
        if self.in_proj.bias is None:
            raise ValueError("the attention-mimicking init needs a gate bias: build with mamba_gate_bias=True")
        return self.in_proj.bias[: self.d_inner]

    @torch.no_grad()
    def set_output_scale(self, scale: torch.Tensor) -> None:
        """Per-channel scale of what ``out_proj`` reads: the gated norm's weight."""
        self.norm.weight.copy_(scale.to(self.norm.weight))

    def output_scale(self) -> torch.Tensor:
        return self.norm.weight.detach()

    def _split_xbc(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[x, B, C] → x (…, heads, head_dim), B and C (…, heads, d_state), GQA-expanded."""
        n_rep = self.num_heads // self.num_kv_heads
        x, B, C = torch.split(xbc, [self.d_xb, self.d_xb, self.d_inner], dim=-1)
        x = repeat_heads(x.unflatten(-1, (self.num_kv_heads, self.head_dim)), n_rep, dim=-2)
        B = repeat_heads(B.unflatten(-1, (self.num_kv_heads, self.d_state)), n_rep, dim=-2)
        C = C.unflatten(-1, (self.num_heads, self.d_state))
        return x, B, C

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: HybridMambaCache | None = None,
        padding_mask: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        b, l, _ = hidden_states.shape
        z, xbc, dt = torch.split(self.in_proj(hidden_states), [self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        A = -torch.exp(self.A_log.float())
        weight = self.conv1d.weight.squeeze(1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if cache is not None and cache.has_previous_state and l == 1:
            xbc = ops.causal_conv1d_step(xbc[:, 0], cache.conv_states[self.layer_idx], weight, self.conv1d.bias,
                                         backend=backend)
            x, B, C = self._split_xbc(xbc)
            y = ops.ssd_step(cache.ssm_states[self.layer_idx], x, dt[:, 0], A, B, C, self.D, backend=backend)
            y = y.unsqueeze(1)
        else:
            continuing = cache is not None and cache.has_previous_state
            xbc = masked_causal_conv(xbc, self.conv1d, cache, self.layer_idx, padding_mask, backend)
            x, B, C = self._split_xbc(xbc)
            y = ops.ssd_scan(
                x,
                dt,
                A,
                B,
                C,
                self.D,
                chunk_size=self.chunk_size,
                initial_state=cache.ssm_states[self.layer_idx] if continuing else None,
                return_final_state=cache is not None,
                backend=backend,
            )
            if cache is not None:
                y, ssm_state = y
                cache.ssm_states[self.layer_idx].copy_(ssm_state)
        y = self.norm(y.reshape(b, l, self.d_inner).to(hidden_states.dtype), z)
        return self.out_proj(y)


class Mamba1Mixer(nn.Module):
    """Mamba1 (selective scan) mixer with the shapes of the attention it replaces.

    x (from v, repeated across query groups to ``d_inner = heads * head_dim``) is convolved and
    scanned with a per-channel step size and a diagonal ``(d_inner, d_state)`` decay; B (from k)
    and C (from q) are per-head, so channel ``c`` reads the B/C of head ``c // head_dim``.
    """

    def __init__(self, config: HybridMambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.d_inner = config.mamba_d_inner
        self.d_xb = config.mamba_d_xb
        self.d_state = config.mamba_d_state
        hidden = config.hidden_size
        self.in_proj_x = nn.Linear(hidden, self.d_xb, bias=config.attention_bias)
        self.in_proj_z = nn.Linear(hidden, self.d_inner, bias=config.mamba_gate_bias)
        self.B_proj = nn.Linear(hidden, self.d_xb, bias=config.attention_bias)
        self.C_proj = nn.Linear(hidden, self.d_inner, bias=config.attention_bias)
        self.dt_proj_down = nn.Linear(hidden, config.mamba_dt_rank, bias=False)
        self.dt_proj = nn.Linear(config.mamba_dt_rank, self.d_inner, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(self.d_inner))
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=config.mamba_d_conv,
            groups=self.d_inner,
            padding=config.mamba_d_conv - 1,
            bias=config.mamba_conv_bias,
        )
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, hidden, bias=config.attention_out_bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba1's init: S4D-real A (``A[:, n] = n + 1``), dt log-uniform, D = 1, dt_proj scaled by rank."""
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32).expand(self.d_inner, -1)
        init.copy_(self.A_log, torch.log(a))
        init.copy_(self.dt_bias, _sample_dt(self.d_inner, self.config))
        init.ones_(self.D)
        std = self.config.mamba_dt_rank**-0.5
        init.uniform_(self.dt_proj.weight, -std, std)

    @torch.no_grad()
    def init_from_attention(self, attn: nn.Module, style: str = "attention") -> None:
        """``x ← v_proj``, ``B ← k_proj``, ``C ← q_proj``, ``out_proj ← o_proj`` (biases too).

        ``style`` as :meth:`Mamba2Mixer.init_from_attention`. Mamba1 has no norm, so under
        ``"attention"`` its constant gate (z's weights 0, its bias) carries the fitted per-channel
        output scale.
        """
        for proj in (self.in_proj_z, self.dt_proj_down, self.conv1d):
            proj.reset_parameters()
        self.in_proj_x.load_state_dict(attn.v_proj.state_dict())
        self.B_proj.load_state_dict(attn.k_proj.state_dict())
        self.C_proj.load_state_dict(attn.q_proj.state_dict())
        self.out_proj.load_state_dict(attn.o_proj.state_dict())
        self.reset_ssm_parameters()
        if style == "attention":
            if self.in_proj_z.bias is None:
                raise ValueError("the attention-mimicking init needs a gate bias: build with mamba_gate_bias=True")
            init.zeros_(self.in_proj_z.weight)
            init.constant_(self.in_proj_z.bias, GATE_ONE)
            identity_conv_(self.conv1d)
            init.zeros_(self.D)
        elif style != "reference":
            raise ValueError(f"mixer init {style!r} is not one of {MIXER_INITS}")

    @torch.no_grad()
    def set_output_scale(self, scale: torch.Tensor) -> None:
        """Per-channel scale of what ``out_proj`` reads: the constant gate ``silu(bias)`` (z's weights are 0)."""
        self.in_proj_z.bias.copy_(inverse_silu(scale.clamp(min=1e-3)).to(self.in_proj_z.bias))

    def output_scale(self) -> torch.Tensor:
        return F.silu(self.in_proj_z.bias.detach().float())

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: HybridMambaCache | None = None,
        padding_mask: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        n_rep = self.num_heads // self.num_kv_heads
        x = self.in_proj_x(hidden_states).unflatten(-1, (self.num_kv_heads, self.head_dim))
        x = repeat_heads(x, n_rep, dim=-2).flatten(-2)
        z = self.in_proj_z(hidden_states)
        B = repeat_heads(self.B_proj(hidden_states).unflatten(-1, (self.num_kv_heads, self.d_state)), n_rep, dim=-2)
        C = self.C_proj(hidden_states).unflatten(-1, (self.num_heads, self.d_state))
        delta = self.dt_proj(self.dt_proj_down(hidden_states))
        A = -torch.exp(self.A_log.float())
        weight = self.conv1d.weight.squeeze(1)
        l = hidden_states.shape[1]
        if cache is not None and cache.has_previous_state and l == 1:
            u = ops.causal_conv1d_step(x[:, 0], cache.conv_states[self.layer_idx], weight, self.conv1d.bias,
                                       backend=backend)
            y = ops.selective_step(
                cache.ssm_states[self.layer_idx], u, delta[:, 0], A, B[:, 0], C[:, 0], self.D,
                z=z[:, 0], delta_bias=self.dt_bias, delta_softplus=True, backend=backend,
            ).unsqueeze(1)
        else:
            continuing = cache is not None and cache.has_previous_state
            u = masked_causal_conv(x, self.conv1d, cache, self.layer_idx, padding_mask, backend)
            y = ops.selective_scan(
                u, delta, A, B, C, self.D,
                z=z, delta_bias=self.dt_bias, delta_softplus=True,
                initial_state=cache.ssm_states[self.layer_idx] if continuing else None,
                return_final_state=cache is not None,
                backend=backend,
            )
            if cache is not None:
                y, ssm_state = y
                cache.ssm_states[self.layer_idx].copy_(ssm_state)
        return self.out_proj(y.to(hidden_states.dtype))


MIXER_CLASSES = {"mamba2": Mamba2Mixer, "mamba1": Mamba1Mixer}


class HybridDecoderLayer(GradientCheckpointingLayer):
    """Teacher's pre-norm block; the token mixer is attention (``self_attn``) or Mamba (``mamba``)."""

    def __init__(self, config: HybridMambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_attention = config.is_attention_layer(layer_idx)
        if self.is_attention:
            self.self_attn = HybridAttention(config, layer_idx)
        else:
            self.mamba = MIXER_CLASSES[config.mixer_type](config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        cache: HybridMambaCache | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if self.is_attention:
            hidden_states = self.self_attn(hidden_states, position_embeddings, attention_mask, cache)
        else:
            hidden_states = self.mamba(hidden_states, cache, padding_mask, backend)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class HybridMambaPreTrainedModel(PreTrainedModel):
    config_class = HybridMambaConfig
    config: HybridMambaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, (Mamba2Mixer, Mamba1Mixer)):
            module.reset_ssm_parameters()
        elif isinstance(module, GatedRMSNorm):
            init.ones_(module.weight)


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    query_length: int,
    past_length: int,
    sliding_window: int | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean ``(batch | 1, 1, q, kv)`` mask: causal, key padding, optional sliding window.

    Returns None when plain causal attention (``is_causal``) or no mask at all is exact. Each
    query may always see itself, so a padded query row is never fully masked (which would give
    NaNs that the Mamba layers' zero-masking could not remove).
    """
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    if not has_padding and sliding_window is None and (past_length == 0 or query_length == 1):
        return None
    kv_length = past_length + query_length
    q_pos = torch.arange(past_length, kv_length, device=device)[:, None]
    k_pos = torch.arange(kv_length, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask = mask & (q_pos - k_pos < sliding_window)
    mask = mask[None, None]
    if has_padding:
        mask = mask & attention_mask[:, None, None, -kv_length:].bool()
    return mask | (k_pos == q_pos)[None, None]


class HybridMambaModel(HybridMambaPreTrainedModel):
    def __init__(self, config: HybridMambaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([HybridDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HybridMambaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = HybridMambaCache(self.config, batch, inputs_embeds.dtype, inputs_embeds.device)
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                position_ids = torch.arange(past_length, past_length + length, device=inputs_embeds.device)[None]
        mask = build_attention_mask(attention_mask, length, past_length, self.config.sliding_window, inputs_embeds.device)
        padding_mask = None
        if attention_mask is not None and not bool(attention_mask[:, -length:].all()):
            padding_mask = attention_mask[:, -length:]
        backend = ops.resolve_backend(self.config.kernel_backend, inputs_embeds.device)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states = layer(
                hidden_states,
                position_embeddings,
                attention_mask=mask,
                padding_mask=padding_mask,
                cache=cache,
                backend=backend,
            )
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        if cache is not None:
            cache.seq_length += length
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
        )


class HybridMambaForCausalLM(HybridMambaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridMambaConfig):
        super().__init__(config)
        self.model = HybridMambaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Mamba layers need conv/SSM states: the cache is made in prepare_inputs_for_generation.
        return False

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, **kwargs):
        kwargs.pop("past_key_values", None)
        if cache is None and kwargs.get("use_cache", True):
            cache = HybridMambaCache(self.config, input_ids.shape[0], self.dtype, input_ids.device)
        return super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, **kwargs
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HybridMambaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_values", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )
