"""Wall time of `archscope plugins` with every workspace package installed (target < 0.4 s).

Each run is a fresh interpreter, as a user at a shell would see it.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import describe

RUNS = 15


def main() -> None:
    command = [sys.executable, "-m", "archscope", "plugins"]
    subprocess.run(command, check=True, capture_output=True)  # warm the file cache
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    baseline = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        baseline.append(time.perf_counter() - start)
    median = statistics.median(times)
    lines = [
        "# `archscope plugins` wall time",
        "",
        f"Machine: {describe()}.",
        "",
        "| what | median (s) | min (s) | max (s) | runs |",
        "|---|---|---|---|---|",
        f"| `python -m archscope plugins` | {median:.3f} | {min(times):.3f} | {max(times):.3f} | {RUNS} |",
        f"| `python -c pass` (interpreter start) | {statistics.median(baseline):.3f} | "
        f"{min(baseline):.3f} | {max(baseline):.3f} | {RUNS} |",
        "",
        f"Target: under 0.4 s. {'Met' if median < 0.4 else 'NOT met'}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    (Path(__file__).parent / "results" / "plugins.md").write_text(text)


if __name__ == "__main__":
    main()
