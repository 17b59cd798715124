"""bf16 against float32 for the `airbench94` profile's training step on this CPU, in alternation.

    python bench/precision_step.py --steps 20 --repeats 3

`precision=auto` goes by a small probe, measured once per machine and cached
(`model_lib/precision.py`). This times the real step beside a fresh probe: the default network and
optimiser (lookahead inside it) on a fixed batch of its batch size, each precision warmed up on 3
steps, then `--steps` steps timed, `--repeats` times in turn.
"""

from __future__ import annotations

import argparse
import json
import platform

from lookahead_step import time_variant  # a neighbour in bench/; importing it puts the project on sys.path


def main() -> None:
    import keras

    from model_lib.precision import cached_bf16_speedup, devices, machine_key, measure_bf16_speedup

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    _, device, _ = devices()
    results: dict[str, list[float]] = {"float32": [], "mixed_bfloat16": []}
    for _ in range(args.repeats):
        for precision in results:
            results[precision].append(round(time_variant("optimiser", args.steps, precision), 4))
            keras.backend.clear_session()
    print(json.dumps({
        "backend": keras.backend.backend(), "device": device, "host": machine_key(), "cpu": platform.processor(),
        "steps": args.steps, "seconds_per_step": results, "probe_now": round(measure_bf16_speedup(), 3),
        "probe_cached": round(cached_bf16_speedup(), 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
