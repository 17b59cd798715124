"""Write an image-folder pack back out as ROOT/{train,test}/<class>/<n>.jpg, the bytes unchanged.

The pack is `../shared/tools/pack_image_folder.py`'s `.npz` (one 56 MB file instead of 60,000), which
carries the shared CIFAR-10 to a machine that cannot see `../shared`, such as the lent GPU machine:

    python bench/unpack_image_folder.py cifar10.npz /tmp/cifar10
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def unpack(pack: Path, root: Path) -> int:
    """Write every file of `pack` under `root`; returns how many."""
    with np.load(pack, allow_pickle=False) as data:
        blob, offsets, labels = data["blob"], data["offsets"], data["labels"]
        is_test, classes = data["is_test"], [str(name) for name in data["classes"]]
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
    for index, (start, end) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        split = "test" if is_test[index] else "train"
        (root / split / classes[labels[index]] / f"{index:05d}.jpg").write_bytes(blob[start:end].tobytes())
    return len(labels)


if __name__ == "__main__":
    print(f"unpacked {unpack(Path(sys.argv[1]), Path(sys.argv[2]))} files into {sys.argv[2]}")
