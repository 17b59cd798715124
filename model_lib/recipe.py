"""The optimisation recipe: learning-rate schedule, optimiser with boosted bias steps, lookahead.

These follow airbench94 (Keller Jordan's CIFAR-10 speed runs), translated to Keras conventions:
the loss is a batch mean (airbench sums it, so its learning rate is per example), and weight
decay is Keras' decoupled form (airbench's is coupled and amplified by momentum). The defaults in
`TrainConfig` are airbench's values converted that way.
"""

from __future__ import annotations

import numpy as np

from model_lib.config import TrainConfig


def learning_rate_schedule(config: TrainConfig, total_steps: int):
    """The configured learning rate: a float, or a schedule over optimiser steps.

    `warmup_linear` rises linearly from `lr_start_fraction` of the peak to the peak over the first
    `warmup_fraction` of all steps, then falls linearly to `lr_end_fraction` of the peak at the last.
    """
    import keras

    if config.lr_schedule == "constant":
        return config.learning_rate
    if config.lr_schedule != "warmup_linear":
        raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}")
    total = max(2, total_steps)
    warmup = min(total - 1, max(1, int(config.warmup_fraction * total)))
    peak, start, end = config.learning_rate, config.lr_start_fraction, config.lr_end_fraction

    class WarmupLinear(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            from keras import ops

            step = ops.minimum(ops.cast(step, "float32"), float(total))
            rising = start + (1 - start) * step / warmup
            falling = 1 + (end - 1) * (step - warmup) / (total - warmup)
            return peak * ops.where(step < warmup, rising, falling)

        def get_config(self):
            return {"peak": peak, "start": start, "end": end, "warmup_steps": warmup, "total_steps": total}

    return WarmupLinear()


def make_optimizer(config: TrainConfig, total_steps: int, model=None, precision: str = "float32"):
    """The optimiser named by the config, with its learning-rate schedule.

    For SGD, the batch-norm offsets of `model` step `bias_lr_scale` times faster than the other
    weights (airbench's bias scaler): with few epochs they must move far, and having no scale they
    cannot blow up the way a kernel would.

    Under `mixed_float16` the optimiser scales the loss dynamically, so small float16 gradients do
    not flush to zero. Keras does that by itself only for a model whose own policy is
    mixed_float16; ours set the policy per layer, so it is done here.
    """
    import keras

    optimizer = _base_optimizer(config, total_steps, model)
    return keras.optimizers.LossScaleOptimizer(optimizer) if precision == "mixed_float16" else optimizer


def _base_optimizer(config: TrainConfig, total_steps: int, model):
    import keras

    learning_rate = learning_rate_schedule(config, total_steps)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate)
    if config.optimizer != "sgd":
        raise ValueError(f"unknown optimizer {config.optimizer!r}")
    boosted = []
    if model is not None and config.bias_lr_scale != 1:
        norms = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
        boosted = [layer.beta for layer in norms if layer.center]

    class BiasBoostedSGD(keras.optimizers.SGD):
        def build(self, variables):
            super().build(variables)
            # Frozen layers' offsets (a transfer backbone's batch norm) are not this optimiser's to step.
            keys = {self._var_key(variable) for variable in variables}
            self._boosted = {self._get_variable_index(v) for v in boosted if self._var_key(v) in keys}

        def update_step(self, gradient, variable, learning_rate):
            if self._get_variable_index(variable) in self._boosted:
                learning_rate = learning_rate * config.bias_lr_scale
            super().update_step(gradient, variable, learning_rate)

    weight_decay = config.weight_decay or None
    return BiasBoostedSGD(learning_rate, momentum=config.momentum, nesterov=True, weight_decay=weight_decay)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def lookahead_callback(every: int, final_decay: float, total_steps: int):
    """airbench's lookahead: every `every` steps, blend the weights into a slow copy and restart there.

    The slow copy keeps `decay` of itself, `decay` rising as the cube of progress to `final_decay`,
    so early training runs free and the last epochs average out the noise of a high learning rate.
    At the end the model takes the slow weights. A resumed run restarts the slow copy from the
    restored weights.
    """
    import keras

    class Lookahead(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.variables = [v for v in self.model.weights if "float" in str(v.dtype)]
            self.slow = [np.array(v.numpy()) for v in self.variables]

        def on_train_batch_end(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            if step % every == 0:
                decay = final_decay * min(1.0, step / total_steps) ** 3
                self._blend(decay)

        def on_train_end(self, logs=None):
            self._blend(1.0)

        def _blend(self, decay: float) -> None:
            for slow, variable in zip(self.slow, self.variables, strict=True):
                slow += (1 - decay) * (variable.numpy() - slow)
                variable.assign(slow)

    return Lookahead()
