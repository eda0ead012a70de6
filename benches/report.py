"""Joins the harnesses' JSON rows into one results file and prints the table.

    python3 benches/report.py ROWS.jsonl RESULTS.json

The results file holds the machine, the command and every row; the table is Markdown, so the
README can show it as printed.
"""

import json
import os
import platform
import subprocess
import sys
import time


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rustc() -> str:
    try:
        return subprocess.run(["rustc", "-V"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    rows_path, results_path = sys.argv[1], sys.argv[2]
    with open(rows_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    machine = {
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "os": f"{platform.system()} {platform.release()}",
        "rustc": rustc(),
        "python": platform.python_version(),
    }
    results = {
        "command": "scripts/bench",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": machine,
        "scale": float(os.environ.get("AEX_BENCH_SCALE", "1")),
        "rows": rows,
    }
    with open(results_path, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")

    print(f"{machine['cpus']} CPUs ({machine['cpu']}), {machine['os']}, {machine['rustc']}, Python {machine['python']}")
    print()
    print("| surface | case | durability | threads | processes | p50 µs | p99 µs | executions/s | writes/tx |")
    print("|---|---|---|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        batching = r.get("writes_per_transaction")
        print(
            f"| {r['surface']} | {r['case']} | {r['durability']} | {r['threads']} | {r['processes']} "
            f"| {r['p50_us']:,.0f} | {r['p99_us']:,.0f} | {r['ops_per_s']:,.0f} "
            f"| {'' if batching is None else f'{batching:.1f}'} |"
        )
    print()
    print(f"All rows: {results_path}")


if __name__ == "__main__":
    main()
