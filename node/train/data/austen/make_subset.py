#!/usr/bin/env python3
"""Cut the bundled Jane Austen text that p2ptrain's character-level model embeds.

Reads austen_all.txt.gz (the six novels joined, see ../shared/data/README.md),
checks its sha256, keeps the opening of Pride and Prejudice (from its title
line at byte offset START, up to the last full line within LIMIT bytes) and
writes it with `gzip -9n` (level 9, no file name or time stamp) next to this
script. Prints the sha256 of the decompressed subset, which must equal the
one in README.md.

Usage: python3 node/train/data/austen/make_subset.py PATH/TO/austen_all.txt.gz
Standard library only (plus the `gzip` command).
"""

import gzip
import hashlib
import os
import subprocess
import sys

SOURCE_SHA256 = "f2516f2139e3cecf49657122fed58ac46313f1fdff32a26fc66789293e92d573"
START = 673_688
LIMIT = 400_000
OUTPUT = "pride_and_prejudice_part.txt.gz"

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: make_subset.py PATH/TO/austen_all.txt.gz")
    with gzip.open(sys.argv[1], "rb") as f:
        raw = f.read()
    got = hashlib.sha256(raw).hexdigest()
    if got != SOURCE_SHA256:
        sys.exit(f"{sys.argv[1]} decompresses to sha256 {got}, expected {SOURCE_SHA256}")
    window = raw[START : START + LIMIT]
    if not window.startswith(b"PRIDE AND PREJUDICE\n"):
        sys.exit("the cut does not start at Pride and Prejudice's title line")
    subset = window[: window.rindex(b"\n") + 1]
    subset.decode("utf-8")  # must be valid UTF-8
    with open(os.path.join(HERE, OUTPUT), "wb") as f:
        subprocess.run(["gzip", "-9n", "-c"], input=subset, stdout=f, check=True)
    print(f"{hashlib.sha256(subset).hexdigest()}  {OUTPUT}  ({len(subset)} bytes)")


if __name__ == "__main__":
    main()
