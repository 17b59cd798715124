"""What a pruned airbench's conv widths cost beyond their FLOPs: networks of given widths timed side by side, as the
Keras engine serves them (model_lib.prune.images_per_second), untrained (speed does not depend on the weights).

    python bench/prune_widths.py --widths 16,64 18,70 16,72 18,64 --rounds 2
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", nargs="+", default=["16,64", "18,70", "16,72", "18,64"],
                        help="first two convs' channels, then the other four's, as A,B")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2, help="side-by-side timings of every network")
    args = parser.parse_args()

    from model_lib.models import build_model
    from model_lib.prune import images_per_second

    images = np.random.default_rng(0).integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8)
    models = {}
    for pair in args.widths:
        first, rest = (int(value) for value in pair.split(","))
        models[pair] = build_model("airbench", 10, 32, channels=(first, first, rest, rest, rest, rest))
    for round_number in range(args.rounds):
        speed = images_per_second(models, images)
        print(f"round {round_number + 1}: " + ", ".join(f"{name} {value:,.0f}" for name, value in speed.items()))


if __name__ == "__main__":
    main()
