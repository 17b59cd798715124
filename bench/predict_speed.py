"""Batch-prediction speed and memory, side by side in one run.

    python bench/predict_speed.py --model artifacts/models/cifar10/v1 [--data ../shared/datasets/cifar10]

Measures on the CIFAR-10 test JPEGs with one registered model version:
  1. the origin's loop: keras load_img -> img_to_array / 255 -> model.predict on one image;
  2. the batch-predict flow (thread-pool runner) on all test images, cold each time: its decoding
     pool is shut down and its model forgotten before each run (TensorFlow stays imported);
  3. the decode-only ceiling: the same walk, decoder and decoding processes, no model, a fresh
     pool each time; runs of 2 and 3 alternate and their medians are compared;
  4. 12-megapixel JPEGs: draft-mode decode vs full decode + resize;
  5. peak RSS (VmHWM) and speed of batch-predict on 5,000 vs 50,000 images, each in a fresh
     process (TensorFlow imported inside the flow, as `cifar-pipeline predict` does it).

    python bench/predict_speed.py --model artifacts/models/cifar10/v2 --engines

compares instead the engines a version can run on (exports written by `cifar-pipeline export`):
the Keras model, each TFLite and ONNX export, and what `--engine auto` (an export, or the first view
first) and `--engine onnx` pick; for each, batch-predict on all test JPEGs (cold runs, alternating)
with its accuracy from the CSV, and the model-only ceiling (the same classifier on pre-decoded
pixels); plus the Keras network without its TTA, the accuracy/speed trade-off of the views at
prediction time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def image_paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def origin_loop(model, paths: list[Path]) -> float:
    import keras

    model.predict(keras.utils.img_to_array(keras.utils.load_img(paths[0], target_size=(32, 32)))[None], verbose=0)
    started = time.perf_counter()  # after one warm-up call, so tracing does not flatter the speedup
    for path in paths:
        image = keras.utils.load_img(path, target_size=(32, 32))
        array = keras.utils.img_to_array(image) / 255.0
        model.predict(array[None], verbose=0)
    return len(paths) / (time.perf_counter() - started)


def forget_warm_state() -> None:
    """Shut down this process's decoding pool and forget its loaded models: the next run starts cold."""
    from model_lib.predict import reset_workers

    reset_workers()


def cold_flow(folder: Path, model_dir: Path, output: Path) -> dict:
    """One batch-predict run on `folder` that starts its pool and loads its model itself."""
    from flows.batch_predict import batch_predict

    forget_warm_state()
    return batch_predict(str(folder), output_csv=str(output), model=str(model_dir))


def decode_only(folder: Path) -> float:
    """The flow's own walk, decoder, chunks and decoding processes, without the model or the CSV.

    Every chunk of the folder is queued at once, so the pool never waits; a fresh pool starts
    inside the timing, as the flow's does.
    """
    from model_lib.config import BATCH_IMAGES
    from model_lib.images import decode_files_in_pool
    from model_lib.predict import decode_pool, image_like_entries

    forget_warm_state()
    started = time.perf_counter()
    paths = [folder / entry.relative_path for entry in image_like_entries(folder, True, [])]
    count = sum(len(chunk.errors) for chunk in decode_files_in_pool(paths, 32, decode_pool(), BATCH_IMAGES))
    return count / (time.perf_counter() - started)


def large_photos(tmp: Path, count: int, threads: int) -> tuple[float, float]:
    from PIL import Image

    from model_lib.images import decode_rgb

    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, 4000, dtype=np.float32)
    paths = []
    for i in range(count):
        pixels = np.empty((3000, 4000, 3), np.uint8)
        pixels[..., 0] = gradient[None, :]
        pixels[..., 1] = gradient[:3000, None]
        pixels[..., 2] = (i * 37) % 255
        pixels[::7, ::5] = rng.integers(0, 255, pixels[::7, ::5].shape, dtype=np.uint8)
        path = tmp / f"photo_{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)

    def full(path):
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))

    rates = []
    for decode in (lambda p: decode_rgb(p, (32, 32)), full):
        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(decode, paths))
        rates.append(count / (time.perf_counter() - started))
    return rates[0], rates[1]


