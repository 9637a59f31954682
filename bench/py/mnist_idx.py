"""MNIST IDX files (gzipped or not) as normalised numpy arrays, like p2ptrain's loader."""

import gzip
import os
import struct

import numpy as np

PIXEL_MEAN = 0.1307
PIXEL_STD = 0.3081


def _read(dirname, name):
    for candidate in (name, name + ".gz"):
        path = os.path.join(dirname, candidate)
        if os.path.exists(path):
            opener = gzip.open if candidate.endswith(".gz") else open
            with opener(path, "rb") as f:
                return f.read()
    raise FileNotFoundError(f"{dirname} has neither {name} nor {name}.gz")


def _images(raw):
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    assert magic == 2051, "not an IDX image file"
    x = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows * cols)
    return ((x.astype(np.float32) / 255.0) - PIXEL_MEAN) / PIXEL_STD


def _labels(raw):
    magic, n = struct.unpack(">II", raw[:8])
    assert magic == 2049, "not an IDX label file"
    return np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64)


def load(dirname):
    """Returns (train_x, train_y, test_x, test_y); x is float32 [n, 784], y int64 [n]."""
    return (
        _images(_read(dirname, "train-images-idx3-ubyte")),
        _labels(_read(dirname, "train-labels-idx1-ubyte")),
        _images(_read(dirname, "t10k-images-idx3-ubyte")),
        _labels(_read(dirname, "t10k-labels-idx1-ubyte")),
    )
