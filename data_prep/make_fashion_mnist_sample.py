"""The shipped Fashion-MNIST subset: the first N images and labels of each split, as gzipped idx files
under the original names, plus a README stating where they come from:

    python -m data_prep.make_fashion_mnist_sample --source /usr/share/datasets/fashion-mnist \
        --output data/fashion_mnist_sample [--train 2000] [--test 500]

The full data set is the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist).
Files are gzipped with mtime 0 and no file name, so the same arguments always write the same bytes.
"""
from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import numpy as np

from megatron_lax.data.readers import find_idx_file, read_idx

README = """# Fashion-MNIST sample

The first {train} training and first {test} test images (with their labels) of Fashion-MNIST,
by Zalando Research (https://github.com/zalandoresearch/fashion-mnist), MIT licence, taken from the
Debian package `dataset-fashion-mnist` (installed at /usr/share/datasets/fashion-mnist).

Made with

    python -m data_prep.make_fashion_mnist_sample --source /usr/share/datasets/fashion-mnist \\
        --output data/fashion_mnist_sample --train {train} --test {test}

The files keep the original idx format and names (`train-*` is the training split, `t10k-*` the test
split), gzipped reproducibly. Classes: T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt,
Sneaker, Bag, Ankle boot. The tests use only this sample.
"""


def idx_bytes(array: np.ndarray) -> bytes:
    """A uint8 array in the idx format: magic 0x0000 0x08 ndim, big-endian int32 dims, the data."""
    header = struct.pack(f">HBB{array.ndim}I", 0, 0x08, array.ndim, *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def make_sample(source: Path, output: Path, counts: dict[str, int]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    for prefix, n in counts.items():
        for kind in ("images-idx3", "labels-idx1"):
            array = read_idx(find_idx_file(source, f"{prefix}-{kind}-ubyte"))
            if n > len(array):
                raise SystemExit(f"{source}: {prefix} has {len(array)} items, fewer than the {n} asked for")
            data = gzip.compress(idx_bytes(array[:n]), compresslevel=9, mtime=0)
            (output / f"{prefix}-{kind}-ubyte.gz").write_bytes(data)
    (output / "README.md").write_text(README.format(train=counts["train"], test=counts["t10k"]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--output", type=Path, default=Path("data/fashion_mnist_sample"))
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    args = parser.parse_args(argv)
    make_sample(args.source, args.output, {"train": args.train, "t10k": args.test})


if __name__ == "__main__":
    main()
