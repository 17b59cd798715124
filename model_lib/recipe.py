"""The optimisation recipe: learning-rate schedule, optimiser with boosted bias steps, lookahead, Muon.

These follow airbench94 (Keller Jordan's CIFAR-10 speed runs), translated to Keras conventions:
the loss is a batch mean (airbench sums it, so its learning rate is per example), and weight
decay is Keras' decoupled form (airbench's is coupled and amplified by momentum). The defaults in
`TrainConfig` are airbench's values converted that way, and the `default` profile's (Muon on the
convolution kernels) are airbench94_muon's.
"""

from __future__ import annotations

from model_lib.config import CHOICES, TrainConfig


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
    if config.optimizer not in CHOICES["optimizer"]:
        raise ValueError(f"unknown optimizer {config.optimizer!r}")

    def with_recipe(optimizer_class: type) -> type:
        if not config.lookahead_every:
            return optimizer_class
        return with_lookahead(optimizer_class, config.lookahead_every, config.lookahead_decay, total_steps)

    if config.optimizer == "adam":
        return with_recipe(keras.optimizers.Adam)(learning_rate)
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
    base = BiasBoostedSGD
    if config.optimizer == "muon":
        base = with_muon(base, config.muon_learning_rate / config.learning_rate, config.muon_momentum)
    sgd = with_recipe(base)
    return sgd(learning_rate, momentum=config.momentum, nesterov=True, weight_decay=weight_decay)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def with_lookahead(optimizer_class: type, every: int, final_decay: float, total_steps: int) -> type:
    """`optimizer_class` with airbench's lookahead inside its update step, on every Keras backend.

    Every `every` steps the trainable weights are blended into a slow copy, which keeps `decay` of
    itself (`decay` rising as the cube of progress to `final_decay`), and training restarts from
    the slow copy; when `fit` ends the model takes the slow weights. Early training runs free and
    the last epochs average out the noise of a high learning rate.

    It runs in the compiled train step: a callback that read the weights back to the host every
    step cost a third of each epoch on a GPU. The slow copy lives in Keras' EMA slots, so it is
    built per trainable variable, saved with the optimiser in checkpoints (a resumed run keeps
    it) and copied into the model by `finalize_variable_values` at the end of `fit`. Unlike
    airbench, batch norm's moving statistics are not blended: they are not the optimiser's, and
    with momentum 0.4 they follow the weights within a few steps.
    """
    from keras import ops

    class Lookahead(optimizer_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, use_ema=True, ema_overwrite_frequency=None, **kwargs)

        def _update_model_variables_moving_average(self, trainable_variables):
            step = self.iterations + 1  # the counter moves after the update: this is the step just taken
            blend = ops.equal(step % every, 0)
            # As Keras' EMA does, the slow copy starts at the weights after the first step (build runs
            # inside the traced step on TensorFlow, where it cannot copy the initial values). In the
            # default recipe the first blend keeps under 1e-6 of it.
            first = ops.equal(self.iterations, 0)
            progress = ops.minimum(ops.cast(step, "float32") / float(total_steps), 1.0)
            keep = final_decay * progress**3
            for variable, slow in zip(trainable_variables, self._model_variables_moving_average, strict=True):
                if slow is None:
                    continue
                fast, old = ops.convert_to_tensor(variable), ops.convert_to_tensor(slow)
                blended = old + (1 - ops.cast(keep, old.dtype)) * (fast - old)
                new_slow = ops.where(first, fast, ops.where(blend, blended, old))
                slow.assign(new_slow)
                variable.assign(ops.where(blend, new_slow, fast))

    Lookahead.__name__ = f"Lookahead{optimizer_class.__name__}"
    return Lookahead


def with_muon(optimizer_class: type, lr_ratio: float, momentum: float) -> type:
    """`optimizer_class` with Muon (airbench94_muon) stepping the conv kernels; other weights keep its steps.

    Each step a conv kernel is first rescaled to unit mean-square filter norm, then moves by
    `lr_ratio` times the scheduled rate along its Nesterov momentum made orthogonal: every
    singular value of the (inputs x filters) update set near 1 by a Newton-Schulz iteration. The
    step size no longer depends on the gradient's scale, so every filter learns at the same pace,
    which lets airbench94_muon reach airbench94's accuracy in 8 epochs instead of 10. Weight decay
    on a kernel does nothing here: the rescaling undoes it, and batch norm follows every conv.
    """
    from keras import ops

    class Muon(optimizer_class):
        def update_step(self, gradient, variable, learning_rate):
            if len(variable.shape) != 4:
                return super().update_step(gradient, variable, learning_rate)
            buffer = self.momentums[self._get_variable_index(variable)]
            gradient = ops.cast(gradient, variable.dtype)
            buffer.assign(momentum * buffer + gradient)
            direction = gradient + momentum * buffer  # Nesterov
            filters = variable.shape[-1]
            kernel = ops.convert_to_tensor(variable)
            kernel = kernel * (filters**0.5 / ops.sqrt(ops.sum(ops.square(kernel))))
            update = ops.reshape(orthogonalise(ops.reshape(direction, (-1, filters))), variable.shape)
            lr = ops.cast(learning_rate, variable.dtype) * lr_ratio
            variable.assign(kernel - lr * update)

    Muon.__name__ = f"Muon{optimizer_class.__name__}"
    return Muon


def orthogonalise(matrix, steps: int = 3):
    """Muon's quintic Newton-Schulz iteration: `matrix` with its singular values moved to about 0.5-1.5.

    The coefficients maximise the slope at zero, so three steps lift even tiny singular values
    (airbench94_muon); an exact orthogonalisation (`U V^T`) trains no better and costs an SVD.
    """
    from keras import ops

    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix / (ops.sqrt(ops.sum(ops.square(matrix))) + 1e-7)  # every singular value <= 1
    wide = matrix.shape[0] <= matrix.shape[1]
    if not wide:
        x = ops.transpose(x)
    for _ in range(steps):
        gram = ops.matmul(x, ops.transpose(x))
        x = a * x + ops.matmul(b * gram + c * ops.matmul(gram, gram), x)
    return x if wide else ops.transpose(x)
