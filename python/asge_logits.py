"""Reads the files `asge eval --dump-logits` writes (safetensors; numpy only, no other package needed).

    from asge_logits import read_safetensors
    tensors, metadata = read_safetensors("logits.safetensors")
    tensors["fusion"]   # [N, classes] float32;  also "last", "best", "labels" [N] int64, "inputs" [N, C, S, S]
"""
import json
import struct

import numpy as np

_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "U8": np.uint8, "U32": np.uint32}


def read_safetensors(path):
    """All tensors of a safetensors file as numpy arrays, and its metadata."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    body = memoryview(data)[8 + n :]
    out = {}
    for name, t in header.items():
        start, end = t["data_offsets"]
        out[name] = np.frombuffer(body[start:end], dtype=_DTYPES[t["dtype"]]).reshape(t["shape"])
    return out, meta


def compare(name, got, want, rtol):
    """Compares logits row by row: |got - want| <= rtol * max|want row|. Returns (worst error relative to the row
    scale, rows over tolerance, predictions that differ, of which near-ties). A near-tie is a row whose top-2
    margin in the reference is below twice the tolerance: a rounding difference may legitimately swap them."""
    scale = np.abs(want).max(axis=1, keepdims=True) + 1e-30
    rel = np.abs(got - want) / scale
    worst = float(rel.max())
    over = int((rel.max(axis=1) > rtol).sum())
    differ = np.argmax(got, axis=1) != np.argmax(want, axis=1)
    top2 = np.sort(want, axis=1)[:, -2:]
    near = (top2[:, 1] - top2[:, 0]) < 2 * rtol * scale[:, 0]
    print(
        f"{name}: {len(want)} images, worst |diff| / row max = {worst:.2e} (tolerance {rtol:.0e}), "
        f"{over} rows over tolerance, {int(differ.sum())} predictions differ ({int((differ & near).sum())} near-ties)"
    )
    return worst, over, int(differ.sum()), int((differ & ~near).sum())
