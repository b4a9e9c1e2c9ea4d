"""The fused Triton decoding step (``kernels="fused"``) against the reference, on CPU.

Checked: logits at every block and the caches after ragged commits (KV slots, SSM states, conv
states) for all-attention, Mamba2 and Mamba1 hybrids (Mamba1 also with x/B/C biases, narrow
widths and a dt rank that is not a power of two); Qwen2 biases, a Mistral sliding window and output
projection biases; the split-key (flash-decoding) path of long contexts; more than 16 rows (tiled
matmuls); greedy plain and speculative generation token for token; a block's logits bit for bit
equal to one-token steps; and the clear errors for what the fused step cannot run.

The kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py when there
is no GPU), so everything is float32: the interpreter's bf16 ``tl.dot`` is wrong. The interpreter
is slow (about a second per step of these 2–4 layer models), so models, prompts and blocks are tiny.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
# The models here live on the CPU; the conftest turns the interpreter on where there is no GPU.
# (On a GPU machine the same kernels are checked by benchmarks/fused_parity.py.)
pytestmark = [pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the CPU checks of the fused kernels need TRITON_INTERPRET=1"),
              pytest.mark.usefixtures("one_thread")]

from pipeline.decoding.graphs import DecodeSession  # noqa: E402
from pipeline.decoding.speculative import PlainDecoder, generate, speculative_generate  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.models.builder import attention_layers_for_ratio, build_hybrid  # noqa: E402
from tests.test_model import tiny_teacher  # noqa: E402
from tests.test_speculative import prompts, roughen, teacher  # noqa: E402


def hybrid(source, ratio, mixer="mamba2"):
    """``ratio`` of ``source``'s layers as Mamba (0 → all attention), float32, eval mode."""
    n = source.config.num_hidden_layers
    layers = attention_layers_for_ratio(n, ratio) if ratio else range(n)
    return roughen(build_hybrid(source, layers, mixer_type=mixer, seed=0, mamba_chunk_size=8).eval())


def ragged_rows(lengths, seed=1):
    return [prompts(1, n, seed=seed + i)[0] for i, n in enumerate(lengths)]


def sessions(model, batch, max_length, max_block):
    return (DecodeSession(model, batch, max_length, max_block=max_block, kernels="reference"),
            DecodeSession(model, batch, max_length, max_block=max_block, kernels="fused"))


def run_blocks(ref, fused, rows, blocks):
    """Prefill, then each (block, keep) on both sessions; the largest logit difference at each step."""
    diffs = [(ref.prefill(rows) - fused.prefill(rows)).abs().max().item()]
    for block, keep in blocks:
        diffs.append((ref.extend(block) - fused.extend(block)).abs().max().item())
        ref.commit(keep)
        fused.commit(keep)
    return diffs


def block_plan(batch, sizes_and_keeps, seed=9):
    return [(prompts(batch, size, seed=seed + j), torch.tensor(keep)) for j, (size, keep) in enumerate(sizes_and_keeps)]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("ratio,mixer", [(0.0, "mamba2"), (0.5, "mamba2"), (0.5, "mamba1")],
                         ids=["teacher", "mamba2-hybrid", "mamba1-hybrid"])
def test_fused_step_equals_reference_logits_and_caches(ratio, mixer):
    """Ragged commits (keeps 0 … T): same logits at every step, same KV, SSM and conv states after."""
    model = hybrid(teacher(0, num_hidden_layers=4), ratio, mixer)
    ref, fused = sessions(model, 3, 32, max_block=5)
    plan = block_plan(3, [(5, [0, 2, 5]), (2, [1, 2, 1]), (1, [1, 1, 1])])
    with torch.no_grad():
        diffs = run_blocks(ref, fused, ragged_rows([6, 9, 4]), plan)
        ref.settle()
        fused.settle()
    assert max(diffs) < 1e-4, diffs
    assert torch.equal(ref.lengths, fused.lengths)
    assert ref.lengths.tolist() == [6 + 0 + 1 + 1, 9 + 2 + 2 + 1, 4 + 5 + 1 + 1]
    a, b = ref.cache, fused.cache
    for r, n in enumerate(ref.lengths.tolist()):
        for i in model.config.attention_layers:
            assert _rel(b.keys[i][r, :, :n], a.keys[i][r, :, :n]) < 1e-5, (i, r)
            assert _rel(b.values[i][r, :, :n], a.values[i][r, :, :n]) < 1e-5, (i, r)
    for i in model.config.mamba_layers:
        assert _rel(b.ssm_states[i], a.ssm_states[i]) < 1e-5, i
        assert _rel(b.conv_state(i), a.conv_state(i)) < 1e-5, i


