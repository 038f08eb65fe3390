"""Side-by-side benchmarks of darwin-metrics against the alternatives a user would pick instead.

Run ``python -m benchmarks`` (a few minutes) or ``python -m benchmarks --quick`` (seconds);
``--backend asyncio|trio|all`` picks the event loops, ``--json PATH`` writes every sample.
The anchors (cachetools, theine) come with the ``bench`` extra:
``pip install -e ".[bench,trio]"``.

Each row is our figure, the anchor's figure from the same run, and their ratio. Absolute
times drift on a shared machine; ratios measured in one run, interleaved, hold. See
``benchmarks/RESULTS.md`` for the latest full run and the goals.
"""
