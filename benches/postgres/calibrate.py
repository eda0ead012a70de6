"""The floor of the fleet store on this machine: pgbench (PostgreSQL's own C client, libpq)
sending the statements of one admit + commit exactly as the store pipelines them
(calibration.sql), on a database aex made, from 1 and 8 clients. Prints one JSON row per run,
in the benchmark table's format.

    python benches/postgres/calibrate.py ADMIN_URL [SCALE]
"""

import glob
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import aex

HERE = Path(__file__).resolve().parent


def tool(name: str) -> str:
    return sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1]


def percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[round((len(ordered) - 1) * q)]


def main() -> None:
    admin = sys.argv[1]
    scale = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    seconds = max(2, round(5 * scale))
    name = f"aex_calibration_{uuid.uuid4().hex}"
    subprocess.run([tool("psql"), admin, "-qc", f"CREATE DATABASE {name}"], check=True)
    db = admin.rsplit("/", 1)[0] + "/" + name
    k = aex.Kernel(db)
    for i in range(8):
        k.create_agent(f"calibration-{i}", "1000")
    del k
    for clients in (1, 8):
        with tempfile.TemporaryDirectory() as logs:
            run = subprocess.run(
                [tool("pgbench"), "-n", "-M", "prepared", "-f", str(HERE / "calibration.sql"), "-T", str(seconds),
                 "-c", str(clients), "-j", str(clients), "--log", f"--log-prefix={logs}/tx", db],
                capture_output=True, text=True,
            )
            if run.returncode != 0:
                sys.exit(f"pgbench failed: {run.stderr}")
            # Each line: client, transaction, latency in µs, script, epoch s, µs.
            latencies, first, last = [], None, None
            for path in glob.glob(f"{logs}/tx*"):
                for line in open(path):
                    fields = line.split()
                    latencies.append(float(fields[2]))
                    end = int(fields[4]) * 1_000_000 + int(fields[5])
                    first = end - float(fields[2]) if first is None else min(first, end - float(fields[2]))
                    last = end if last is None else max(last, end)
        print(json.dumps({
            "surface": "pgbench (libpq, C)",
            "case": "the store's statements for admit+commit, pipelined alike (calibration)",
            "durability": "server",
            "threads": clients,
            "processes": 1,
            "calls": len(latencies),
            "p50_us": round(percentile(latencies, 0.5), 1),
            "p99_us": round(percentile(latencies, 0.99), 1),
            "ops_per_s": round(len(latencies) / ((last - first) / 1e6)),
        }), flush=True)


if __name__ == "__main__":
    main()
