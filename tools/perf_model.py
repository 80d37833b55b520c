#!/usr/bin/env python3
"""The analytic model of the fp16 CUDA step (docs/performance.md): per VGG8 layer at a width, the conv FLOPs, the
bytes the fp16 path moves, the blocks of each GEMM and how many an SM holds, the expected bound and time on an
H100 SXM. Every rate below is an assumption stated in the doc, to be replaced by tools/gpu-check.sh's first
measurement; nothing here is measured.
usage: tools/perf_model.py [WIDTH ...] [--batch B]
"""
import math
import sys

SMS = 132
HGEMM = 700e12        # cuBLAS HGEMM, large square fp16 GEMM with fp32 accumulation (assumed; gpu-check measures it)
MMA_SYNC = 0.62 * 989e12  # what mma.sync reaches on Hopper (assumed ~62% of the wgmma-rated dense fp16 peak)
PIPE_EFF = 0.8        # the pipelined kernels' share of that (epilogue, prologue, latency at 8 warps an SM; assumed)
HBM = 3.35e12 * 0.8   # achievable DRAM bandwidth (80% of 3.35 TB/s)
LAUNCH_US = 2.0       # device-side cost of one small kernel in a back-to-back queue without a graph (assumed)
GRAPH_US = 0.8        # the same inside a replayed CUDA graph (assumed)

VGG8 = [(128, False), (256, True), (256, False), (512, True), (512, True), (512, True), (512, False)]
# (name, tile_m, tile_n or tile_k, blocks per SM from shared memory and registers)
FWD = {"small": (64, 128, 2), "large": (128, 256, 1)}
WG = {"small": (64, 128, 2), "large": (128, 256, 1)}


def ru(x, m):
    return (x + m - 1) // m * m


def layers(width, batch):
    c_in, side = 3, 32
    for base, pool in VGG8:
        c = max(8, ru(round(base * width), 8))
        yield c_in, c, side
        c_in = c
        if pool:
            side //= 2


def wave_eff(blocks, per_sm):
    slots = SMS * per_sm
    return blocks / (math.ceil(blocks / slots) * slots)


def model(width, batch):
    rows, total = [], {"flop": 0.0, "t": 0.0, "ops": 0}
    for i, (ci, co, s) in enumerate(layers(width, batch), 1):
        n = batch * s * s
        cp = ru(ci, 8)
        useful = 2.0 * n * co * 9 * ci  # one GEMM's FLOPs with the real K
        # forward
        fk = "large" if co >= 128 and math.ceil(n / 256) * math.ceil(co / 128) >= 128 else "small"
        tm, tn, fbps = FWD[fk]
        fblocks = math.ceil(n / tn) * math.ceil(co / tm)
        fexec = 2.0 * ru(co, tm) * ru(n, tn) * ru(9 * cp, 64)
        # Only an input whose channels are not a multiple of 8 (the first layer's) is copied channels-last (pad
        # pass r+w); the others are stored so by the previous layer's output. The conv reads xn, writes y.
        copied = ci % 8 != 0
        fbytes = (2 * (n * ci + n * cp) if copied else 0) + 2 * (n * cp) + 2 * n * co
        ft_c = fexec / (MMA_SYNC * PIPE_EFF * wave_eff(fblocks, fbps))
        ft_m = fbytes / HBM
        # weight gradient (split over pixels into >= 512 blocks)
        wk = "large" if co >= 128 and 9 * cp >= 1024 else "small"
        tm, tk, bps = WG[wk]
        gxy = math.ceil(9 * cp / tk) * math.ceil(co / tm)
        wblocks = gxy * max(1, math.ceil(ru(n, 64) / max(256, ru(math.ceil(ru(n, 64) / max(1, 512 // gxy)), 64))))
        wexec = 2.0 * ru(co, tm) * ru(9 * cp, tk) * ru(n, 64)
        wbytes = 2 * n * co + 2 * 2 * ru(co, 128) * ru(n, 64) + 2 * n * cp  # y, dz w+r, the forward's xn read
        wt_c = wexec / (MMA_SYNC * PIPE_EFF * wave_eff(wblocks, bps))
        wt_m = wbytes / HBM
        t = max(ft_c, ft_m) + max(wt_c, wt_m)
        bound = "compute" if ft_c + wt_c > ft_m + wt_m else "memory"
        total["flop"] += 2 * useful
        total["t"] += t
        # per layer: the weights' layout copy (and the input's where copied), conv, goodness, loss, dg, dz, wgrad,
        # reduce, 2 layer output, 2 AdamW
        total["ops"] += 12 + copied
        rows.append((i, ci, co, s, 2 * useful / 1e9, (fbytes + wbytes) / 1e6, f"{fblocks} ({fk}, {fbps}/SM)",
                     f"{wblocks} ({wk}, {bps}/SM)", bound, t * 1e6, 100 * 2 * useful / t / HGEMM))
    return rows, total


def main(argv):
    batch = 128
    if "--batch" in argv:
        k = argv.index("--batch")
        batch = int(argv[k + 1])
        argv = argv[:k] + argv[k + 2:]
    widths = [float(w) for w in argv] or [1.0, 0.5, 0.25]
    for w in widths:
        rows, tot = model(w, batch)
        print(f"\nVGG8 width {w:g}, batch {batch}, CIFAR 32x32:\n")
        print("| layer | C_in -> C_out, side | conv GFLOP (fwd + wgrad) | MB moved | fwd blocks | wgrad blocks | bound | "
              "expected us | % of HGEMM |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} -> {r[2]}, {r[3]} | {r[4]:.2f} | {r[5]:.1f} | {r[6]} | {r[7]} | {r[8]} | "
                  f"{r[9]:.0f} | {r[10]:.0f}% |")
        print(f"\nconv GEMMs {tot['t'] * 1e6:.0f} us for {tot['flop'] / 1e9:.1f} GFLOP "
              f"({100 * tot['flop'] / tot['t'] / HGEMM:.0f}% of HGEMM); ~{tot['ops']} launches and the side ops:")
        for how, per in (("eager", LAUNCH_US), ("as a graph", GRAPH_US)):
            side_us = tot["ops"] * per + 10 * 7  # launches, and ~10 us of memory-bound side ops a layer
            step = tot["t"] * 1e6 + side_us
            print(f"{how}: the step is ~{step:.0f} us: {100 * tot['flop'] / (step / 1e6) / HGEMM:.0f}% of HGEMM on "
                  f"the conv FLOPs, {batch / (step / 1e6):.0f} images/s")


main(sys.argv[1:])
