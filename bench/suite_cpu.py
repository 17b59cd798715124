"""Where the test suite spends its CPU: the per-test report `CIFAR_PIPELINE_TEST_CPU` makes, summed and ranked.

    CIFAR_PIPELINE_TEST_CPU=/tmp/suite-cpu.jsonl make test
    python bench/suite_cpu.py /tmp/suite-cpu.jsonl --top 25

On 2 cores the suite is CPU-bound (its wall time is about its CPU seconds over the cores), so a test's CPU, its
own process's and its commands', is what it costs the suite. Servers that outlive a test (each worker's Prefect
server) are not in any test's figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="the file CIFAR_PIPELINE_TEST_CPU named")
    parser.add_argument("--top", type=int, default=25, help="tests listed, most CPU first")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.report.read_text().splitlines() if line.strip()]
    for row in rows:
        row["cpu"] = row["own"] + row["children"]
    total = sum(row["cpu"] for row in rows)
    rows.sort(key=lambda row: -row["cpu"])
    print(
        f"{len(rows)} tests, {total:.0f} CPU s in all ({sum(r['own'] for r in rows):.0f} s in the test processes, "
        f"{sum(r['children'] for r in rows):.0f} s in the commands they ran)"
    )
    print(f"{'CPU s':>7} {'share':>6} {'own':>6} {'cmds':>6} {'wall':>6}  test")
    for row in rows[: args.top]:
        print(
            f"{row['cpu']:7.1f} {row['cpu'] / total:6.1%} {row['own']:6.1f} {row['children']:6.1f} "
            f"{row['wall']:6.1f}  {row['test']}"
        )


if __name__ == "__main__":
    main()
