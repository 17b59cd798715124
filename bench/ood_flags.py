"""The `out_of_distribution` flag of a registered version, through the prediction path, on photos and non-photos.

Side by side in one run: the texture rule alone and with the version's feature-space rule (`model_lib.ood`),
and the engine's speed on the test images with and without the features,
on the version's cached CIFAR-10 test images, 300 of them upscaled to 640x480 JPEG photos (decoded as
`predict` decodes them), and `--per-kind` synthetic non-photos of each of tests/synthetic.py's six kinds.

    python bench/ood_flags.py ARTIFACTS_DIR/models/cifar10/v1 [--per-kind 200] [--exports] [--out results.json]

With `--exports`, also each TFLite export of the version (`cifar-pipeline export` first) with its own feature rule,
and the int8 export under the Keras model's rule: why each export gets a rule of its own.

Needs the version's dataset cache under ARTIFACTS_DIR (train first) and the real CIFAR-10 in CIFAR10_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_lib.data import load_arrays  # noqa: E402
from model_lib.fileio import read_json  # noqa: E402
from model_lib.flags import flags  # noqa: E402
from model_lib.images import decode_rgb  # noqa: E402
from model_lib.inference import TFLiteClassifier  # noqa: E402
from model_lib.ood import FeatureClassifier, FeatureRule  # noqa: E402
from model_lib.precision import machine_key  # noqa: E402
from model_lib.predict import load_classifier, resolve_model  # noqa: E402
from model_lib.settings import artifacts_location, work_dir  # noqa: E402
from tests.synthetic import unlike_images, write_upscaled_cifar  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", type=Path)
    parser.add_argument("--per-kind", type=int, default=200)
    parser.add_argument("--exports", action="store_true", help="also each TFLite export, with its own feature rule")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    info = resolve_model(str(args.version), artifacts_location(), engine="keras")
    manifest = read_json(args.version / "manifest.json")
    arrays = load_arrays(work_dir() / "datasets" / manifest["dataset"]["fingerprint"])
    side = info.image_size
    with tempfile.TemporaryDirectory() as scratch:
        _, photos = write_upscaled_cifar(Path(os.environ["CIFAR10_DIR"]), Path(scratch) / "o", Path(scratch) / "p")
        upscaled = np.stack([decode_rgb(path, (side, side))[0] for path in sorted(photos.rglob("*.jpg"))])
    sets = {"CIFAR-10 test": np.asarray(arrays.x_test), "upscaled photos": upscaled,
            **unlike_images(args.per_kind, side)}  # fmt: skip
    classifier = load_classifier(info)
    rates, seconds = {}, {}
    for name, pixels in sets.items():
        started = time.perf_counter()
        probabilities, outside = classifier.flagged(pixels)
        seconds[name] = time.perf_counter() - started
        texture_only = np.array(flags(probabilities, pixels, info.unsure_below, info.texture_range))
        both = np.array(flags(probabilities, pixels, info.unsure_below, info.texture_range, outside))
        rates[name] = {
            "images": len(pixels),
            "texture rule": round(float((texture_only == "out_of_distribution").mean()), 4),
            "texture + features": round(float((both == "out_of_distribution").mean()), 4),
            "low_confidence": round(float((both == "low_confidence").mean()), 4),
        }
    # What the features cost: the same engine without the rule, on the test images; the best of three
    # alternating passes of each, after a warm-up.
    plain = load_classifier(replace(info, feature_rule=""))
    variants = {"probabilities only": plain.predict_on_batch, "with features": classifier.flagged}
    test, timing = sets["CIFAR-10 test"], dict.fromkeys(variants, 0)
    for _ in range(3):
        for name, serving in variants.items():
            serving(test[:256])
            started = time.perf_counter()
            for i in range(0, len(test), 256):
                serving(test[i : i + 256])
            timing[name] = max(timing[name], round(len(test) / (time.perf_counter() - started)))
    result = {
        "version": str(args.version),
        "profile": manifest["config"].get("profile"),
        "test_accuracy": manifest["metrics"]["test_accuracy"],
        "feature_rule": manifest["calibration"].get("feature_rule"),
        "host": machine_key(),
        "flags": rates,
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
        "test_images_per_second": timing,
    }
    print(json.dumps(result, indent=2))
    print("| images | texture rule | texture + features | low_confidence |\n|---|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} ({rate['images']}) | {rate['texture rule']:.1%} | **{rate['texture + features']:.1%}** "
              f"| {rate['low_confidence']:.1%} |")  # fmt: skip
    if args.exports:
        result["exports"] = export_rates(args.version, manifest, info, sets)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def export_rates(version: Path, manifest: dict, info, sets: dict[str, np.ndarray]) -> dict:
    """`out_of_distribution` (texture or features) per set through each export with its own rule, through the int8
    export with the Keras model's rule, and each one's speed with its features on the test images (best of two)."""
    engines = {}
    for entry in manifest.get("exports", []):
        if (entry.get("features") or {}).get("file"):
            served = resolve_model(str(version / entry["file"]), artifacts_location())
            engines[f"{entry['format']}, own rule"] = load_classifier(served)
        if entry["format"] == "int8":
            keras_rule = FeatureRule.load(version / info.feature_rule)
            engines["int8, Keras' rule"] = FeatureClassifier(TFLiteClassifier(version / entry["file"]), keras_rule)
    rates, speed = {}, {}
    for engine, classifier in engines.items():
        for name, pixels in sets.items():
            probabilities, outside = classifier.flagged(pixels)
            flagged = np.array(flags(probabilities, pixels, info.unsure_below, info.texture_range, outside))
            rates.setdefault(name, {})[engine] = round(float((flagged == "out_of_distribution").mean()), 4)
        test = sets["CIFAR-10 test"]
        for _ in range(2):
            started = time.perf_counter()
            for i in range(0, len(test), 256):
                classifier.flagged(test[i : i + 256])
            speed[engine] = max(speed.get(engine, 0), round(len(test) / (time.perf_counter() - started)))
    print(json.dumps({"flags": rates, "test_images_per_second": speed}, indent=2))
    print(f"| images | {' | '.join(engines)} |\n|---|{'---|' * len(engines)}")
    for name, row in rates.items():
        print(f"| {name} | {' | '.join(f'{row[engine]:.1%}' for engine in engines)} |")
    return {"flags": rates, "test_images_per_second": speed}


if __name__ == "__main__":
    main()
