"""Plain and speculative generation for the hybrids and their teachers, on a static cache with CUDA graphs.

* :mod:`~pipeline.decoding.speculative` — ``generate`` / ``speculative_generate`` (and the reusable
  ``PlainDecoder`` / ``SpeculativeDecoder``), ``Sampling``, ``check_draft``;
* :mod:`~pipeline.decoding.graphs` — ``DecodeSession``: prefill, blocks, commit, snapshot; CUDA graphs;
* :mod:`~pipeline.decoding.step` — the one step function (eager or captured);
* :mod:`~pipeline.decoding.static_cache` / :mod:`~pipeline.decoding.replay` — per-row lengths and the
  lazy Mamba rollback (replay of accepted steps), reference kernels;
* :mod:`~pipeline.decoding.draft` — the default draft (teacher layers, briefly distilled);
* :mod:`~pipeline.decoding.speed` — the measurements behind the ``speed`` stage.
"""
