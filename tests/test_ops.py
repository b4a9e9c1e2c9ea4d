"""Reference kernels agree with their token-by-token oracles, steps, splits and F.conv1d."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.ops import (
    causal_conv1d,
    causal_conv1d_step,
    resolve_backend,
    selective_multi_step,
    selective_scan,
    selective_step,
    ssd_multi_step,
    ssd_scan,
    ssd_step,
)
from pipeline.ops.selective_scan import selective_scan_recurrent
from pipeline.ops.ssd import ssd_scan_recurrent

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert rel_err(a.double(), b.double()) < tol


# ----------------------------------------------------------------------------- SSD


def ssd_inputs(b=2, l=37, h=4, p=3, g=2, n=5, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    return dict(
        x=r(b, l, h, p),
        dt=F.softplus(r(b, l, h) - 1),
        A=-torch.rand(h, generator=gen, dtype=dtype) * 4 - 0.1,
        B=r(b, l, g, n),
        C=r(b, l, g, n),
        D=r(h),
    ), r(b, h, p, n)


@pytest.mark.parametrize("with_initial", [False, True])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_ssd_scan_matches_recurrence_step_and_multi_step(with_initial, dtype):
    args, s0 = ssd_inputs(dtype=dtype)
    s0 = s0 if with_initial else None
    y, final = ssd_scan(**args, chunk_size=16, initial_state=s0, return_final_state=True)
    y_rec, final_rec = ssd_scan_recurrent(**args, initial_state=s0, return_final_state=True)
    assert y.dtype == dtype and final.dtype in (torch.float32, F64)
    assert_close(y, y_rec)
    assert_close(final, final_rec)

    b, l, h, p = args["x"].shape
    state = torch.zeros(b, h, p, 5, dtype=F64) if s0 is None else s0.double().clone()
    start = state.clone()
    per_token = [args | {k: args[k][:, t] for k in ("x", "dt", "B", "C")} for t in range(l)]
    ys = torch.stack([ssd_step(state, **a) for a in per_token], dim=1)
    assert_close(ys, y_rec)
    assert_close(state, final_rec)

    y_multi, final_multi = ssd_multi_step(start, **args)
    assert torch.equal(start, torch.zeros_like(start) if s0 is None else s0.double())  # untouched
    assert_close(y_multi, y_rec)
    assert_close(final_multi, final_rec)
    _, states = ssd_multi_step(start, **args, return_all_states=True)
    assert states.shape == (b, l, h, p, 5)
    assert_close(states[:, -1], final_rec)
    _, after_ten = ssd_multi_step(start, **{k: v[:, :10] if v.dim() > 1 else v for k, v in args.items()})
    assert_close(states[:, 9], after_ten)


@pytest.mark.parametrize("chunk_size", [1, 8, 64])
def test_ssd_scan_independent_of_chunk_size(chunk_size):
    args, s0 = ssd_inputs(l=21)
    ref = ssd_scan_recurrent(**args, initial_state=s0)
    assert_close(ssd_scan(**args, chunk_size=chunk_size, initial_state=s0), ref)


def test_ssd_scan_split_equals_full():
    args, s0 = ssd_inputs(l=40)
    y, final = ssd_scan(**args, chunk_size=16, initial_state=s0, return_final_state=True)
    first = {k: v[:, :23] if v.dim() > 1 else v for k, v in args.items()}
    second = {k: v[:, 23:] if v.dim() > 1 else v for k, v in args.items()}
    y1, mid = ssd_scan(**first, chunk_size=16, initial_state=s0, return_final_state=True)
    y2, end = ssd_scan(**second, chunk_size=16, initial_state=mid, return_final_state=True)
    assert_close(torch.cat([y1, y2], dim=1), y)
    assert_close(end, final)


def test_ssd_scan_single_token_and_no_skip():
    args, _ = ssd_inputs(l=1)
    args["D"] = None
    assert_close(ssd_scan(**args), ssd_scan_recurrent(**args))


def test_ssd_scan_gradients_flow():
    args, s0 = ssd_inputs(l=19, dtype=torch.float32)
    leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
    s0.requires_grad_()
    y, final = ssd_scan(**leaves, chunk_size=8, initial_state=s0, return_final_state=True)
    (y.square().sum() + final.sum()).backward()
    for name, t in list(leaves.items()) + [("initial_state", s0)]:
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name


def test_ssd_scan_gradients_match_recurrence():
    args, s0 = ssd_inputs(l=13)
    grads = []
    for scan in (lambda **a: ssd_scan(**a, chunk_size=4), ssd_scan_recurrent):
        leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
        init = s0.clone().requires_grad_()
        out = scan(**leaves, initial_state=init, return_final_state=True)
        (out[0].sin().sum() + out[1].cos().sum()).backward()
        grads.append([t.grad for t in leaves.values()] + [init.grad])
    for g_chunked, g_rec in zip(*grads):
        assert_close(g_chunked, g_rec)


def test_ssd_bad_shape_names_argument():
    args, _ = ssd_inputs()
    args["B"] = args["B"][:, :, :, :4]
    with pytest.raises(PipelineError, match="'C'"):
        ssd_scan(**args)
    args, _ = ssd_inputs(h=4, g=3)
    with pytest.raises(PipelineError, match="divisible"):
        ssd_scan(**args)


# ----------------------------------------------------------------------------- selective scan


def mamba1_inputs(b=2, l=37, d=6, g=3, n=4, dtype=F64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    return dict(
        u=r(b, l, d),
        delta=r(b, l, d) - 1,
        A=-torch.rand(d, n, generator=gen, dtype=dtype) * 8 - 0.1,
        B=r(b, l, g, n),
        C=r(b, l, g, n),
        D=r(d),
        z=r(b, l, d),
        delta_bias=r(d) * 0.5,
    ), r(b, d, n)


def slice_tokens(args, sl):
    return {k: v[:, sl] if v.dim() > 2 or k in ("u", "delta", "z") else v for k, v in args.items()}


@pytest.mark.parametrize("with_initial", [False, True])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_selective_scan_matches_recurrence_step_and_multi_step(with_initial, dtype):
    args, s0 = mamba1_inputs(dtype=dtype)
    s0 = s0 if with_initial else None
    y, final = selective_scan(**args, initial_state=s0, return_final_state=True)
    y_rec, final_rec = selective_scan_recurrent(**args, initial_state=s0, return_final_state=True)
    assert y.dtype == dtype
    assert_close(y, y_rec)
    assert_close(final, final_rec)

    b, l, d = args["u"].shape
    state = torch.zeros(b, d, 4, dtype=F64) if s0 is None else s0.double().clone()
    start = state.clone()
    ys = torch.stack([selective_step(state, **slice_tokens(args, t)) for t in range(l)], dim=1)
    assert_close(ys, y_rec)
    assert_close(state, final_rec)

    y_multi, final_multi = selective_multi_step(start, **args)
    assert_close(y_multi, y_rec)
    assert_close(final_multi, final_rec)
    _, states = selective_multi_step(start, **args, return_all_states=True)
    assert states.shape == (b, l, d, 4)
    assert_close(states[:, -1], final_rec)


def test_selective_scan_options():
    args, _ = mamba1_inputs(l=9)
    for drop in ("z", "D", "delta_bias"):
        reduced = {k: v for k, v in args.items() if k != drop}
        assert_close(selective_scan(**reduced), selective_scan_recurrent(**reduced))
    assert_close(selective_scan(**args, delta_softplus=False), selective_scan_recurrent(**args, delta_softplus=False))


def test_selective_scan_long_sequence_crosses_blocks_and_splits():
    args, s0 = mamba1_inputs(l=150, d=4, g=1)
    y, final = selective_scan(**args, initial_state=s0, return_final_state=True)
    y_rec, final_rec = selective_scan_recurrent(**args, initial_state=s0, return_final_state=True)
    assert_close(y, y_rec)
    y1, mid = selective_scan(**slice_tokens(args, slice(0, 70)), initial_state=s0, return_final_state=True)
    y2, end = selective_scan(**slice_tokens(args, slice(70, None)), initial_state=mid, return_final_state=True)
    assert_close(torch.cat([y1, y2], dim=1), y)
    assert_close(end, final)


def test_selective_scan_gradients_match_recurrence():
    args, s0 = mamba1_inputs(l=70, d=4, g=2)
    grads = []
    for scan in (selective_scan, selective_scan_recurrent):
        leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
        init = s0.clone().requires_grad_()
        y, final = scan(**leaves, initial_state=init, return_final_state=True)
        (y.sin().sum() + final.cos().sum()).backward()
        grads.append([t.grad for t in leaves.values()] + [init.grad])
    for g_fast, g_rec in zip(*grads):
        assert torch.isfinite(g_fast).all() and g_fast.abs().sum() > 0
        assert_close(g_fast, g_rec)


# ----------------------------------------------------------------------------- causal conv


def conv_inputs(b=2, l=11, c=5, w=4, dtype=F64, seed=2):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    return r(b, l, c), r(c, w), r(c), r(b, c, w - 1)


@pytest.mark.parametrize("length", [11, 2, 1])
@pytest.mark.parametrize("activation", ["silu", None])
def test_causal_conv1d_matches_steps_and_conv1d(length, activation):
    x, weight, bias, s0 = conv_inputs(l=length)
    y, final = causal_conv1d(x, weight, bias, activation=activation, initial_state=s0, return_final_state=True)

    full = torch.cat([s0, x.transpose(1, 2)], dim=-1)
    expected = F.conv1d(full, weight.unsqueeze(1), bias, groups=x.shape[-1]).transpose(1, 2)
    expected = F.silu(expected) if activation else expected
    assert_close(y, expected)
    assert torch.equal(final, full[..., -3:])  # the last w-1 inputs, also when l < w-1

    state = s0.clone()
    ys = torch.stack([causal_conv1d_step(x[:, t], state, weight, bias, activation=activation) for t in range(length)], 1)
    assert_close(ys, y)
    assert torch.equal(state, final)


def test_causal_conv1d_zero_history_and_split():
    x, weight, bias, _ = conv_inputs(l=12)
    y = causal_conv1d(x, weight, bias)
    padded = F.pad(x.transpose(1, 2), (3, 0))
    expected = F.silu(F.conv1d(padded, weight.unsqueeze(1), bias, groups=x.shape[-1])).transpose(1, 2)
    assert_close(y, expected)
    y1, mid = causal_conv1d(x[:, :5], weight, bias, return_final_state=True)
    y2 = causal_conv1d(x[:, 5:], weight, bias, initial_state=mid)
    assert_close(torch.cat([y1, y2], 1), y)


def test_causal_conv1d_gradients_flow():
    x, weight, bias, s0 = (t.float().requires_grad_() for t in conv_inputs())
    y, final = causal_conv1d(x, weight, bias, initial_state=s0, return_final_state=True)
    (y.sum() + final.sum()).backward()
    for t in (x, weight, bias, s0):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_causal_conv1d_bad_input():
    x, weight, bias, s0 = conv_inputs()
    with pytest.raises(PipelineError, match="initial_state"):
        causal_conv1d(x, weight, bias, initial_state=s0[..., :2])
    with pytest.raises(PipelineError, match="activation"):
        causal_conv1d(x, weight, bias, activation="gelu")


# ----------------------------------------------------------------------------- backend dispatch


def test_resolve_backend_auto_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv("PIPELINE_KERNEL_BACKEND", raising=False)
    assert resolve_backend("auto", "cpu") == "reference"
    assert resolve_backend(None, torch.device("cpu")) == "reference"


def test_resolve_backend_env_override(monkeypatch):
    monkeypatch.setenv("PIPELINE_KERNEL_BACKEND", "reference")
    assert resolve_backend("auto", "cpu") == "reference"
    monkeypatch.setenv("PIPELINE_KERNEL_BACKEND", "fla")
    with pytest.raises(PipelineError, match="PIPELINE_KERNEL_BACKEND"):
        resolve_backend("auto", "cpu")
    assert resolve_backend("reference", "cpu") == "reference"  # an explicit request wins over the env


def test_resolve_backend_rejects_unknown_and_unavailable(monkeypatch):
    monkeypatch.delenv("PIPELINE_KERNEL_BACKEND", raising=False)
    with pytest.raises(PipelineError, match="unknown kernel backend"):
        resolve_backend("cudnn", "cpu")
    for name in ("fla", "mamba_ssm"):
        with pytest.raises(PipelineError, match="not available"):
            resolve_backend(name, "cpu")
    args, _ = ssd_inputs()
    with pytest.raises(PipelineError, match="not available"):
        ssd_scan(**args, backend="fla")


def test_chosen_backend_is_logged_once(monkeypatch, caplog):
    import pipeline.ops.backend as backend

    monkeypatch.delenv("PIPELINE_KERNEL_BACKEND", raising=False)
    monkeypatch.setattr(backend, "_logged", set())
    with caplog.at_level("INFO", logger="pipeline.ops"):
        x, weight, bias, _ = conv_inputs()
        causal_conv1d(x, weight, bias)
        causal_conv1d(x, weight, bias)
    messages = [r.getMessage() for r in caplog.records if r.name == "pipeline.ops"]
    assert len(messages) == 1 and "reference" in messages[0]


def test_fp32_fast_kernels_get_full_precision_dots(monkeypatch):
    """Triton would run an fp32 SSD's dot products in tf32 (1e-3 off); the wrappers ask for ieee,
    as torch's own fp32 matmuls are, but never over a precision the user chose."""
    knobs = pytest.importorskip("triton").knobs
    import pipeline.ops.backend as backend

    with knobs.language.scope():
        monkeypatch.delenv("TRITON_F32_DEFAULT", raising=False)
        del knobs.language.fp32_default  # back to the environment
        assert knobs.language.fp32_default is None
        backend.use_exact_fp32_dots(torch.bfloat16)
        assert knobs.language.fp32_default is None  # bf16 inputs leave it alone
        backend.use_exact_fp32_dots(torch.float32)
        assert knobs.language.fp32_default == "ieee"
        assert os.environ["TRITON_F32_DEFAULT"] == "ieee"  # exported: the disk cache is keyed on it
    monkeypatch.delenv("TRITON_F32_DEFAULT", raising=False)

    precision = torch.get_float32_matmul_precision()
    with knobs.language.scope():
        del knobs.language.fp32_default
        torch.set_float32_matmul_precision("high")  # the user allowed tf32 for torch's matmuls too
        try:
            backend.use_exact_fp32_dots(torch.float32)
        finally:
            torch.set_float32_matmul_precision(precision)
        assert knobs.language.fp32_default is None

    with knobs.language.scope():
        del knobs.language.fp32_default
        monkeypatch.setenv("TRITON_F32_DEFAULT", "tf32x3")
        backend.use_exact_fp32_dots(torch.float32)
        assert knobs.language.fp32_default == "tf32x3"


