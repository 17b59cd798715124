"""The promotion gate: (a) the saved model reloads with `safe_mode` and reproduces the trained model's outputs;
(b) it is above the promotion floor and at least as good as the champion, by the margin, on the same test images.
The registry applies it inside its compare-and-swap, against the champion it read (model_lib/registry.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model_lib.config import option
from model_lib.runs import MODEL_FILE, PROBE_FILE

PROBE_TOLERANCE = 1e-4  # max absolute difference in probabilities between the trained and the reloaded model


def check_reloads(version_dir: Path) -> tuple[bool, str]:
    """Gate part (a): the saved model loads with `safe_mode` and reproduces the probe's outputs."""
    import keras

    probe_path = version_dir / PROBE_FILE
    if not probe_path.is_file():
        return False, f"no {PROBE_FILE} with reference outputs to check the reloaded model against"
    try:
        model = keras.saving.load_model(version_dir / MODEL_FILE, safe_mode=True)
    except Exception as error:  # any failure to load is a gate failure, with its message
        return False, f"model does not load with safe_mode: {error}"
    with np.load(probe_path, allow_pickle=False) as probe:
        reloaded = model.predict(probe["inputs"], verbose=0)
        difference = float(np.abs(reloaded - probe["outputs"]).max())
    if difference > PROBE_TOLERANCE:
        return False, f"reloaded model's outputs differ from the trained model's by {difference:.2e}"
    return True, f"reloads with safe_mode and reproduces the trained outputs (max diff {difference:.1e})"


def promotion_decision(manifest: dict, margin: float, entry: dict | None, first: bool) -> tuple[bool, str]:
    """Gate part (b): above the promotion floor, then better than the champion (its `registry.json` entry, None
    when there is none; `first`: no version at all yet) on the same images.

    The champion's score on this version's test set is its own when the test sets are equal,
    else the one `record_score` stored after re-scoring it on this test set. A champion with
    other classes is never compared by accuracy: the operator decides.
    """
    metrics, dataset = manifest["metrics"], manifest["dataset"]
    accuracy = metrics["test_accuracy"]
    floor = metrics.get("promotion_floor")
    if floor is not None and not accuracy > floor:
        return False, (
            f"test accuracy {accuracy:.4f} is not above the promotion floor {floor:.4f} (the majority-class "
            f"rate plus {option('learned_margin')}): no better than guessing"
        )
    if entry is None:
        return True, ("first version" if first else "no champion yet") + (
            f", above the promotion floor {floor:.4f}" if floor is not None else ""
        )
    ours, theirs, champion = dataset.get("class_names"), entry.get("class_names"), entry["version"]
    if ours is not None and theirs is not None and list(ours) != list(theirs):
        added, removed = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        change = "; ".join(
            part for part in (f"added {', '.join(added)}" if added else "",
                              f"removed {', '.join(removed)}" if removed else "") if part
        ) or "same classes in another order"  # fmt: skip
        return False, (
            f"classes differ from champion v{champion}'s ({change}): accuracies are not comparable; the "
            "operator decides (cifar-pipeline models promote)"
        )
    fingerprint = dataset.get("test_fingerprint")
    score = champion_scores(entry).get(fingerprint)
    if score is None:
        return False, (
            f"champion v{champion} was not scored on this test set ({fingerprint}): accuracies not compared; "
            "promote by hand if intended"
        )
    where = f"on test set {str(fingerprint)[:12]} ({dataset.get('test_count', '?')} images)"
    bar = score + margin
    if accuracy >= bar:
        return True, f"test accuracy {accuracy:.4f} >= champion v{champion}'s {score:.4f} + {margin} {where}"
    return False, f"test accuracy {accuracy:.4f} < champion v{champion}'s {score:.4f} + {margin} {where}"


def champion_scores(entry: dict) -> dict[str, float]:
    """A version's test accuracy by test-set fingerprint: its own test set's and any recorded since."""
    scores = {entry.get("test_fingerprint"): entry.get("test_accuracy")}
    scores |= {fingerprint: score["accuracy"] for fingerprint, score in entry.get("scores", {}).items()}
    return scores
