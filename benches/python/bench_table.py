"""The Python side of scripts/bench: admit + commit through the `aex` package.

For each durability and thread count, threads (each with its own agent) share one kernel on a
fresh database file; prints one JSON row per case, like the Rust harness. The kernel releases the
GIL while it works, so threads overlap everything but the Python around each call.
Run after ``pip install .``:  python benches/python/bench_table.py [SCALE]
"""

import json
import os
import sys
import tempfile
import threading
import time

import aex

MODELS = "models:\n  gpt-4o-mini: {input_price: 0.15, output_price: 0.60, max_output_tokens: 16384}\n"


def run(durability: str, threads: int, calls: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        k = aex.Kernel(os.path.join(tmp, "bench.db"), durability=durability, config_yaml=MODELS)
        tokens = [k.create_agent(f"py{i}", "1000000000") for i in range(threads)]
        per_thread = calls // threads
        micros: list[float] = []
        lock = threading.Lock()
        start_line = threading.Barrier(threads + 1)

        def worker(token: str) -> None:
            mine = []
            a = k.admit(token, "gpt-4o-mini", input_tokens=1200, max_output_tokens=256)
            k.commit_tokens(a["execution_id"], 1200, 180)
            start_line.wait()
            for _ in range(per_thread):
                t = time.perf_counter_ns()
                a = k.admit(token, "gpt-4o-mini", input_tokens=1200, max_output_tokens=256)
                k.commit_tokens(a["execution_id"], 1200, 180)
                mine.append((time.perf_counter_ns() - t) / 1e3)
            with lock:
                micros.extend(mine)

        workers = [threading.Thread(target=worker, args=(t,)) for t in tokens]
        for w in workers:
            w.start()
        start_line.wait()
        start = time.perf_counter()
        for w in workers:
            w.join()
        wall = time.perf_counter() - start
    micros.sort()
    pick = lambda q: round(micros[round((len(micros) - 1) * q)], 1)  # noqa: E731
    return {
        "surface": "python", "case": "admit+commit", "durability": durability, "threads": threads,
        "processes": 1, "calls": len(micros), "p50_us": pick(0.5), "p99_us": pick(0.99),
        "ops_per_s": round(len(micros) / wall),
    }


def main() -> None:
    scale = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    for durability in ("full", "normal", "memory"):
        calls = max(50, int((1500 if durability == "full" else 6000) * scale))
        for threads in (1, 2, 8):
            print(json.dumps(run(durability, threads, calls)), flush=True)


if __name__ == "__main__":
    main()
