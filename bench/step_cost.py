"""What one training step of a profile costs on this machine, per image, across widths and XLA.

    python bench/step_cost.py --profile default --widths 1,0.75,0.5 --xla off,on
    KERAS_BACKEND=jax python bench/step_cost.py --profile default --widths 1 --xla on

The profile's network (`network_width` overridden) and optimiser on one fixed random batch of its
batch size, in float32 (`lookahead_step.time_variant`): each variant compiles and warms up on 3 steps,
then `--steps` steps are timed and their mean is reported in milliseconds per training image. A
step's cost is what a narrower network or a compiler would save an epoch; the accuracy side needs
`bench/train_jax.py`.
"""

from __future__ import annotations

import argparse
import json

from lookahead_step import time_variant  # a neighbour in bench/; importing it puts the project on sys.path


def _floats(text: str) -> list[float]:
    return [float(item) for item in text.split(",")]


def _switches(text: str) -> list[str]:
    items = text.split(",")
    if set(items) - {"off", "on"}:
        raise argparse.ArgumentTypeError(f"{text!r}: each item must be off or on")
    return items


def main() -> None:
    import keras

    from model_lib.config import ConfigError, resolve_config
    from model_lib.precision import machine_key

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--widths", default=[1.0, 0.75, 0.5], type=_floats, help="comma-separated network_width values")
    parser.add_argument("--xla", default=["off"], type=_switches, help="comma-separated: off, on")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    try:
        batch_size = resolve_config(args.profile).batch_size
    except ConfigError as error:
        parser.error(str(error))
    for width in args.widths:
        for xla in args.xla:
            seconds = time_variant("optimiser", args.steps, "float32", args.profile, width, xla == "on")
            cost = 1000 * seconds / batch_size
            print(json.dumps({"backend": keras.backend.backend(), "host": machine_key(),
                              "profile": args.profile, "width": width, "xla": xla,
                              "ms_per_image": round(cost, 3)}), flush=True)  # fmt: skip
            keras.backend.clear_session()


if __name__ == "__main__":
    main()
