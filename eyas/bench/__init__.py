"""`eyas bench`: closed-loop throughput of no-spec vs EAGLE-3 modes over a concurrency sweep.

Python API::

    from eyas.config import EngineConfig
    from eyas.bench import BenchConfig, run_bench

    records = run_bench(EngineConfig(model="smollm2-135m-instruct", draft="..."),
                        BenchConfig(concurrency=(1, 4), input_len=128, output_len=128),
                        out_dir="bench/results/mine")

Each record is a dict with mode, concurrency, output_tok_s, speedup_vs_nospec, steady_tok_s,
steady_speedup_vs_nospec, accept_len, tpot_ms, ttft_ms, num_prompts, input_len, output_len, wall_s
(see eyas/bench/metrics.py).
"""
from eyas.bench.settings import MODES, PEERS, BenchConfig
from eyas.bench.suite import run_bench

__all__ = ["BenchConfig", "MODES", "PEERS", "run_bench"]
