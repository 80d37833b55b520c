#!/usr/bin/env python3
"""The scaling model of docs/distributed.md: the bytes each rank sends per step in data-parallel, layer-parallel and
combined training, and the expected step time and efficiency on H100s over NVLink and across machines over
InfiniBand. Every time here comes from tools/perf_model.py's per-kernel model (assumed rates, not measured) and the
link rates and latencies below (assumed); the bytes are computed from the layer shapes alone, independently of the
engine's code, and `--check` matches them to what the NCCL stand-in counted (ASGE_NCCL_STANDIN_COUNT) in a run.

usage: tools/scale_model.py                          the tables of docs/distributed.md
       tools/scale_model.py --check RUN COUNTS MODE RANKS STEPS GATHERS
           RUN: a run folder (its config.json has the layer table); COUNTS: the stand-in's counter file; MODE: data
           or layers; STEPS: the optimizer steps the run took; GATHERS: the layer pipeline's gathers (one per epoch
           and per mid-epoch checkpoint)
"""
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import perf_model as pm  # noqa: E402

NVLINK_BUS = 450e9   # bytes/s an all-reduce's ring moves per GPU per direction within an 8-GPU NVLink machine (assumed)
NVLINK_P2P = 400e9   # bytes/s of one send between two GPUs of a machine (assumed)
IB_BUS = 45e9        # bytes/s per GPU across machines: 8 NICs of 400 Gb/s per 8 GPUs, ~90% of 50 GB/s (assumed)
IB_P2P = 45e9
# Seconds an all-reduce costs however small: within a machine (NCCL's low-latency protocol), plus, across M
# machines, a tree's 2 log2(M) hops over InfiniBand (assumed); and a send's.
AR_LAT_NVLINK, AR_LAT_IB_HOP = 10e-6, 15e-6
P2P_LAT_NVLINK, P2P_LAT_IB = 5e-6, 10e-6
STATS_LEN = 2

ARCHS = {
    "vgg8": [(128, False), (256, True), (256, False), (512, True), (512, True), (512, True), (512, False)],
    "vgg-imagenet": [(64, True), (128, True), (256, False), (256, True), (512, False), (512, True), (512, False),
                     (512, True)],
}


def shapes(arch, width, side):
    """(c_in, c_out, side, P, pool) per layer, as perf_model computes VGG8's, for `arch`."""
    pm.VGG8 = ARCHS[arch]
    return list(pm.layers(width, 3, side))


def compute_us(arch, width, side, batch, classes):
    """Expected microseconds of each layer's kernels on one H100 (as a graph), and of the fusion heads."""
    pm.VGG8 = ARCHS[arch]
    orig = pm.layers
    pm.layers = lambda w, channels=3, s=side, alpha=1.0: orig(w, channels, s, alpha)
    try:
        ls = pm.launches(width, batch, classes)
    finally:
        pm.layers = orig
    n = len(ARCHS[arch])
    per = [sum(r["us"] + pm.GRAPH_US for r in ls if r["layer"] == i) for i in range(1, n + 1)]
    heads = sum(r["us"] + pm.GRAPH_US for r in ls if not 1 <= r["layer"] <= n)
    return per, heads


def grads_bytes(layers, classes):
    """f32 bytes of each layer's weight and bias gradients, and of the fusion heads' (layers 2..L)."""
    conv = [4 * (co * ci * 9 + co) for ci, co, *_ in layers]
    heads = 4 * sum((co + 1) * classes for _, co, *_ in layers[1:])
    return conv, heads


def out_bytes(layers, i, batch, act_bytes=2):
    """Bytes of layer i's output (fp16 as stored) and of the pooled features of layers 2..i+1 (f32), for a batch."""
    _, co, s, _, pool = layers[i]
    s = s // 2 if pool else s
    gaps = sum(4 * batch * layers[k][1] for k in range(1, i + 1))
    return act_bytes * batch * co * s * s, gaps


