"""Write the training and development splits the fidelity work uses, next to this script.

    python examples/vit_digits/splits.py

train.py holds out 20 % of scikit-learn's digits as the test set (test.npy, never used for
anything but the reported evaluation). Of its training 80 % (1437 images), this keeps 287
as a development set (dev.npy, dev_labels.txt: for choosing export defaults and training
settings) and the other 1150 for quantization-aware training (qat_train.npy,
qat_train_labels.txt). calib.npy (200 training images) may overlap qat_train, never dev.
Deterministic: the same split as train.py, then a fixed permutation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
DEV = 287


def main() -> None:
    import sys

    sys.path.insert(0, str(HERE))
    from train import data

    x_train, _, y_train, _ = data()
    calib = np.load(HERE / "calib.npy")
    in_calib = np.array([any(np.array_equal(x, c) for c in calib) for x in x_train])
    order = np.random.default_rng(1).permutation(np.flatnonzero(~in_calib))
    dev = np.sort(order[:DEV])
    train = np.setdiff1d(np.arange(len(x_train)), dev)
    np.save(HERE / "dev.npy", x_train[dev])
    (HERE / "dev_labels.txt").write_text("".join(f"{int(v)}\n" for v in y_train[dev]))
    np.save(HERE / "qat_train.npy", x_train[train])
    (HERE / "qat_train_labels.txt").write_text("".join(f"{int(v)}\n" for v in y_train[train]))
    print(f"wrote dev ({len(dev)}) and qat_train ({len(train)}) splits")


if __name__ == "__main__":
    main()
