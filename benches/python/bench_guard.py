"""What Python adds to a guarded call.

Interleaves, on one in-memory kernel in one process, rounds of the same admit + commit made
(a) from Rust with the GIL released (``Kernel._bench_native``), (b) through the plain Python
calls, and (c) through ``with kernel.guard(...)``; prints the median per call of each and the
differences. Run after ``pip install .``:  python benches/python/bench_guard.py
"""

import statistics
import time

import aex

ROUNDS = 40
CALLS = 250
MODELS = "models:\n  mini: {input_price: 0.15, output_price: 0.60}\n"


def main() -> None:
    k = aex.Kernel(":memory:", config_yaml=MODELS)
    token = k.create_agent("bench", "1000000")
    rust, single, plain, guarded = [], [], [], []
    for _ in range(ROUNDS):
        rust.append(k._bench_native(token, "mini", CALLS) / CALLS)

        start = time.perf_counter()
        for _ in range(CALLS):
            k._bench_native(token, "mini", 1)
        single.append((time.perf_counter() - start) / CALLS)

        start = time.perf_counter()
        for _ in range(CALLS):
            a = k.admit(token, "mini", input_tokens=1200, max_output_tokens=256)
            k.commit_tokens(a["execution_id"], 1200, 180)
        plain.append((time.perf_counter() - start) / CALLS)

        start = time.perf_counter()
        for _ in range(CALLS):
            with k.guard(token, "mini", input_tokens=1200, max_output_tokens=256) as call:
                call.commit(input_tokens=1200, output_tokens=180)
        guarded.append((time.perf_counter() - start) / CALLS)

    us = lambda xs: statistics.median(xs) * 1e6  # noqa: E731
    r, s, p, g = us(rust), us(single), us(plain), us(guarded)
    print(f"admit + commit, in-memory store, median of {ROUNDS} rounds x {CALLS} calls (microseconds)")
    print(f"  Rust, a tight loop of {CALLS}      {r:8.2f}")
    print(f"  Rust, one call per Python call {s:8.2f}")
    print(f"  Python plain calls             {p:8.2f}   (+{p - s:.2f} over Rust called the same way)")
    print(f"  Python `with guard(...)`       {g:8.2f}   (+{g - s:.2f} over Rust called the same way)")


if __name__ == "__main__":
    main()
