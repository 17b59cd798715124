"""ONNX exports: a version's float32 TFLite export converted by tf2onnx, and that ONNX model quantised to int8 by
ONNX Runtime's static quantiser (QDQ, per-channel weights), calibrated on the same training images as TFLite's int8.

Why from the TFLite file and not `model.export(format="onnx")`: on TensorFlow 2.21 with tf2onnx 1.17, Keras' path
leaves the Normalization layer's constants as two more graph inputs and GELU's `Erfc` without an ONNX op, so
ONNX Runtime refuses the file. The float32 TFLite export has its constants folded and GELU as one op, which
`_register_gelu` writes as ONNX's `Erf`; the two files then compute the same function from the same tracing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from model_lib.config import ConfigError

ONNX_OPSET = 17  # tf2onnx 1.17 writes up to opset 18; 17 is what ONNX Runtime 1.16 and later all run
INSTALL_HINT = "pip install 'cifar-pipeline[onnx]'"


def require_onnx(purpose: str, modules: tuple[str, ...] = ("onnxruntime", "onnx", "tf2onnx")) -> None:
    """Raises ConfigError in one line naming the extra to install when a module `purpose` needs is missing."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"{purpose} needs {', '.join(missing)}, which this install lacks: {INSTALL_HINT}")


def convert_onnx(tflite_path: Path, onnx_path: Path) -> None:
    """Write the float32 TFLite model at `tflite_path` as an ONNX model at `onnx_path`, same inputs and outputs in
    the same order (the probabilities, then the features where the export has them)."""
    import tf2onnx
    from ai_edge_litert.interpreter import Interpreter

    from model_lib.inference import signature_outputs

    _register_gelu()
    # Named in the order the exported function returns them: tf2onnx's own order follows the graph.
    outputs = [output["name"] for output in signature_outputs(Interpreter(model_path=str(tflite_path)))]
    with warnings.catch_warnings():  # tf2onnx reads the file with TensorFlow's interpreter, which warns it is old
        warnings.filterwarnings("ignore", r"\s*Warning: tf.lite.Interpreter is deprecated")
        tf2onnx.convert.from_tflite(
            str(tflite_path), output_names=outputs, opset=ONNX_OPSET, output_path=str(onnx_path)
        )


def quantize_onnx(float_path: Path, int8_path: Path, calibration_images: np.ndarray) -> None:
    """Write the ONNX model at `float_path` with int8 weights and uint8 activations at `int8_path`, the activation
    ranges measured on `calibration_images` (raw pixels, one at a time as TFLite's quantiser reads them)."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = _input_name(float_path)
    samples = np.asarray(calibration_images, np.float32)

    class Images(CalibrationDataReader):
        def __init__(self):
            self._images = iter(samples)

        def get_next(self):
            image = next(self._images, None)
            return None if image is None else {input_name: image[None]}

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"  # shapes inferred and graph optimised, as the quantiser advises
        quant_pre_process(str(float_path), str(prepared))
        quantize_static(str(prepared), str(int8_path), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip


def _input_name(path: Path) -> str:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0].name


_registered = False


def _register_gelu() -> None:
    """Teach tf2onnx TFLite's GELU op in its exact form, `0.5 x (1 + erf(x / sqrt 2))`, the one airbench uses. Once
    per process."""
    global _registered
    if _registered:
        return
    from tf2onnx import utils
    from tf2onnx.handler import tf_op, tfl_op

    @tfl_op("TFL_GELU", tf_op="Gelu")
    class TflGelu:
        @classmethod
        def to_tf(cls, ctx, node, **kwargs):
            utils.make_sure(not node.get_attr_value("approximate", False), "GELU's tanh form is not converted")

    @tf_op("Gelu")
    class Gelu:
        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            x, output, name = node.input[0], node.output[0], node.name
            shape, dtype = ctx.get_shape(output), ctx.get_dtype(output)

            def const(value: float) -> str:
                kind = utils.map_onnx_to_numpy_type(dtype)
                return ctx.make_const(utils.make_name(f"{name}_c"), np.array(value, kind)).output[0]

            def op(op_type: str, *inputs: str) -> str:
                return ctx.make_node(op_type, list(inputs), op_name_scope=name, shapes=[shape], dtypes=[dtype]).output[
                    0
                ]

            curve = op("Add", op("Erf", op("Mul", x, const(1 / np.sqrt(2)))), const(1.0))
            half_x = op("Mul", x, const(0.5))
            ctx.remove_node(name)
            ctx.make_node("Mul", [half_x, curve], outputs=[output], name=name, shapes=[shape], dtypes=[dtype])

    _registered = True
