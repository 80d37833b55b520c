#!/usr/bin/env python3
"""SHA-256 of a safetensors file's tensors: their names, dtypes, shapes and bytes, in name order, without the
metadata (which holds paths and times that differ between runs of the same numbers).
usage: tools/tensor_digest.py FILE..."""
import hashlib
import json
import struct
import sys


def digest(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    h = hashlib.sha256()
    for name in sorted(k for k in header if k != "__metadata__"):
        t = header[name]
        a, b = t["data_offsets"]
        h.update(json.dumps([name, t["dtype"], t["shape"]]).encode())
        h.update(data[a:b])
    return h.hexdigest()


for p in sys.argv[1:]:
    print(f"{digest(p)}  {p}")
