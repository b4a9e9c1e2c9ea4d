"""The CPU side of the GPU profiling scripts: reading an Nsight Compute source-page CSV.

``benchmarks/attention_ncu.py table`` turns ``ncu --page source --csv --print-source sass`` output
into stall totals by reason and the instructions with the most samples. The CSV has a preamble
before its header and numbers with thousands separators; a wrong column pick or a dropped row would
print plausible but wrong tables, which is what these tests pin down.
"""

from __future__ import annotations

import pytest

from benchmarks.attention_ncu import _number, table

HEADER = '"Address","Source","Warp Stall Sampling (All Samples)","stall_long_sb","stall_barrier","Instructions Executed"'
ROWS = [
    '"0x7f00","LDG.E.128 R4, [R2.64]","1,200","1,100","20","64"',
    '"0x7f10","BAR.SYNC.DEFER_BLOCKING 0x0","300","0","290","64"',
    '"0x7f20","HMMA.16816.F32.BF16 R8, R12, R16, R8","45","5","0","128"',
    '"0x7f30","EXIT","n/a","","","64"',
]


def write_csv(tmp_path, rows):
    """An ncu CSV as the tool writes it: a log line before the header."""
    path = tmp_path / "attn.csv"
    path.write_text("\n".join(["==PROF== Connected to process 1", HEADER, *rows]) + "\n")
    return str(path)


def test_number_reads_separators_and_blanks():
    assert _number("1,200") == 1200.0
    assert _number("3.5") == 3.5
    assert _number("") == 0.0
    assert _number("n/a") == 0.0


def test_table_sums_stall_reasons_and_ranks_instructions(tmp_path, capsys):
    table(write_csv(tmp_path, ROWS), top=2)
    out = capsys.readouterr().out
    assert "4 SASS instructions, 1545 stall samples" in out
    reasons = [line.split() for line in out.splitlines() if line.strip().startswith("stall_")]
    assert reasons == [["stall_long_sb", "1105"], ["stall_barrier", "310"]]  # most samples first
    ranked = out.split("top 2 instructions by samples:")[1].strip().splitlines()
    assert len(ranked) == 2
    assert ranked[0].split()[0] == "1200" and "LDG.E.128" in ranked[0] and "stall_long_sb=1100" in ranked[0]
    assert ranked[1].split()[0] == "300" and "BAR.SYNC" in ranked[1] and "stall_barrier=290" in ranked[1]


def test_table_without_rows_says_which_file(tmp_path):
    path = write_csv(tmp_path, [])
    with pytest.raises(SystemExit, match="attn.csv: no rows after the header"):
        table(path, top=5)