ODD_WIDTHS = {"hidden_size": 48, "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 96}


@pytest.mark.parametrize("family,overrides", [("qwen2", {}), ("mistral", {"sliding_window": 4}),
                                              ("llama", {"attention_bias": True}), ("llama", ODD_WIDTHS)],
                         ids=["qwen2-qkv-bias", "mistral-window-4", "llama-all-biases", "widths-not-powers-of-two"])
def test_fused_step_on_other_teacher_families(family, overrides):
    """Qwen2 q/k/v biases, a Mistral sliding window (4 < prompt length), o_proj/out_proj biases, and
    widths that are not powers of two (48 = 32 + 16, 96 = 64 + 32: the GEMVs' two K pieces): logits = reference."""
    source = tiny_teacher(family, num_hidden_layers=2, **overrides)
    model = hybrid(source, 0.5)
    attn = model.model.layers[model.config.attention_layers[0]].self_attn
    if family == "qwen2":
        assert attn.q_proj.bias is not None
    elif family == "mistral":
        assert model.config.sliding_window == 4
    elif "attention_bias" in overrides:
        assert attn.o_proj.bias is not None and model.model.layers[model.config.mamba_layers[0]].mamba.out_proj.bias is not None
        with torch.no_grad():  # visible biases (the tiny teacher initialises them to zero)
            for layer in model.model.layers:
                mixer = layer.self_attn if layer.is_attention else layer.mamba
                (mixer.o_proj if layer.is_attention else mixer.out_proj).bias.normal_(0, 0.5)
    ref, fused = sessions(model, 2, 32, max_block=3)
    with torch.no_grad():
        diffs = run_blocks(ref, fused, ragged_rows([9, 7]), block_plan(2, [(3, [2, 3]), (3, [3, 1])]))
    assert max(diffs) < 1e-4, diffs


def test_fused_mamba1_mixer_with_biases_and_narrow_widths():
    """Mamba1's joint input projection with biases on x/B/C and the gate (zeros stand in for the
    low-rank dt), a conv bias, head_dim 16, a dt rank of 3 (padded to 4 lanes) and an A_log stored
    column-major (the kernel reads it through its strides): logits = reference."""
    source = tiny_teacher("llama", num_hidden_layers=2, attention_bias=True, **ODD_WIDTHS)
    model = hybrid(source, 0.5, "mamba1")
    mixer = model.model.layers[model.config.mamba_layers[0]].mamba
    assert mixer.dt_proj.in_features == 3 and mixer.in_proj_z.bias is not None and mixer.conv1d.bias is not None
    with torch.no_grad():  # visible biases (the tiny teacher initialises them to zero)
        for proj in (mixer.in_proj_x, mixer.B_proj, mixer.C_proj, mixer.out_proj):
            proj.bias.normal_(0, 0.5)
        mixer.A_log.add_(torch.rand_like(mixer.A_log))  # rows that differ per channel
    mixer.A_log = torch.nn.Parameter(mixer.A_log.detach().t().contiguous().t())
    assert not mixer.A_log.is_contiguous()
    ref, fused = sessions(model, 2, 32, max_block=3)
    with torch.no_grad():
        diffs = run_blocks(ref, fused, ragged_rows([9, 7]), block_plan(2, [(3, [2, 3]), (3, [3, 1]), (1, [1, 1])]))
        ref.settle()
        fused.settle()
    assert max(diffs) < 1e-4, diffs
    # the states too: at these small step sizes the logits barely feel a wrong decay (A read with
    # the wrong strides moved them by 2e-5, but the state by 34%)
    for i in model.config.mamba_layers:
        assert _rel(fused.cache.ssm_states[i], ref.cache.ssm_states[i]) < 1e-5, i
        assert _rel(fused.cache.conv_state(i), ref.cache.conv_state(i)) < 1e-5, i


@pytest.mark.parametrize("tile,pieces", [(64, 1), (8, 1), (8, 4)],
                         ids=["one-tile-per-split", "two-tiles-per-split", "merged-in-pieces"])
def test_fused_attention_over_several_key_splits(tile, pieces, monkeypatch):
    """Flash-decoding path: keys split into 3 ranges of 16 slots, merged; logits = reference. A
    split is one tile, or two tiles of 8 (as 16k keys take two of 128); the block's slots are read
    back from the cache after they are written, into the preloaded first tile and in later ones.
    ``pieces``: each head's splits are merged by that many programs (as for many splits)."""
    from pipeline.ops import fused_decode

    monkeypatch.setattr(fused_decode, "COMBINE_LONG", (pieces, 1))
    monkeypatch.setattr(fused_decode, "COMBINE_LONG_MIN_SPLITS", 2 if pieces > 1 else 1000)
    monkeypatch.setattr(fused_decode, "KEYS_PER_SPLIT", min(tile, fused_decode.KEYS_PER_SPLIT))
    monkeypatch.setattr(fused_decode, "LONG_SPLIT_UNIT", min(tile, fused_decode.LONG_SPLIT_UNIT))
    assert fused_decode._attention_tile(16) == min(tile, 64)
    model = hybrid(teacher(0, num_hidden_layers=2), 0.5)
    ref, fused = sessions(model, 3, 48, max_block=4)
    assert fused.cache.max_length == 48
    fused._step.splits = (3, 16)  # what attention_splits gives above 64 slots, scaled down
    n_splits, split_len = fused._step.splits
    assert n_splits > 1 and n_splits * split_len >= fused.cache.max_length
    plan = block_plan(3, [(4, [4, 1, 3]), (4, [2, 4, 4]), (1, [1, 1, 1])])
    with torch.no_grad():  # rows start below, inside and above the 16-slot boundaries and cross them
        diffs = run_blocks(ref, fused, ragged_rows([13, 30, 20]), plan)
    assert max(diffs) < 1e-4, diffs
    assert fused.lengths.tolist() == [13 + 4 + 2 + 1, 30 + 1 + 4 + 1, 20 + 3 + 4 + 1]


def test_attention_split_layouts_cover_every_key():
    """Splits of 64 keys up to 8k slots (the measured best), then ~LONG_SPLITS splits in units of
    128 (16k: 65 x 256, kept after fewer splits measured slower); every layout covers the buffer."""
    from pipeline.ops.fused_decode import attention_splits

    assert attention_splits(48) == (1, 48)
    assert attention_splits(528) == (9, 64)
    assert attention_splits(4112) == (65, 64)
    assert attention_splits(16400) == (65, 256)
    for length in (65, 528, 8192, 8193, 16400, 40000):
        splits, per_split = attention_splits(length)
        assert (splits - 1) * per_split < length <= splits * per_split


def test_fused_step_with_many_rows_takes_the_tiled_matmuls():
    """Batch 4 x blocks of 5 = 20 rows, above the GEMV kernels' 16: the tiled matmul kernels = reference."""
    from pipeline.ops.fused_decode import GEMV_MAX_ROWS

    model = hybrid(teacher(0, num_hidden_layers=2), 0.5)
    ref, fused = sessions(model, 4, 32, max_block=5)
    assert 4 * 5 > GEMV_MAX_ROWS
    plan = block_plan(4, [(5, [5, 0, 3, 1]), (5, [2, 5, 5, 4])])
    with torch.no_grad():
        diffs = run_blocks(ref, fused, ragged_rows([3, 7, 5, 9]), plan)
    assert max(diffs) < 1e-4, diffs


def test_fused_greedy_generation_equals_reference():
    """Plain and speculative (draft = target, K = 3) greedy generation: same tokens, acceptance 1."""
    model = hybrid(teacher(0, num_hidden_layers=2), 0.5)
    ids = prompts(batch=2, length=6)
    expected = generate(model, ids, max_new_tokens=8, kernels="reference").tokens
    assert torch.equal(generate(model, ids, max_new_tokens=8, kernels="fused").tokens, expected)
    spec = speculative_generate(model, model, ids, k=3, max_new_tokens=8, kernels="fused")
    assert torch.equal(spec.tokens, expected)
    assert spec.stats.acceptance_rate == 1.0


@pytest.mark.parametrize("argmax_block", [None, 32], ids=["one-program", "programs-with-a-partial-last"])
def test_fused_greedy_bookkeeping_kernel_equals_the_torch_loop(argmax_block, monkeypatch):
    """The plain greedy loop's one-kernel bookkeeping (commit, argmax, record, EOS): with an EOS that
    stops one row mid-way, tokens, counts and the cache lengths equal the reference loop's. With
    32 logits a program the vocabulary of 97 takes three full programs and a partial one per row,
    merged by whichever arrives last."""
    from pipeline.ops import fused_decode

    if argmax_block is not None:
        monkeypatch.setattr(fused_decode, "ARGMAX_BLOCK", argmax_block)
    model = hybrid(teacher(0, num_hidden_layers=2), 0.5)
    ids = prompts(batch=3, length=5, seed=4)
    free = generate(model, ids, max_new_tokens=9, kernels="reference").tokens
    eos = int(free[1, 3])  # row 1 stops at its 4th token; other rows where (if) they meet it
    decoders = {kernels: PlainDecoder(model, 3, 32, kernels=kernels) for kernels in ("reference", "fused")}
    outs = {kernels: d.generate(ids, max_new_tokens=9, eos_token_id=eos, pad_token_id=7) for kernels, d in decoders.items()}
    assert torch.equal(outs["fused"].tokens, outs["reference"].tokens)
    assert torch.equal(outs["fused"].num_tokens, outs["reference"].num_tokens)
    assert int(outs["fused"].num_tokens[1]) == list(free[1]).index(eos) + 1 < 9
    assert (outs["fused"].tokens[1, 4:] == 7).all()
    assert torch.equal(decoders["fused"].session.lengths, decoders["reference"].session.lengths)


def test_fused_greedy_advance_merges_program_shares_like_torch_argmax(monkeypatch):
    """Across programs of 16 logits, the first index among equal maxima wins (a tie between two
    programs, listed last-first), NaN is never chosen, and an all -inf row takes index 0, as
    torch.argmax does for finite rows; the arrival counters are back at zero afterwards."""
    from pipeline.ops import fused_decode

    monkeypatch.setattr(fused_decode, "ARGMAX_BLOCK", 16)
    b, v = 3, 100
    logits = torch.randn(b, v, generator=torch.Generator().manual_seed(0))
    logits[0, 70] = logits[0, 21] = 9.0
    logits[0, 5] = float("nan")
    logits[1, 99] = 7.0
    logits[2] = float("-inf")
    state = dict(lengths=torch.tensor([4, 5, 6]), replay=torch.zeros(b, dtype=torch.long),
                 token=torch.zeros(b, dtype=torch.long), column=torch.zeros(b, 1, dtype=torch.long),
                 tokens=torch.zeros(b, 8, dtype=torch.long), counts=torch.zeros(b, dtype=torch.long),
                 finished=torch.tensor([False, False, True]))
    scratch = fused_decode.argmax_scratch(b, v, "cpu")
    for _ in range(2):  # the counters reset, so a second call merges again
        fused_decode.greedy_advance(logits, *state.values(), torch.tensor([99]), 7, scratch)
    assert state["token"].tolist() == [21, 99, 0]
    # row 1 chose the EOS id at the first call, so the second records the pad and commits nothing
    assert state["tokens"][:, 1:3].tolist() == [[21, 21], [99, 7], [7, 7]]
    assert state["lengths"].tolist() == [6, 6, 6] and state["counts"].tolist() == [2, 1, 0]
    assert state["finished"].tolist() == [False, True, True]
    assert not scratch[-b:].any()
    with pytest.raises(ValueError, match="argmax_scratch"):
        fused_decode.greedy_advance(logits, *state.values(), torch.tensor([99]), 7, scratch[:-1])


@pytest.mark.parametrize("row_programs,mixer,tiles", [(True, "mamba2", False), (False, "mamba2", False),
                                                      (True, "mamba1", False), (True, "mamba2", True)],
                         ids=["row-programs", "rows-walked-in-one-program", "mamba1-row-programs",
                              "two-key-tiles"])
def test_fused_block_logits_equal_plain_steps_bit_for_bit(row_programs, mixer, tiles, monkeypatch):
    """A block of T tokens gives each token exactly the logits T one-token steps give, whether a
    block's rows get their own GEMV programs or one program walks them (as for a large head), and
    with splits of two key tiles (``tiles``: the rows' blocks cross the tile boundary at slot 8, so a
    block reads its slots of the first tile back into it while the later steps read them with the
    rest of the tile before their wait). On a GPU that equality keeps greedy speculation lossless (a
    different summation order would flip near-ties); under the interpreter it checks the block
    path's row indexing and per-row code."""
    from pipeline.ops import fused_decode

    if not row_programs:
        monkeypatch.setattr(fused_decode, "ROW_PROGRAMS_MAX_BYTES", 0)
    if tiles:
        monkeypatch.setattr(fused_decode, "LONG_SPLIT_UNIT", 8)
    model = hybrid(teacher(0, num_hidden_layers=2), 0.5, mixer)
    block_session, step_session = (DecodeSession(model, 2, 32, max_block=4, kernels="fused") for _ in range(2))
    if tiles:
        for session in (block_session, step_session):
            session._step.splits = (2, 16)
    tokens = prompts(2, 4, seed=5)
    with torch.no_grad():
        for session in (block_session, step_session):
            session.prefill(ragged_rows([5, 8]))
        block = block_session.extend(tokens).clone()
        steps = []
        for t in range(tokens.shape[1]):
            steps.append(step_session.extend(tokens[:, t : t + 1])[:, 0].clone())
            step_session.commit(torch.ones(2, dtype=torch.long))
    assert torch.equal(block, torch.stack(steps, dim=1))


def test_block_rows_get_their_own_gemv_programs_except_for_large_weights():
    """Layer projections re-read their weights from L2 per row; SmolLM2's 57 MB head is walked row by row."""
    from pipeline.ops.fused_decode import ROW_PROGRAMS_MAX_BYTES, _gemv_grid

    small = torch.empty(576, 576, dtype=torch.bfloat16, device="meta")
    head = torch.empty(49152, 576, dtype=torch.bfloat16, device="meta")
    assert head.numel() * 2 > ROW_PROGRAMS_MAX_BYTES >= small.numel() * 2
    assert _gemv_grid(5, 576, small, 8) == ((72, 5), 1)  # a row per program along grid axis 1
    assert _gemv_grid(1, 576, small, 8) == ((72, 1), 1)
    assert _gemv_grid(5, 49152, head, 8) == ((6144, 1), 5)  # one program walks all five rows


def test_gemv_settings_split_k_and_scale_warps_with_row_width():
    """SmolLM2's measured settings (one warp, K = 576 as 512 + 64; two rows per program from 900 rows
    up, one below); a power-of-two K is not split; wider rows (an 8B teacher's K = 14336) get more
    warps instead of spilling one warp's registers."""
    from pipeline.ops.fused_decode import _gemv_config

    def config(n, k):
        return _gemv_config(n, k, torch.empty(n, k, dtype=torch.bfloat16, device="meta"))

    assert config(1545, 576) == (2, 512, 64, 1)  # Mamba in_proj
    assert config(960, 576) == (2, 512, 64, 1)  # q/k/v
    assert config(576, 576) == (1, 512, 64, 1)  # o_proj / out_proj
    assert config(576, 1536) == (1, 1024, 512, 1)  # down_proj
    assert config(49152, 576) == (8, 512, 64, 4)  # the head: large weights, 8 rows per program
    assert config(64, 1024) == (1, 1024, 0, 1)
    assert config(4096, 14336)[2:] == (0, 8)  # 14336 = 8192 + 6144 would not save lanes
    assert config(1024, 4096)[3] == 2


def test_fused_bad_input(monkeypatch):
    """A non-SwiGLU MLP, CPU without the interpreter and torch.compile are refused at session creation."""
    with pytest.raises(PipelineError, match="gelu"):
        DecodeSession(hybrid(teacher(0, num_hidden_layers=2, hidden_act="gelu"), 0.5), 1, 16, kernels="fused")
    source = teacher(0, num_hidden_layers=2)
    model = hybrid(source, 0.5)
    with pytest.raises(PipelineError, match="compile"):
        DecodeSession(model, 1, 16, kernels="fused", compile_mode="default")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(PipelineError, match="CUDA"):
        DecodeSession(model, 1, 16, kernels="fused")
