"""What one training step of a profile costs on this machine, per image, across widths and XLA.

    python bench/step_cost.py --profile muon --widths 1,0.75,0.5 --xla off,on
    KERAS_BACKEND=jax python bench/step_cost.py --profile muon --widths 1 --xla on

The profile's airbench network (`network_width` overridden) and optimiser on one fixed random batch of
its batch size, in float32: each variant compiles and warms up on 3 steps, then `--steps` steps are
timed one by one and the median is reported in milliseconds per training image. A step's cost is what
a narrower network or a compiler would save an epoch; the accuracy side needs `bench/train_jax.py`.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from lookahead_step import WARM_UP_STEPS  # a neighbour in bench/; importing it puts the project on sys.path


def ms_per_image(profile: str, width: float, xla: bool, steps: int) -> float:
    """Median milliseconds per training image of `steps` steps of `profile` at `width`."""
    import keras

    from model_lib.config import resolve_config
    from model_lib.models import build_model
    from model_lib.recipe import make_optimizer

    config = resolve_config(profile)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (config.batch_size, 32, 32, 3)).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, config.batch_size)]
    keras.utils.set_random_seed(0)
    model = build_model(config.architecture, 10, 32, "float32", images.astype(np.uint8), width=width)
    optimizer = make_optimizer(config, 100 * (WARM_UP_STEPS + steps), model, "float32")
    model.compile(optimizer=optimizer, loss="categorical_crossentropy", jit_compile=xla)
    seconds: list[float] = []

    class Clock(keras.callbacks.Callback):  # not async-safe, so Keras runs it in line with each step
        def on_train_batch_begin(self, batch, logs=None):
            self.started = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            seconds.append(time.perf_counter() - self.started)

    x, y = np.repeat(images, WARM_UP_STEPS + steps, axis=0), np.repeat(labels, WARM_UP_STEPS + steps, axis=0)
    model.fit(x, y, batch_size=config.batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[Clock()])
    return 1000 * float(np.median(seconds[WARM_UP_STEPS:])) / config.batch_size


def main() -> None:
    import keras

    from model_lib.precision import machine_key

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="muon")
    parser.add_argument("--widths", default="1,0.75,0.5", help="comma-separated network_width values")
    parser.add_argument("--xla", default="off", help="comma-separated: off, on")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    for width in (float(text) for text in args.widths.split(",")):
        for xla in args.xla.split(","):
            cost = ms_per_image(args.profile, width, {"on": True, "off": False}[xla], args.steps)
            print(json.dumps({"backend": keras.backend.backend(), "host": machine_key(),
                              "profile": args.profile, "width": width, "xla": xla,
                              "ms_per_image": round(cost, 3)}), flush=True)  # fmt: skip
            keras.backend.clear_session()


if __name__ == "__main__":
    main()
