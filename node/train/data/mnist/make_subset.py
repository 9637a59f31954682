#!/usr/bin/env python3
"""Cut the bundled MNIST subset that p2ptrain embeds in its binary.

Reads the full MNIST IDX files (gzipped) from SRC (default: ../shared/data/mnist
relative to the repository root), keeps the first TRAIN_COUNT training and the
first TEST_COUNT test samples, rewrites the IDX headers with the new counts and
compresses them with `gzip -9n` (level 9, no file name or time stamp, so the
bytes do not depend on when the script ran) next to this script. Prints the sha256 of each decompressed output for README.md.

Usage: python3 node/train/data/mnist/make_subset.py [SRC_DIR]
Standard library only (plus the `gzip` command).
"""

import gzip
import hashlib
import os
import struct
import subprocess
import sys

TRAIN_COUNT = 10_000
TEST_COUNT = 2_000

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SRC = os.path.join(HERE, "..", "..", "..", "..", "shared", "data", "mnist")

# (output/input base name, expected magic, count to keep)
FILES = [
    ("train-images-idx3-ubyte", 2051, TRAIN_COUNT),
    ("train-labels-idx1-ubyte", 2049, TRAIN_COUNT),
    ("t10k-images-idx3-ubyte", 2051, TEST_COUNT),
    ("t10k-labels-idx1-ubyte", 2049, TEST_COUNT),
]


def cut(raw: bytes, name: str, magic: int, keep: int) -> bytes:
    (got_magic,) = struct.unpack(">I", raw[:4])
    if got_magic != magic:
        sys.exit(f"{name}: magic {got_magic}, expected {magic}")
    ndims = raw[3]
    dims = list(struct.unpack(">" + "I" * ndims, raw[4 : 4 + 4 * ndims]))
    if dims[0] < keep:
        sys.exit(f"{name}: holds {dims[0]} items, cannot keep {keep}")
    item = 1
    for d in dims[1:]:
        item *= d
    header_len = 4 + 4 * ndims
    body = raw[header_len : header_len + keep * item]
    if len(body) != keep * item:
        sys.exit(f"{name}: truncated")
    dims[0] = keep
    return struct.pack(">I", magic) + struct.pack(">" + "I" * ndims, *dims) + body


def main() -> None:
    src = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_SRC
    for base, magic, keep in FILES:
        with gzip.open(os.path.join(src, base + ".gz"), "rb") as f:
            raw = f.read()
        out = cut(raw, base, magic, keep)
        path = os.path.join(HERE, base + ".gz")
        with open(path, "wb") as f:
            subprocess.run(["gzip", "-9n", "-c"], input=out, stdout=f, check=True)
        print(f"{hashlib.sha256(out).hexdigest()}  {base}  ({keep} items, {len(out)} bytes)")


if __name__ == "__main__":
    main()
