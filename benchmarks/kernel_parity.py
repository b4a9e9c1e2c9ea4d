"""GPU parity and speed of every available kernel backend against the fp32 reference.

For each fast backend (fla, mamba_ssm) and dtype (fp32, bf16) every op runs on SmolLM2-sized
inputs; the reference runs on the same values upcast to fp32, so the error measured is the
kernel's alone. Outputs, final states and input gradients (through a fixed random cotangent)
are compared by relative L2 error; timings are medians. A backend that does not import is
reported and skipped without hiding the others; a parity failure or a crash exits 1.

    python benchmarks/kernel_parity.py --out reports/kernel_parity.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled
from pipeline import ops  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.ops.backend import ENV_VAR, last_backend  # noqa: E402

TOLERANCE = {"fp32": 1e-3, "bf16": 1e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FAST_BACKENDS = ("fla", "mamba_ssm")

# SmolLM2-135M: hidden 576 = 9 heads x 64; Mamba2 conv runs over x, B and C together.
BATCH, LENGTH, HEADS, HEAD_DIM, STATE, GROUPS, WIDTH = 2, 2048, 9, 64, 64, 9, 4
CHANNELS = HEADS * HEAD_DIM
CONV_CHANNELS = CHANNELS + 2 * GROUPS * STATE
DEVICE = "cuda"


@dataclass
class Case:
    name: str
    op: str  # dispatch name, to report which backend actually served the call
    make: Callable[[torch.dtype], dict]  # leaf inputs in the kernel dtype
    call: Callable[[dict], dict]  # named outputs
    grads: tuple[str, ...] = ()  # inputs whose gradients are compared (empty: forward only)
    notes: str = ""


def _randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def _log_uniform(shape, low, high):
    return torch.exp(torch.empty(shape, device=DEVICE).uniform_(torch.log(torch.tensor(low)).item(),
                                                                 torch.log(torch.tensor(high)).item()))


# ----------------------------------------------------------------------------- cases


def ssd_inputs(dtype, length=None, batch=BATCH):
    length = length or LENGTH
    return dict(
        x=_randn(batch, length, HEADS, HEAD_DIM, dtype=dtype),
        dt=_log_uniform((batch, length, HEADS), 1e-3, 1e-1).to(dtype),
        A=-torch.empty(HEADS, device=DEVICE).uniform_(1, 16),
        B=_randn(batch, length, GROUPS, STATE, dtype=dtype),
        C=_randn(batch, length, GROUPS, STATE, dtype=dtype),
        D=torch.ones(HEADS, device=DEVICE),
        initial_state=_randn(batch, HEADS, HEAD_DIM, STATE),
    )


def ssd_scan_call(t):
    y, final_state = ops.ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], chunk_size=64,
                                  initial_state=t["initial_state"], return_final_state=True)
    return {"y": y, "final_state": final_state}


def mamba1_inputs(dtype, length=None, batch=BATCH):
    length = length or LENGTH
    dt = _log_uniform((CHANNELS,), 1e-3, 1e-1)
    return dict(
        u=_randn(batch, length, CHANNELS, dtype=dtype),
        delta=_randn(batch, length, CHANNELS, dtype=dtype, scale=0.5),
        A=-torch.arange(1, STATE + 1, device=DEVICE, dtype=torch.float32).repeat(CHANNELS, 1),
        B=_randn(batch, length, GROUPS, STATE, dtype=dtype),
        C=_randn(batch, length, GROUPS, STATE, dtype=dtype),
        D=torch.ones(CHANNELS, device=DEVICE),
        z=_randn(batch, length, CHANNELS, dtype=dtype),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),  # inverse softplus: Mamba1's dt init
    )


def selective_scan_call(t, **kw):
    out = ops.selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], z=t["z"],
                             delta_bias=t["delta_bias"], initial_state=t.get("initial_state"), **kw)
    return {"y": out[0], "final_state": out[1]} if kw.get("return_final_state") else {"y": out}


def conv_inputs(dtype, length=None, batch=BATCH):
    length = length or LENGTH
    return dict(
        x=_randn(batch, length, CONV_CHANNELS, dtype=dtype),
        weight=_randn(CONV_CHANNELS, WIDTH, scale=0.5),
        bias=_randn(CONV_CHANNELS, scale=0.1),
        initial_state=_randn(batch, CONV_CHANNELS, WIDTH - 1, dtype=dtype),
    )


def conv_call(t):
    y, final_state = ops.causal_conv1d(t["x"], t["weight"], t["bias"], activation="silu",
                                       initial_state=t["initial_state"], return_final_state=True)
    return {"y": y, "final_state": final_state}


def conv_train_call(t):
    return {"y": ops.causal_conv1d(t["x"], t["weight"], t["bias"], activation="silu")}


def first_token(t, keys):
    return {k: (v[:, 0].contiguous() if k in keys else v) for k, v in t.items()}


def ssd_step_call(t):
    state = t["initial_state"].detach().clone()
    y = ops.ssd_step(state, t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"])
    return {"y": y, "state": state}


def selective_step_call(t):
    state = t["initial_state"].detach().clone()
    y = ops.selective_step(state, t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], z=t["z"],
                           delta_bias=t["delta_bias"])
    return {"y": y, "state": state}


def conv_step_call(t):
    state = t["initial_state"].detach().clone()
    y = ops.causal_conv1d_step(t["x"], state, t["weight"], t["bias"], activation="silu")
    return {"y": y, "state": state}


def mamba1_step_inputs(dtype):
    t = first_token(mamba1_inputs(dtype, length=1), ("u", "delta", "B", "C", "z"))
    t["initial_state"] = _randn(BATCH, CHANNELS, STATE)
    return t


CASES = [
    Case("ssd_scan", "ssd_scan", ssd_inputs, ssd_scan_call,
         grads=("x", "dt", "A", "B", "C", "D", "initial_state")),
    Case("ssd_scan[l=1000]", "ssd_scan", lambda d: ssd_inputs(d, length=1000), ssd_scan_call,
         grads=("x", "dt", "B", "C", "initial_state"), notes="length not a multiple of the chunk"),
    Case("ssd_scan[prefill]", "ssd_scan", ssd_inputs, ssd_scan_call,
         notes="no grad: fla's forward, whose backward is off on Hopper with Triton < 3.7.1"),
    Case("selective_scan", "selective_scan", mamba1_inputs, selective_scan_call,
         grads=("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
    Case("selective_scan[prefill]", "selective_scan", mamba1_inputs,
         lambda t: selective_scan_call(t, return_final_state=True), notes="no grad, final state"),
    Case("causal_conv1d", "causal_conv1d", conv_inputs, conv_call,
         grads=("x", "weight", "bias", "initial_state")),
    Case("causal_conv1d[train]", "causal_conv1d", conv_inputs, conv_train_call, grads=("x", "weight", "bias"),
         notes="no states, as in training"),
    Case("causal_conv1d[l=2]", "causal_conv1d", lambda d: conv_inputs(d, length=2), conv_call,
         grads=("x", "weight", "bias", "initial_state"), notes="l < w-1"),
    Case("ssd_step", "ssd_step", lambda d: first_token(ssd_inputs(d, length=1), ("x", "dt", "B", "C")),
         ssd_step_call),
    Case("selective_step", "selective_step", mamba1_step_inputs, selective_step_call),
    Case("causal_conv1d_step", "causal_conv1d_step",
         lambda d: first_token(conv_inputs(d, length=1), ("x",)), conv_step_call),
]


# ----------------------------------------------------------------------------- machinery


@contextlib.contextmanager
def use_backend(name: str):
    """Route every op through ``name`` via the env override (the cases call the public ops without a backend)."""
    saved = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = saved


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape:
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def median_ms(fn: Callable[[], object], grad_to_none=None) -> float:
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=50, grad_to_none=grad_to_none, return_mode="median"))
    except (ImportError, TypeError):  # no triton, or an old do_bench without return_mode
        times = []
        for i in range(25):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            if i >= 5:
                times.append(start.elapsed_time(end))
        return statistics.median(times)


def leaves(inputs: dict, grads: tuple[str, ...], upcast: bool) -> dict:
    out = {}
    for k, v in inputs.items():
        v = v.detach().float() if upcast else v.detach()
        out[k] = v.requires_grad_(k in grads)
    return out


def weighted_sum(outputs: dict, cotangents: dict) -> torch.Tensor:
    return sum((outputs[k].float() * cotangents[k]).sum() for k in cotangents)


def check(case: Case, backend: str, dtype_name: str) -> dict:
    torch.manual_seed(0)
    raw = case.make(DTYPES[dtype_name])
    fast, ref = leaves(raw, case.grads, upcast=False), leaves(raw, case.grads, upcast=True)
    row = {"op": case.name, "backend": backend, "dtype": dtype_name, "notes": case.notes}

    with use_backend(backend), torch.set_grad_enabled(bool(case.grads)):
        out = case.call(fast)
    row["served_by"] = last_backend(case.op)
    with use_backend("reference"), torch.set_grad_enabled(bool(case.grads)):
        expected = case.call(ref)
    errors = {name: rel_err(out[name], expected[name]) for name in expected}

    if case.grads:
        torch.manual_seed(1)
        cotangents = {k: torch.randn_like(v, dtype=torch.float32) for k, v in expected.items()}
        weighted_sum(out, cotangents).backward()
        weighted_sum(expected, cotangents).backward()
        for k in case.grads:
            errors[f"d{k}"] = rel_err(fast[k].grad, ref[k].grad)
    row["rel_err"] = errors
    worst = max(errors.values())
    row["max_rel_err"] = worst
    row["ok"] = bool(worst < TOLERANCE[dtype_name])

    with use_backend(backend):
        with torch.no_grad():
            row["ms_fwd"] = median_ms(lambda: case.call(fast))
        row["fwd_timed_on"] = last_backend(case.op)  # without grad another backend may serve it
        if case.grads:
            grad_leaves = [fast[k] for k in case.grads]

            def forward_backward():
                weighted_sum(case.call(fast), cotangents).backward()

            row["ms_fwd_bwd"] = median_ms(forward_backward, grad_to_none=grad_leaves)
    return row


def versions() -> dict:
    found = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    for name in ("triton", "fla", "mamba_ssm", "causal_conv1d"):
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as exc:  # report, do not fail: availability is judged per backend
            found[name] = f"unavailable ({type(exc).__name__}: {exc})"
    return found


HEADER = (f"{'op':26} {'backend':10} {'served':10} {'dtype':5} {'y':>9} {'state':>9} {'grad(worst)':>24} "
          f"{'fwd ms':>8} {'f+b ms':>8}  status")


def print_row(r: dict) -> None:
    """One table row, printed as soon as it is measured (a timed-out GPU call keeps what it had)."""
    if "rel_err" not in r:
        print(f"{r['op']:26} {r['backend']:10} {'-':10} {r['dtype']:5} {'':>9} {'':>9} {'':>24} {'':>8} {'':>8}  {r['status']}",
              flush=True)
        return
    e = r["rel_err"]
    grads = {k: v for k, v in e.items() if k.startswith("d")}
    worst_grad = max(grads.items(), key=lambda kv: kv[1]) if grads else None
    state = e.get("final_state", e.get("state"))
    print(
        f"{r['op']:26} {r['backend']:10} {str(r['served_by']):10} {r['dtype']:5} "
        f"{e['y']:9.2e} {'' if state is None else f'{state:9.2e}':>9} "
        f"{'' if worst_grad is None else f'{worst_grad[0]} {worst_grad[1]:.2e}':>24} "
        f"{r['ms_fwd']:8.3f} {r.get('ms_fwd_bwd', float('nan')):8.3f}  {r['status']}"
        + (f" (fwd ms on {r['fwd_timed_on']})" if r.get("fwd_timed_on", r["served_by"]) != r["served_by"] else ""),
        flush=True,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="kernel_parity.json", help="where to write the JSON results")
    parser.add_argument("--backends", default=",".join(FAST_BACKENDS))
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--ops", default="", help="comma-separated case names (default: all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_parity needs a CUDA device", file=sys.stderr)
        return 2

    cases = [c for c in CASES if not args.ops or c.name in args.ops.split(",")]
    rows, failed, tested = [], False, 0
    print(HEADER)
    print("-" * len(HEADER), flush=True)
    for backend in ["reference"] + args.backends.split(","):
        try:
            ops.resolve_backend(backend, "cuda")
        except PipelineError as exc:
            print(f"[skip] backend {backend}: {exc}", file=sys.stderr)
            rows.append({"op": "*", "backend": backend, "dtype": "-", "status": "unavailable", "error": str(exc)})
            print_row(rows[-1])
            continue
        tested += backend != "reference"
        for case in cases:
            for dtype_name in args.dtypes.split(","):
                try:
                    row = check(case, backend, dtype_name)
                    row["status"] = "ok" if row["ok"] else "FAIL"
                    # the reference rows are timings only: they compare the reference with itself
                    failed |= not row["ok"] and backend != "reference"
                except Exception as exc:
                    row = {"op": case.name, "backend": backend, "dtype": dtype_name, "status": "ERROR",
                           "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
                    print(f"[error] {case.name} {backend} {dtype_name}:\n{row['traceback']}", file=sys.stderr)
                    failed = True
                rows.append(row)
                print_row(row)
                torch.cuda.empty_cache()

    result = {"versions": versions(), "tolerance": TOLERANCE, "rows": rows,
              "shapes": dict(batch=BATCH, length=LENGTH, heads=HEADS, head_dim=HEAD_DIM, state=STATE,
                             groups=GROUPS, width=WIDTH, channels=CHANNELS, conv_channels=CONV_CHANNELS)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    if tested == 0:
        print("no fast backend could be tested", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
