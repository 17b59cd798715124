"""Batch inference on uint8 pixels: a Keras model (BatchNormalization folded away, one traced
function), a TFLite export through the LiteRT interpreter or an ONNX export through ONNX Runtime, behind one
interface.

At inference a BatchNormalization layer is a fixed per-channel map `y = s * x + o`, with
`s = gamma / sqrt(variance + epsilon)` and `o = beta - mean * s`. TensorFlow runs it as two passes
over the activations: a quarter of `seed_cnn`'s inference time on CPU, where batch prediction
shares the cores with decoding. Folded into the weights of the layers around it, it costs nothing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

FOLD_TOLERANCE = 1e-4  # largest probability difference accepted between the folded copy and the model
CHECK_IMAGES = 8  # random images both models classify before the copy is used
CASCADE_TOLERANCE = 0.002  # test accuracy a model served first view first may lose against every view (0.2 points)
_CARRIES_OFFSET = ("MaxPooling2D", "Dropout")  # max(a + o) = max(a) + o; dropout is the identity at inference


class _Classifier:
    """Keras' `predict` over a subclass's `predict_on_batch`; `output_shape` as Keras gives it."""

    output_shape: tuple
    compiles_per_shape = False  # True where every new batch shape compiles again (Keras on JAX)

    def predict(self, pixels: np.ndarray, batch_size: int = 256, verbose: int = 0) -> np.ndarray:
        """The model's output for any number of images, `batch_size` at a time."""
        outputs = [self.predict_on_batch(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, *self.output_shape[1:]), np.float32)

    def classify(self, pixels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """A batch's probabilities, and the features of its network's stages where the model reports them
        (`model_lib.ood.with_features`), else None."""
        return self.predict_on_batch(pixels), None

    def flagged(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """A batch's probabilities, and per image whether the model's feature rule finds it out of distribution
        (None here: a plain classifier has none; `model_lib.ood.FeatureClassifier` does)."""
        return self.predict_on_batch(pixels), None


class KerasClassifier(_Classifier):
    """A Keras model's inference on uint8 pixels as one function traced once for every batch size.

    Keras' `predict_on_batch` traces for the first batch size and again for the next; that second
    trace alone costs more than classifying a thousand CIFAR images. And Keras' `predict` took up to
    1.8x as long on a six-view (`default`) model's views of 3,000 CIFAR images on two cores, for the same
    outputs to the bit (bench/ARCHIVE.md, "Scoring through one traced function").

    Args:
        model: uint8 pixels in, whatever the model outputs.
        fold: Fold BatchNormalization into the layers around it first (`fold_batch_norms`); off where
            the outputs are compared with the saved model's (calibration and evaluation).
    """

    def __init__(self, model, fold: bool = True):
        import keras

        self.model = fold_batch_norms(model) if fold else model  # a model with features stays unfolded
        self.input_shape = model.input_shape
        self.output_shape = model.output_shape[0] if len(model.outputs) > 1 else model.output_shape
        self.compiles_per_shape = keras.backend.backend() != "tensorflow"
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            signature = tf.TensorSpec((None, *model.input_shape[1:]), tf.uint8, name="pixels")
            self._call = tf.function(lambda pixels: self.model(pixels, training=False), input_signature=[signature])
        else:  # JAX compiles once per batch shape
            self._call = self.model.predict_on_batch

    def predict_on_batch(self, pixels: np.ndarray) -> np.ndarray:
        """The model's output (its first, for a model with features) for a batch of uint8 pixels."""
        return self.classify(pixels)[0]

    def classify(self, pixels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray] | None]:
        outputs = self._call(pixels)
        if isinstance(outputs, (list, tuple)):
            return np.asarray(outputs[0]), [np.asarray(output) for output in outputs[1:]]
        return np.asarray(outputs), None


def fold_batch_norms(model):
    """The model with its BatchNormalization layers folded away, or `model` itself where that is not exact.

    Folding applies to a model that is a plain chain of layers:
    - after a Conv2D or Dense with a linear activation, `s` and `o` go into its kernel and bias;
    - after one with a ReLU, `s` goes into its kernel and bias when every `s > 0`
      (`relu(s * z) = s * relu(z)`), and `o` is carried through max pooling, dropout and flatten
      into the bias of the next Dense or 'valid' Conv2D ('same' padding would pad with zeros
      that were never shifted).

    Anything else (branches, another layer in between, a negative scale) leaves the model as it
    is. The copy must classify random pixels like the original within `FOLD_TOLERANCE`, or the
    original is returned.
    """
    plan = _fold_plan(model)
    if plan is None:
        return model
    import keras

    x = inputs = keras.Input(model.input_shape[1:], dtype=model.inputs[0].dtype, name=model.inputs[0].name)
    built = []
    for layer_class, config, _ in plan:
        built.append(layer_class.from_config(config))
        x = built[-1](x)
    folded = keras.Model(inputs, x, name=model.name)
    for layer, (_, _, weights) in zip(built, plan, strict=True):
        layer.set_weights(weights)
    pixels = np.random.default_rng(0).integers(0, 256, (CHECK_IMAGES, *model.input_shape[1:])).astype(np.float32)
    # Eager calls, not predict(): tracing both models would cost more than folding saves on a small folder.
    difference = np.abs(np.asarray(folded(pixels, training=False)) - np.asarray(model(pixels, training=False)))
    return folded if difference.max() <= FOLD_TOLERANCE else model


def _chain(model) -> list | None:
    """The model's layers in order if each one takes the previous one's output, else None."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        return None
    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    previous = model.inputs[0]
    for layer in layers:
        try:
            if layer.input is not previous:
                return None
        except (AttributeError, ValueError):  # a layer called more than once has no single input
            return None
        previous = layer.output
    return layers if previous is model.outputs[0] else None


def _fold_plan(model) -> list[tuple[type, dict, list[np.ndarray]]] | None:
    """`(layer class, config, weights)` for each layer of the folded copy; None if nothing folds exactly."""
    layers = _chain(model)
    if layers is None or not any(type(layer).__name__ == "BatchNormalization" for layer in layers):
        return None
    plan: list[tuple[type, dict, list[np.ndarray]]] = []
    offset = None  # a BatchNormalization offset not yet absorbed by a bias
    for layer in layers:
        kind, config, weights = type(layer).__name__, layer.get_config(), layer.get_weights()
        if kind == "BatchNormalization":
            if offset is not None or not plan or layer.axis not in (-1, len(layer.input.shape) - 1):
                return None
            scale, shift = _affine(layer)
            previous_class, previous_config, previous_weights = plan[-1]
            linear = _kernel_and_bias(previous_class.__name__, previous_config, previous_weights)
            if linear is None:
                return None
            kernel, bias = linear
            if previous_config["activation"] == "linear":
                bias = bias * scale + shift
            elif previous_config["activation"] == "relu" and (scale > 0).all():
                bias, offset = bias * scale, shift
            else:
                return None
            plan[-1] = (previous_class, {**previous_config, "use_bias": True}, [kernel * scale, bias])
            continue
        if offset is not None:
            if kind == "Flatten" and config.get("data_format", "channels_last") == "channels_last":
                offset = np.tile(offset, int(np.prod(layer.input.shape[1:-1])))
            elif kind not in _CARRIES_OFFSET:
                linear = _kernel_and_bias(kind, config, weights)
                if linear is None or config.get("padding", "valid") != "valid":
                    return None
                kernel, bias = linear
                # Each output sums kernel * (input + offset): the offset's share is a constant per output.
                bias = bias + (kernel * offset[:, None]).sum(axis=tuple(range(kernel.ndim - 1)))
                config, weights, offset = {**config, "use_bias": True}, [kernel, bias], None
        plan.append((type(layer), config, weights))
    return plan if offset is None else None


def _affine(layer) -> tuple[np.ndarray, np.ndarray]:
    """A BatchNormalization layer's inference map as `(s, o)`: `y = s * x + o`."""
    mean, variance = np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)
    gamma = np.asarray(layer.gamma) if layer.scale else np.ones_like(mean)
    beta = np.asarray(layer.beta) if layer.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(variance + layer.epsilon)
    return scale, beta - mean * scale