def balanced(costs, parts):
    """The engine's placement (src/dist/layers.rs): contiguous groups whose largest cost is least."""
    n = len(costs)
    pre = [0.0]
    for c in costs:
        pre.append(pre[-1] + c)
    best = [[math.inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], pre[i] - pre[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    bounds, i = [n], n
    for k in range(parts, 0, -1):
        i = cut[k][i]
        bounds.append(i)
    return bounds[::-1]


def ar_lat(machines):
    return AR_LAT_NVLINK + (2 * math.log2(machines) * AR_LAT_IB_HOP if machines > 1 else 0.0)


def ring_us(nbytes, ranks, bus, lat):
    """An all-reduce of nbytes over `ranks`: 2 (n - 1) / n of the bytes at the bus rate (a ring), plus `lat`."""
    if ranks <= 1:
        return 0.0
    return 1e6 * (2 * (ranks - 1) / ranks * nbytes / bus + lat)


def data_step(t, heads_us, conv, heads_bytes, stats, ranks, bus, lat):
    """The data-parallel step: each layer's all-reduce starts after its weight gradient, on one communication
    stream, overlapping the next layers' kernels; the step ends when the last sum is in (AdamW follows, inside t)."""
    end = done = 0.0
    for tl, g in zip(t, conv):
        end += tl
        done = max(done, end) + ring_us(g, ranks, bus, lat)
    end += heads_us
    return max(done, end) + ring_us(heads_bytes + stats, ranks, bus, lat)


def layer_tick(t, heads_us, layers, bounds, batch, p2p, lat, stats, ranks):
    """The layer pipeline's tick: the slowest rank's layers, then its send (not overlapped: the next rank needs it
    to start the tick), then the statistics' all-reduce."""
    groups = [sum(t[bounds[g]:bounds[g + 1]]) for g in range(len(bounds) - 1)]
    groups[-1] += heads_us
    sends = [sum(out_bytes(layers, bounds[g + 1] - 1, batch)) for g in range(len(bounds) - 2)]
    xfer = max((1e6 * (s / p2p + lat) for s in sends), default=0.0)
    return max(groups) + xfer + ring_us(stats, ranks, 1e12, lat), sends


def table(arch, width, side, classes, batch, title):
    layers = shapes(arch, width, side)
    n = len(layers)
    conv, heads_bytes = grads_bytes(layers, classes)
    stats = 4 * STATS_LEN * (n + 2)
    t1, h1 = compute_us(arch, width, side, batch, classes)
    one = sum(t1) + h1
    macs = [ci * co * 9 * s * s for ci, co, s, *_ in layers]
    print(f"\n### {title}\n")
    print(f"{n} layers, {sum(conv + [heads_bytes]) / 1e6:.1f} MB of f32 gradients a step; one H100: {one / 1e3:.2f} ms "
          f"a step, {batch / one * 1e6:,.0f} images/s (tools/perf_model.py). Heaviest layer: "
          f"{100 * max(t1) / one:.0f}% of the step.\n")
    print("| mode | GPUs | link | images per GPU a step | MB sent per GPU a step | step ms | images/s | speed-up | "
          "efficiency |")
    print("|---|---|---|---|---|---|---|---|---|")

    def row(mode, gpus, link, per_gpu, sent, step_us):
        sp = one / step_us
        print(f"| {mode} | {gpus} | {link} | {per_gpu} | {sent / 1e6:.2f} | {step_us / 1e3:.2f} | "
              f"{batch / step_us * 1e6:,.0f} | {sp:.2f}x | {100 * sp / gpus:.0f}% |")

    row("one GPU", 1, "-", batch, 0, one)
    for gpus, machines in ((2, 1), (4, 1), (8, 1), (16, 2), (32, 4), (64, 8), (128, 16)):
        link = "NVLink" if machines == 1 else f"{machines} machines, IB"
        bus = NVLINK_BUS if machines == 1 else IB_BUS
        lat = ar_lat(machines)
        # Data parallel: every layer's gradients all-reduced over every GPU.
        if batch % gpus == 0:
            b = batch // gpus
            t, h = compute_us(arch, width, side, b, classes)
            step = data_step(t, h, conv, heads_bytes, stats, gpus, bus, lat)
            sent = 2 * (gpus - 1) / gpus * (sum(conv) + heads_bytes + stats)
            row("data", gpus, link, b, sent, step)
        # Layer parallel alone: one machine, at most a rank a layer.
        if machines == 1 and gpus <= n:
            bounds = balanced(macs, gpus)
            tick, sends = layer_tick(t1, h1, layers, bounds, batch, NVLINK_P2P, P2P_LAT_NVLINK, stats, gpus)
            row(f"layers ({','.join(map(str, bounds[1:-1]))})", gpus, link, batch, max(sends, default=0), tick)
        # Combined (on paper: not implemented yet): G layer groups, neighbours in a machine (the boundary over
        # NVLink), each group data parallel over gpus / G ranks (across machines over InfiniBand).
        for g in (2, 4):
            d = gpus // g
            if d < 2 or batch % d:
                continue
            b = batch // d
            t, h = compute_us(arch, width, side, b, classes)
            bounds = balanced(macs, g)
            worst, sends = 0.0, []
            for k in range(g):
                lo, hi = bounds[k], bounds[k + 1]
                last = k == g - 1
                worst = max(worst, data_step(t[lo:hi], h if last else 0.0, conv[lo:hi], heads_bytes if last else 0,
                                             stats, d, bus, lat))
                if not last:
                    sends.append(sum(out_bytes(layers, hi - 1, b)))
            xfer = max((1e6 * (x / NVLINK_P2P + P2P_LAT_NVLINK) for x in sends), default=0.0)
            sent = max(2 * (d - 1) / d * (sum(conv[bounds[k]:bounds[k + 1]]) + (heads_bytes if k == g - 1 else 0))
                       + (sends[k] if k < g - 1 else 0) for k in range(g))
            row(f"layers x data ({g} groups of {d})", gpus, link, b, sent, worst + xfer)


def check(run, counts, mode, ranks, steps, gathers):
    """The bytes the stand-in counted in a run, against the model's."""
    spec = json.load(open(os.path.join(run, "config.json")))["model"]
    cfg = json.load(open(os.path.join(run, "config.json")))["train"]
    ls = spec["layers"]
    layers = [(l["c_in"], l["c_out"], l["h"], l["p"], l["pool"]) for l in ls]
    n, classes = len(layers), spec["classes"]
    conv, heads_bytes = grads_bytes(layers, classes)
    stats = 4 * STATS_LEN * (n + 2)
    trained = sum(conv) + heads_bytes
    act = 2 if cfg.get("precision") == "fp16" else 4
    batch = min(cfg["batch"], cfg.get("limit_train") or cfg["batch"])
    lines = [json.loads(l) for l in open(counts)]
    bounds = balanced([ci * co * 9 * s * s for ci, co, s, *_ in layers], ranks) if mode == "layers" else None
    print(f"| rank | all-reduced f32 bytes: counted | model | sent bytes: counted | model |")
    print("|---|---|---|---|---|")
    for c in sorted(lines, key=lambda c: c["rank"]):
        r = c["rank"]
        if mode == "data":
            f32, sent = steps * (trained + stats), 0
        else:
            # Every step's statistics, and each gather of the weights and both AdamW moments; a send a tick, of
            # the workspace's whole batch, for steps + ranks - 1 ticks an epoch (the fill and the drain).
            f32 = steps * stats + gathers * 3 * trained
            ticks = steps + gathers * (ranks - 1)
            sent = 0 if r == ranks - 1 else ticks * sum(out_bytes(layers, bounds[r + 1] - 1, batch, act))
        print(f"| {r} | {c['all_reduce_f32_bytes']:,} | {f32:,} | {c['sent_bytes']:,} | {sent:,} |")


def main(argv):
    if argv[:1] == ["--check"]:
        run, counts, mode, ranks, steps, gathers = argv[1:7]
        check(run, counts, mode, int(ranks), int(steps), int(gathers))
        return 0
    table("vgg8", 1.0, 32, 10, 128, "VGG8, width 1, CIFAR-10 32x32, global batch 128")
    table("vgg8", 0.25, 32, 10, 128, "VGG8, width 0.25, CIFAR-10 32x32, global batch 128")
    table("vgg-imagenet", 1.0, 64, 1000, 1024, "vgg-imagenet, 64x64, 1000 classes, global batch 1024")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