def fresh_process_run(folder: Path, model_dir: Path, artifacts: Path) -> tuple[float, float]:
    """Peak RSS in MB and images/s of batch-predict in a fresh process."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so a child would report its parent's peak.
    code = (
        "import sys; sys.path.insert(0, {!r});"
        "from flows.batch_predict import batch_predict;"
        "rate = batch_predict({!r}, output_csv={!r}, model={!r})['images_per_second'];"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0], rate)"
    ).format(str(REPO), str(folder), str(artifacts / "rss.csv"), str(model_dir))
    env = {**os.environ, "ARTIFACTS_DIR": str(artifacts)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    peak_kb, rate = done.stdout.strip().splitlines()[-1].split()
    return int(peak_kb) / 1024, float(rate)


def subset_folder(source: Path, target: Path, count: int) -> Path:
    """The first `count` images of `source` as hard links: instant, and ordinary files to the walker."""
    target.mkdir(parents=True)
    for i, path in enumerate(image_paths(source)[:count]):
        os.link(path, target / f"{i:06d}{path.suffix}")
    return target


def engine_comparison(data: Path, model_dir: Path, scratch: Path, runs: int) -> dict:
    """Batch-predict and model-only speed and accuracy for each engine of one version (see the docstring)."""
    from model_lib.fileio import read_json
    from model_lib.images import decode_files
    from model_lib.inference import CascadeClassifier, KerasClassifier, TFLiteClassifier, export_classifier
    from model_lib.models import unwrap_tta
    from model_lib.predict import load_classifier, resolve_model
    from model_lib.prediction_csv import read_predictions
    from model_lib.serving import cascade_rule
    from model_lib.versions import load_verified_model

    manifest = read_json(model_dir / "manifest.json")
    class_names = manifest["dataset"]["class_names"]
    exports = [e["file"] for e in manifest.get("exports", []) if e["status"] == "ok"]
    variants = {"keras": {"model": str(model_dir), "engine": "keras"}, "auto": {"model": str(model_dir)}}
    variants.update({name: {"model": str(model_dir / name)} for name in exports})
    if any(name.endswith(".onnx") for name in exports):
        variants["onnx"] = {"model": str(model_dir), "engine": "onnx"}
    paths = image_paths(data / "test")
    decoded = decode_files(paths, int(manifest["config"]["image_size"]))
    labels = np.array([class_names.index(path.parent.name) for path in paths])

    def model_only(classifier, batch: int = 256) -> tuple[float, float]:
        classifier.predict_on_batch(decoded.pixels[:batch])
        started = time.perf_counter()
        scores = [classifier.predict_on_batch(decoded.pixels[i : i + batch]) for i in range(0, len(paths), batch)]
        rate = len(paths) / (time.perf_counter() - started)
        return round(rate, 1), round(float((np.concatenate(scores).argmax(axis=1) == labels).mean()), 4)

    from flows.batch_predict import batch_predict

    rates: dict[str, list[float]] = {name: [] for name in variants}
    results: dict[str, dict] = {}
    for _ in range(runs):  # alternating, so a slow moment of the machine is shared out
        for name, options in variants.items():
            forget_warm_state()
            summary = batch_predict(str(data / "test"), output_csv=str(scratch / f"{name}.csv"), **options)
            rates[name].append(summary["images_per_second"])
            table = read_predictions(summary["output_csv"])
            truth = table["path"].str.split("/").str[0]
            results[name] = {"model": summary["model"], "accuracy": round(float((table["label"] == truth).mean()), 4)}
    keras_model = load_verified_model(model_dir)
    ceilings = {"keras": model_only(KerasClassifier(keras_model))}
    ceilings.update({name: model_only(export_classifier(model_dir / name)) for name in exports})
    network, views = unwrap_tta(keras_model)
    if views:
        ceilings["keras without TTA"] = model_only(KerasClassifier(network))
    rule = cascade_rule(manifest)
    if views and rule:
        keras_cascade = CascadeClassifier(KerasClassifier(network), KerasClassifier(keras_model), *rule)
        ceilings["keras, first view first"] = model_only(keras_cascade)
    for first_view in [entry["first_view"]["file"] for entry in manifest.get("exports", []) if entry.get("first_view")]:
        ceilings[f"{first_view} alone"] = model_only(TFLiteClassifier(model_dir / first_view))
    ceilings["auto"] = model_only(load_classifier(resolve_model(str(model_dir), model_dir, "auto")))
    for name, result in results.items():
        result["batch_predict_images_per_s"] = statistics.median(rates[name])
        result["runs"] = rates[name]
    baseline = results["keras"]["batch_predict_images_per_s"]
    for result in results.values():
        result["speedup_vs_keras"] = round(result["batch_predict_images_per_s"] / baseline, 2)
    return {
        "batch_predict": results,
        "model_only_images_per_s_and_accuracy": ceilings,
        "images": len(paths),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("CIFAR10_DIR", str(REPO.parent / "shared/datasets/cifar10")))
    parser.add_argument("--model", required=True, help="a registered version folder")
    parser.add_argument("--origin-images", type=int, default=500, help="images timed in the origin's slow loop")
    parser.add_argument("--photos", type=int, default=24, help="12-megapixel JPEGs generated for the draft test")
    parser.add_argument("--runs", type=int, default=5, help="cold flow runs and ceiling runs, alternating")
    parser.add_argument("--engines", action="store_true", help="compare the version's engines instead (see above)")
    args = parser.parse_args()
    data = Path(args.data)
    threads = os.cpu_count() or 1
    if args.engines:
        from model_lib.precision import machine_key

        with tempfile.TemporaryDirectory() as scratch:
            os.environ["ARTIFACTS_DIR"] = str(Path(scratch) / "artifacts")
            results = engine_comparison(data, Path(args.model).resolve(), Path(scratch), args.runs)
        print(json.dumps({"machine": machine_key(), "cores": threads, **results}, indent=2))
        return

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        artifacts = scratch / "artifacts"
        os.environ["ARTIFACTS_DIR"] = str(artifacts)
        from model_lib.versions import load_verified_model

        model_dir = Path(args.model).resolve()
        model = load_verified_model(model_dir)
        test_paths = image_paths(data / "test")

        origin_rate = origin_loop(model, test_paths[: args.origin_images])
        summaries, decode_rates = [], []
        for _ in range(args.runs):
            summaries.append(cold_flow(data / "test", model_dir, scratch / "test.csv"))
            decode_rates.append(decode_only(data / "test"))
        draft_rate, full_rate = large_photos(scratch, args.photos, threads)
        small = subset_folder(data / "train", scratch / "n5000", 5000)
        large = subset_folder(data / "train", scratch / "n50000", 50000)
        rss_small, fresh_rate_small = fresh_process_run(small, model_dir, artifacts)
        rss_large, fresh_rate_large = fresh_process_run(large, model_dir, artifacts)

    summary, flow_rates = summaries[0], [s["images_per_second"] for s in summaries]
    flow_rate, decode_rate = statistics.median(flow_rates), statistics.median(decode_rates)
    results = {
        "machine": f"{threads} CPU cores",
        "model": summary["model"],
        "origin_loop_images_per_s": round(origin_rate, 1),
        "origin_loop_images_timed": args.origin_images,
        "batch_predict_images_per_s": flow_rate,
        "batch_predict_runs_images_per_s": flow_rates,
        "batch_predict_images": summary["ok"] + summary["error"],
        "speedup_vs_origin": round(flow_rate / origin_rate, 1),
        "decode_only_images_per_s": round(decode_rate, 1),
        "decode_only_runs_images_per_s": [round(rate, 1) for rate in decode_rates],
        "fraction_of_decode_ceiling": round(flow_rate / decode_rate, 3),
        "photos_12mp_draft_images_per_s": round(draft_rate, 2),
        "photos_12mp_full_decode_images_per_s": round(full_rate, 2),
        "draft_speedup": round(draft_rate / full_rate, 2),
        "peak_rss_mb_5000": round(rss_small, 1),
        "peak_rss_mb_50000": round(rss_large, 1),
        "rss_growth": round(rss_large / rss_small - 1, 3),
        "fresh_process_images_per_s_5000": fresh_rate_small,
        "fresh_process_images_per_s_50000": fresh_rate_large,
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