def test_causal_conv1d_final_state_is_sliced_from_the_inputs(monkeypatch):
    """causal-conv1d's own final state gave a wrong dx when it carried a gradient (H100): the
    wrapper never asks the kernel for it and returns the last w-1 inputs, which carry gradient."""
    import types

    import pipeline.ops.mamba_kernels as mamba_kernels

    asked = []

    def conv_fn(x, *args, return_final_states=False, **kwargs):
        asked.append(return_final_states)
        return x * 2  # stands for the conv output: (b, c, l), like the input

    monkeypatch.setattr(mamba_kernels, "_conv_package", lambda: types.SimpleNamespace(causal_conv1d_fn=conv_fn))
    x, weight, bias, state = conv_inputs(c=8, dtype=torch.float32)
    x.requires_grad_()
    _, final = mamba_kernels.causal_conv1d(x, weight, bias, initial_state=state, return_final_state=True)
    _, expected = causal_conv1d(x.detach(), weight, bias, initial_state=state, return_final_state=True)
    assert asked == [False]
    assert torch.equal(final, expected) and final.shape == state.shape
    final.sum().backward()
    w = weight.shape[1]
    assert torch.equal(x.grad[:, -(w - 1) :], torch.ones_like(x.grad[:, -(w - 1) :]))
    assert not x.grad[:, : -(w - 1)].any()
