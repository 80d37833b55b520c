"""A PyTorch module for asge checkpoints: the inference network, built from a checkpoint's metadata, loading it
with ``strict=True``. Needs torch and numpy only (the safetensors file is read by ``asge_logits``).

    import sys; sys.path.insert(0, "python")
    from asge_torch import ASGE
    model = ASGE.from_checkpoint("runs/quickstart/best.safetensors")   # a run's checkpoint or an export
    logits = model(images)                  # fusion (the default strategy); images [N, C, S, S] in [0, 1]
    logits = model(images, strategy="best") # or "last"
    every = model.all_logits(images)        # {"layers": [a_1, ..., a_L], "fusion": s}

The module mirrors the checkpoint's tensor names and layouts, so ``state_dict()`` and the file agree key for key:
``layers.{i}.conv`` is a ``Conv2d`` (OIHW weight), ``layers.{i}.proj`` holds the fixed projection as buffers
``weight`` ``[D, N]`` and ``bias`` ``[N]``, applied as ``g @ weight + bias``; ``heads`` is a ``ModuleDict`` keyed
"1".."L-1" (0-based layer indices; layer 1 has no head). Images are prepared as ``asge predict`` prepares them
(the checkpoint's ``asge.input`` metadata: decoding, resize, crop); the per-sample RMS norm is inside the module.
The computation is docs/method.md's: conv 3x3 + ReLU, goodness = adaptive average pooling of y^2 over the
layer's P x P grid (times the bin areas for the ``sum`` reduction), ``g R + b``; between layers the 2x2 pool
(average, or RMS), then the RMS norm; fusion = the heads on the global average of layers 2..L's outputs, summed.
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from asge_logits import read_safetensors  # noqa: E402

RMS_EPS = math.exp(-50.0)

# The released architectures' pooling layers (1-based), for files without the asge.model table (the PyTorch
# fixtures).
_POOLS = {"vgg8": {2, 4, 5, 6}, "vgg11": {2, 4, 6, 8}}


def rms_norm(x):
    """x / (sqrt(mean_{c,h,w} x^2) + e^-50), per sample."""
    return x / (x.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt() + RMS_EPS)


def adaptive_bins(n, p):
    """adaptive_avg_pool2d's bins of an axis of n split into p: [floor(i n / p), ceil((i + 1) n / p))."""
    return [((i * n) // p, -((-(i + 1) * n) // p)) for i in range(p)]


class Projection(nn.Module):
    """The fixed random projection of a layer's goodness to class logits (buffers: never trained)."""

    def __init__(self, d, n):
        super().__init__()
        self.register_buffer("weight", torch.zeros(d, n))
        self.register_buffer("bias", torch.zeros(n))

    def forward(self, g):
        return g @ self.weight + self.bias


class Layer(nn.Module):
    def __init__(self, spec, classes, goodness, pool_kind):
        super().__init__()
        self.conv = nn.Conv2d(spec["c_in"], spec["c_out"], 3, padding=1)
        self.proj = Projection(spec["c_out"] * spec["p"] ** 2, classes)
        self.p, self.pool, self.pool_kind = spec["p"], spec["pool"], pool_kind
        areas = []
        if goodness == "sum":
            rows, cols = adaptive_bins(spec["h"], self.p), adaptive_bins(spec["w"], self.p)
            areas = [(r1 - r0) * (c1 - c0) for (r0, r1) in rows for (c0, c1) in cols]
        self.sum_areas = areas  # empty for the mean

    def goodness(self, y):
        g = F.adaptive_avg_pool2d(y * y, self.p).flatten(2)  # [B, C, P*P], mean of squares per bin
        if self.sum_areas:
            g = g * torch.tensor(self.sum_areas, dtype=g.dtype, device=g.device)
        return g.flatten(1)  # channel-major: c * P^2 + i * P + j

    def forward(self, x):
        """The conv output y, and the layer's output for the next layer (pooled, RMS-normalised)."""
        y = F.relu(self.conv(x))
        o = y
        if self.pool:
            o = F.avg_pool2d(y, 2) if self.pool_kind == "avg" else F.avg_pool2d(y * y, 2).sqrt()
        return y, rms_norm(o)


class ASGE(nn.Module):
    def __init__(self, spec, best_layer=None, class_names=None):
        super().__init__()
        self.spec = spec
        n = spec["classes"]
        self.layers = nn.ModuleList(Layer(l, n, spec["goodness"], spec["pool_kind"]) for l in spec["layers"])
        self.heads = nn.ModuleDict({str(i): nn.Linear(l["c_out"], n) for i, l in enumerate(spec["layers"]) if i >= 1})
        self.best_layer = len(spec["layers"]) - 1 if best_layer is None else best_layer
        self.class_names = class_names or [str(i) for i in range(n)]

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu"):
        """Builds the module from a checkpoint's metadata and loads its tensors with strict=True (a training
        checkpoint's optimizer moments, ``optim.*``, are not part of the model and are left out)."""
        tensors, meta = read_safetensors(path)
        spec = json.loads(meta["asge.model"]) if "asge.model" in meta else _spec_from_fixture(tensors, meta)
        state = json.loads(meta.get("asge.state", "null")) or {}
        names = json.loads(meta["asge.input"])["class_names"] if "asge.input" in meta else None
        # best_layer_number counts from 1; files written before it have best_layer, 0-based.
        best = state["best_layer_number"] - 1 if "best_layer_number" in state else state.get("best_layer")
        model = cls(spec, best, names)
        weights = {k: torch.from_numpy(v.copy()) for k, v in tensors.items() if not k.startswith("optim.")}
        model.load_state_dict(weights, strict=True)
        return model.to(map_location).eval()

    def all_logits(self, image):
        """Every layer's projection logits and the fusion logits, for images [N, C, S, S] in [0, 1]."""
        x = rms_norm(image)
        layers, fusion = [], 0
        for i, layer in enumerate(self.layers):
            y, x = layer(x)
            layers.append(layer.proj(layer.goodness(y)))
            if i >= 1:
                fusion = fusion + self.heads[str(i)](x.mean(dim=(2, 3)))
        return {"layers": layers, "fusion": fusion}

    def forward(self, image, strategy="fusion"):
        if strategy not in ("last", "best", "fusion"):
            raise ValueError(f"strategy {strategy!r}: last, best or fusion")
        if strategy == "fusion" and len(self.layers) < 2:
            raise ValueError("strategy fusion: a one-layer model has no fusion heads")
        read = {"last": len(self.layers) - 1, "best": self.best_layer}.get(strategy)
        x = rms_norm(image)
        fusion = 0
        for i, layer in enumerate(self.layers):
            y, x = layer(x)
            if i == read:
                return layer.proj(layer.goodness(y))
            if i >= 1:
                fusion = fusion + self.heads[str(i)](x.mean(dim=(2, 3)))
        return fusion


def _spec_from_fixture(tensors, meta):
    """The model table of a file without asge.model (the PyTorch fixtures): channels from the conv weights, the
    grid sizes from the metadata's P, the pooling layers from the released architecture."""
    arch, img = meta["arch"], int(meta["img"])
    ps = json.loads(meta["P"])
    layers, h = [], img
    for i, p in enumerate(ps):
        c_out, c_in = tensors[f"layers.{i}.conv.weight"].shape[:2]
        pool = (i + 1) in _POOLS[arch]
        layers.append({"c_in": int(c_in), "c_out": int(c_out), "h": h, "w": h, "p": p, "pool": pool})
        h = h // 2 if pool else h
    return {
        "arch": arch,
        "in_channels": int(meta["in_ch"]),
        "image_size": img,
        "classes": int(meta["classes"]),
        "goodness": meta.get("goodness", "mean"),
        "pool_kind": meta.get("downsample", "avg"),
        "layers": layers,
    }


if __name__ == "__main__":
    # python3 python/asge_torch.py CHECKPOINT DUMP [--rtol R]: the module's logits against `asge eval
    # --dump-logits DUMP --dump-inputs` (exit 1 beyond tolerance or on a prediction that differs outside a
    # near-tie).
    import argparse

    from asge_logits import compare

    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("dump")
    ap.add_argument("--rtol", type=float, default=1e-4)
    a = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = ASGE.from_checkpoint(a.checkpoint)
    dump, _ = read_safetensors(a.dump)
    x = torch.from_numpy(dump["inputs"].copy())
    failed = False
    print(f"{a.checkpoint}: {len(model.layers)} layers, loaded with strict=True, torch {torch.__version__}")
    with torch.no_grad():
        for s in ("last", "best", "fusion"):
            if s not in dump:
                continue
            got = model(x, strategy=s).numpy()
            _, over, _, unexplained = compare(s, got, dump[s], a.rtol)
            acc = float((np.argmax(got, 1) == dump["labels"]).mean())
            print(f"  {s}: top-1 {100 * acc:.2f}% on the dump's labels")
            failed |= bool(over or unexplained)
    sys.exit(1 if failed else 0)