def _kernel_and_bias(kind: str, config: dict, weights: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """A plain Conv2D's or Dense's kernel and bias (zeros without one); None for any other layer."""
    if kind not in ("Conv2D", "Dense") or len(weights) not in (1, 2) or config.get("groups", 1) != 1:
        return None
    if config.get("data_format", "channels_last") != "channels_last":
        return None
    kernel = weights[0]
    bias = weights[1] if len(weights) == 2 else np.zeros(kernel.shape[-1], kernel.dtype)
    return kernel, bias


class _ExportClassifier(_Classifier):
    """An export's engine: `_run` gives every output of a batch, the probabilities first, then any features."""

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        return self._run(images)[0]

    def classify(self, pixels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray] | None]:
        probabilities, *features = self._run(pixels)
        return probabilities, features or None


class TFLiteClassifier(_ExportClassifier):
    """A `.tflite` classifier with Keras' `predict` interface: uint8 or float pixels in, probabilities out, and
    the features of its further outputs where it was exported with them (`model_lib.export`)."""

    def __init__(self, path: str | Path):
        from ai_edge_litert.interpreter import Interpreter

        # One thread by default; every core ran the default model's int8 export 1.8x faster on 2 cores.
        self._interpreter = Interpreter(model_path=str(path), num_threads=_cores())
        self._input = self._interpreter.get_input_details()[0]
        self._outputs = signature_outputs(self._interpreter)
        self.input_shape = (None, *self._input["shape"][1:])
        self.output_shape = (None, *self._outputs[0]["shape"][1:])
        self.input_dtype = np.dtype(self._input["dtype"])
        self._lock = threading.Lock()  # one interpreter, one invocation at a time
        self._batch = None

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        kind = self._input["dtype"]
        values = np.clip(np.rint(batch), 0, 255) if np.issubdtype(kind, np.integer) else batch
        with self._lock:
            if self._batch != len(batch):
                self._interpreter.resize_tensor_input(self._input["index"], [len(batch), *self._input["shape"][1:]])
                self._interpreter.allocate_tensors()
                self._batch = len(batch)
            self._interpreter.set_tensor(self._input["index"], values.astype(kind))
            self._interpreter.invoke()
            raw = [self._interpreter.get_tensor(output["index"]) for output in self._outputs]
        return [_dequantized(tensor, output["quantization"]) for tensor, output in zip(raw, self._outputs, strict=True)]


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class OnnxClassifier(_ExportClassifier):
    """An `.onnx` classifier (`model_lib.onnx_export`) run by ONNX Runtime on the CPU: raw pixels in as float32,
    probabilities out, and the features of its further outputs where it was exported with them."""

    def __init__(self, path: str | Path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = _cores()
        options.log_severity_level = 3  # errors only: its warnings about unused initialisers are not the user's
        self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        pixels = self._session.get_inputs()[0]
        self._input_name = pixels.name
        self.input_shape = (None, *pixels.shape[1:])
        self.output_shape = (None, *self._session.get_outputs()[0].shape[1:])
        self.input_dtype = np.dtype(np.float32)

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        # A session runs calls from several threads at once; no lock, unlike the interpreter.
        outputs = self._session.run(None, {self._input_name: np.asarray(batch, np.float32)})
        return [np.asarray(output, np.float32) for output in outputs]


def export_classifier(path: str | Path) -> _Classifier:
    """The classifier of an export file: TFLite's interpreter for `.tflite`, ONNX Runtime for `.onnx`."""
    return OnnxClassifier(path) if Path(path).suffix == ".onnx" else TFLiteClassifier(path)


def signature_outputs(interpreter) -> list[dict]:
    """The model's output details in the order the exported function returned them: its signature names them
    `output_0`, `output_1`, ... (the interpreter's own list may be in any order)."""
    signatures = interpreter.get_signature_list()
    if len(signatures) != 1:
        return interpreter.get_output_details()
    by_name = interpreter.get_signature_runner(next(iter(signatures))).get_output_details()
    return [by_name[name] for name in sorted(by_name, key=lambda name: (len(name), name))]


def _dequantized(values: np.ndarray, quantization: tuple[float, int]) -> np.ndarray:
    scale, zero = quantization
    return (values.astype(np.float32) - zero) * scale if scale else values.astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Per row, in numpy."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def sharpened(probabilities: np.ndarray, scale: float) -> np.ndarray:
    """`softmax(log(p) * scale)` per row: a softmax output at temperature T moved to T / scale."""
    return softmax(np.log(np.maximum(probabilities, np.finfo(np.float32).tiny)) * scale).astype(np.float32)


def cascade(
    first: np.ndarray, every: Callable[[np.ndarray], np.ndarray], margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """First-view probabilities, replaced by every view's (`every(rows)`) where the first view is unsure: its
    top-1 minus top-2 probability below `margin`. Returns them, and which rows were replaced."""
    top = np.partition(first, -2, axis=1)[:, -2:]
    unsure = top[:, 1] - top[:, 0] < margin
    result = np.array(first, np.float32, copy=True)
    if unsure.any():
        result[unsure] = every(np.flatnonzero(unsure))
    return result, unsure


class CascadeClassifier(_Classifier):
    """A TTA model's output at a fraction of its cost: the network on the image alone, with its own
    temperature, and every view only for the images that view leaves unsure (`model_lib.calibrate` measures
    what that costs in accuracy and calibration, and whether `--engine auto` may serve it).

    Args:
        network: Classifier of the network inside the TTA wrapper (the first view: the image as it is), Keras or its
            TFLite export.
        every_view: Classifier of the whole TTA model, Keras or its TFLite export.
        scale: The calibrated temperature over the first view's own (`sharpened`).
        margin: Below this top-1 minus top-2 probability of the first view, every view decides.
    """

    def __init__(self, network: _Classifier, every_view: _Classifier, scale: float, margin: float):
        self.network, self.every_view, self.scale, self.margin = network, every_view, scale, margin
        self.input_shape, self.output_shape = every_view.input_shape, every_view.output_shape
        # The unsure rows of a batch can be any number of them.
        self._bucketed = every_view.compiles_per_shape

    def predict_on_batch(self, pixels: np.ndarray) -> np.ndarray:
        return self.classify(pixels)[0]

    def classify(self, pixels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray] | None]:
        first, features = self.network.classify(pixels)  # the image's own features: no pass of their own
        return cascade(sharpened(first, self.scale), partial(self._every_view, pixels), self.margin)[0], features

    def _every_view(self, pixels: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if not self._bucketed:
            return self.every_view.predict_on_batch(pixels[rows])
        padded = np.resize(rows, 1 << (len(rows) - 1).bit_length())  # the next power of two, rows repeated
        return self.every_view.predict_on_batch(pixels[padded])[: len(rows)]
