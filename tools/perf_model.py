#!/usr/bin/env python3
"""The analytic model of the fp16 CUDA step (docs/performance.md): every kernel a VGG training step launches, per
layer, with the useful FLOPs and the bytes it must move, its blocks and how many an SM holds, and the time it is
expected to take alone on an H100 SXM; per layer and per step the sums. Every rate below is an assumption stated
in the doc, to be replaced by a measurement; nothing here is measured.

The kernel list, FLOPs and bytes are computed from the shapes alone, independently of the engine's code, so that
they can be checked against what the engine launched: `--compare BENCH.json` reads `asge bench --save`'s report
(its kernel table: every kernel of a step timed alone) and prints the model and the measurement row by row; it
fails, naming the rows, where the two disagree on a kernel, its launches, its FLOPs or its bytes.

usage: tools/perf_model.py [WIDTH ...] [--batch B] [--classes N] [--kernels]
       tools/perf_model.py --compare BENCH.json
"""
import json
import math
import sys

SMS = 132
HGEMM = 700e12        # cuBLAS HGEMM, large square fp16 GEMM with fp32 accumulation (assumed; the bench measures it)
MMA_SYNC = 0.62 * 989e12  # what mma.sync reaches on Hopper (assumed ~62% of the wgmma-rated dense fp16 peak)
PIPE_EFF = 0.8        # the pipelined kernels' share of that (epilogue, prologue, latency at 8 warps an SM; assumed)
HBM = 3.35e12 * 0.8   # achievable DRAM bandwidth (80% of 3.35 TB/s)
KERNEL_MIN_US = 2.0   # the least a kernel takes alone, however small (ramp-up and drain; assumed)
LAUNCH_US = 2.0       # device-side gap between two kernels in a back-to-back queue without a graph (assumed)
GRAPH_US = 0.8        # the same inside a replayed CUDA graph (assumed)
THREADS = 256

VGG8 = [(128, False), (256, True), (256, False), (512, True), (512, True), (512, True), (512, False)]
# The fp16 GEMM tiles (src/backend/cuda/geometry.rs): name -> (tile_m, tile_n or tile_k, pixel step, blocks an SM
# holds by shared memory and registers).
FWD_SMALL, FWD_LARGE, FWD_SPLIT = "conv_fwd_nhwc_f16", "conv_fwd_nhwc_f16_l", "conv_fwd_nhwc_f16_sk"
WG_SMALL, WG_LARGE = "conv_wgrad_nhwc_f16", "conv_wgrad_nhwc_f16_l"
TILES = {FWD_SMALL: (64, 128, 0, 2), FWD_SPLIT: (64, 128, 0, 2), FWD_LARGE: (128, 256, 0, 1),
         WG_SMALL: (64, 128, 64, 2), WG_LARGE: (128, 256, 32, 1)}
LARGE_TILE_MIN_BLOCKS = 128


def ru(x, m):
    return (x + m - 1) // m * m


def cdiv(a, b):
    return (a + b - 1) // b


def layers(width, channels=3, side=32, alpha=1.0):
    """VGG8's layers at `width`: (c_in, c_out, side, P, pool), P the patch grid (alpha * C_L / C_l, clamped)."""
    cs = [max(8, int(math.floor(b * width / 8 + 0.5)) * 8) for b, _ in VGG8]
    c_in = channels
    for (_, pool), c in zip(VGG8, cs):
        p = min(max(1, int(math.floor(alpha * cs[-1] / c + 0.5))), side)
        yield c_in, c, side, p, pool
        c_in = c
        if pool:
            side //= 2


def goodness_bands(b, h, w, p, tile_n):
    """The most bands (a sample's cells of one row bin) one tile of tile_n consecutive pixels cuts."""
    n = b * h * w
    first = lambda row: (row // h) * p + (row % h) * p // h
    last = lambda row: (row // h) * p + cdiv(((row % h) + 1) * p, h) - 1
    period = h * w // math.gcd(h * w, tile_n)
    return max(last((min((t + 1) * tile_n, n) - 1) // w) + 1 - first(t * tile_n // w)
               for t in range(min(cdiv(n, tile_n), period)))


def layer_output_slices(c, out_hw):
    unit = 8 if out_hw >= 32 else THREADS
    slices = max(1, cdiv(c * out_hw, 2048))
    cpb = max(min(max(cdiv(c, slices), unit), c), cdiv(c, 65535))
    cpb = min(ru(cpb, 8), c, 8 * THREADS)
    return cdiv(c, cpb)


def wave_eff(blocks, per_sm):
    slots = SMS * per_sm
    return blocks / (math.ceil(blocks / slots) * slots)


def launches(width, batch, classes=10, channels=3):
    """Every kernel of one fp16 training step: dicts of layer (1-based; L + 1 for the fusion heads), kernel, flop,
    bytes, blocks, and the FLOPs the tensor cores execute (tiles rounded up)."""
    out = []
    specs = list(layers(width, channels))
    heads = []

    def k(layer, name, flop=0.0, nbytes=0.0, blocks=0, exec_flop=0.0):
        out.append(dict(layer=layer, kernel=name, flop=float(flop), bytes=float(nbytes), blocks=blocks,
                        exec_flop=float(exec_flop)))

    for i, (ci, co, s, p, pool) in enumerate(specs, 1):
        b, n = batch, batch * s * s
        cp = ru(ci, 8)
        flop = 2.0 * n * co * 9 * ci
        g_len = b * co * p * p
        # The layer's input channels-last: the batch's is copied (its 1 or 3 channels padded to 8); a layer
        # output of a multiple of 8 channels is stored so already. The weight gradient reuses the forward's copy.
        if i == 1 or ci % 8:
            k(i, "nhwc_pad_f16", nbytes=2 * (n * ci + n * cp), blocks=cdiv(n * cp // 8, THREADS))
        wlen = ru(co, 128) * ru(9 * cp, 64)
        k(i, "krsc_pad_f16", nbytes=2 * (co * ci * 9 + wlen), blocks=cdiv(wlen, THREADS))
        # The forward: the large tile where C_out >= 128 and it makes a wave; the small one below, split over K
        # when its grid gives fewer than two blocks an SM.
        large_blocks = cdiv(n, 256) * cdiv(co, 128)
        fk = FWD_LARGE if co >= 128 and large_blocks >= LARGE_TILE_MIN_BLOCKS else FWD_SMALL
        tm, tn, _, _ = TILES[fk]
        gx, gy = cdiv(n, tn), cdiv(co, tm)
        splits = 1
        steps = cdiv(9 * cp, 64)
        if fk == FWD_SMALL and gx * gy < 2 * LARGE_TILE_MIN_BLOCKS and steps >= 8:
            per = max(4, cdiv(steps, cdiv(2 * LARGE_TILE_MIN_BLOCKS, gx * gy)))
            splits = cdiv(steps, per)
        nb = goodness_bands(b, s, s, p, tn)
        gpart = gx * nb * p * co
        operands = 2 * (n * cp + co * 9 * cp) + 4 * co
        fexec = 2.0 * ru(co, tm) * ru(n, tn) * ru(9 * cp, 64)
        if splits > 1:
            part = 4 * splits * co * n
            k(i, FWD_SPLIT, flop, operands - 4 * co + part, gx * gy * splits, fexec)
            k(i, "conv_fwd_splitk_f16", nbytes=part + 4 * co + 2 * n * co + 4 * gpart, blocks=gx * gy)
        else:
            k(i, fk, flop, operands + 2 * n * co + 4 * gpart, gx * gy, fexec)
        k(i, "goodness_tiles_f32", nbytes=4 * (gpart + g_len), blocks=cdiv(g_len, THREADS))
        d = co * p * p
        k(i, "goodness_loss_f32", nbytes=4 * (2 * b * d + d * classes + b * classes), blocks=b)
        # The layer output (pool, dropout; its pooled features where the layer has a fusion head: all but the
        # first), in two passes.
        out_hw = (s // 2) ** 2 if pool else s * s
        slices = layer_output_slices(co, out_hw)
        gap = b * co if i > 1 else 0
        y_len, out_len = n * co, b * co * out_hw
        k(i, "layer_output_sumsq_f16", nbytes=2 * y_len + 4 * b * slices, blocks=b * slices)
        k(i, "layer_output_nhwc_f16", nbytes=2 * (y_len + out_len) + 4 * (b * slices + gap), blocks=b * slices)
        if i > 1:
            heads.append(co)
        # The weight gradient: dL/dg per cell, dz, the GEMM over pixel slices, their reduction.
        k(i, "dg_per_cell_f32", nbytes=8 * g_len, blocks=cdiv(g_len, THREADS))
        npix = ru(n, 64)
        db_slices = cdiv(npix, 2048)
        k(i, "dz_f16", nbytes=2 * (n * co + ru(co, 128) * npix) + 4 * g_len + 4 * db_slices * co,
          blocks=db_slices * ru(co, 128))
        wk = WG_LARGE if co >= 128 and 9 * cp >= 1024 else WG_SMALL
        tm, tk, step, _ = TILES[wk]
        wgx, wgy = cdiv(9 * cp, tk), cdiv(co, tm)
        chunk = max(ru(cdiv(npix, max(1, 512 // (wgx * wgy))), step), 256)
        gz = cdiv(npix, chunk)
        part_w = 4 * gz * co * 9 * cp
        wexec = 2.0 * ru(co, tm) * ru(9 * cp, tk) * npix
        k(i, wk, flop, 2 * (co * npix + n * cp) + part_w, wgx * wgy * gz, wexec)
        k(i, "wgrad_reduce_nhwc_f32", nbytes=part_w + 4 * db_slices * co + 4 * (co * ci * 9 + co),
          blocks=cdiv(co * ci * 9, THREADS))
        # AdamW on the weights (and their fp16 copy) and on the bias.
        for length, copy in ((co * ci * 9, 2), (co, 0)):
            k(i, "adamw_f32", nbytes=(28 + copy) * length, blocks=min(4096, cdiv(length, THREADS)))
    # The fusion heads, one per layer but the first, trained after the layers.
    h = len(specs) + 1
    for c in heads:
        k(h, "heads_logits_f32", nbytes=4 * (batch * c + classes * c + 2 * batch * classes),
          blocks=cdiv(batch * classes, THREADS))
    k(h, "heads_softmax_f32", nbytes=4 * (2 * batch * classes + batch), blocks=cdiv(batch, THREADS))
    for c in heads:
        k(h, "heads_grad_f32", nbytes=4 * (batch * c + batch * classes + classes * c + classes),
          blocks=cdiv(classes * c, THREADS))
    for c in heads:
        for length in (classes * c, classes):
            k(h, "adamw_f32", nbytes=28 * length, blocks=min(4096, cdiv(length, THREADS)))
    for r in out:
        r["us"] = expected_us(r)
    return out


def expected_us(r):
    t_mem = r["bytes"] / HBM
    if r["exec_flop"] > 0:
        per_sm = TILES[r["kernel"]][3]
        t = max(r["exec_flop"] / (MMA_SYNC * PIPE_EFF * wave_eff(r["blocks"], per_sm)), t_mem)
    else:
        t = t_mem
    return max(t * 1e6, KERNEL_MIN_US)


def by_row(ls):
    """The launches added up by (layer, kernel), in the order first launched, as the bench's kernel table."""
    rows = {}
    for r in ls:
        key = (r["layer"], r["kernel"])
        if key not in rows:
            rows[key] = dict(layer=r["layer"], kernel=r["kernel"], launches=0, flop=0.0, bytes=0.0, us=0.0,
                             blocks=r["blocks"])
        a = rows[key]
        a["launches"] += 1
        for f in ("flop", "bytes", "us"):
            a[f] += r[f]
    return list(rows.values())


def model(width, batch, classes=10):
    ls = launches(width, batch, classes)
    rows = []
    for i, (ci, co, s, p, pool) in enumerate(layers(width), 1):
        mine = [r for r in ls if r["layer"] == i]
        gemms = [r for r in mine if r["exec_flop"] > 0]
        flop = sum(r["flop"] for r in gemms)
        t = sum(r["us"] for r in mine)
        t_mem = sum(r["bytes"] for r in mine) / HBM * 1e6
        blocks = lambda names: " + ".join(f"{r['blocks']} ({r['kernel'].replace('conv_', '')})"
                                          for r in gemms if r["kernel"] in names)
        rows.append((i, ci, co, s, flop / 1e9, sum(r["bytes"] for r in mine) / 1e6,
                     blocks((FWD_SMALL, FWD_LARGE, FWD_SPLIT)), blocks((WG_SMALL, WG_LARGE)),
                     "memory" if t_mem > 0.5 * t else "compute", t, 100 * flop / (t * 1e-6) / HGEMM))
    return rows, ls


def print_model(width, batch, classes, kernels):
    rows, ls = model(width, batch, classes)
    print(f"\nVGG8 width {width:g}, batch {batch}, CIFAR 32x32 (every kernel alone, on an H100 SXM, assumed rates):\n")
    print("| layer | C_in -> C_out, side | conv GFLOP (fwd + wgrad) | MB moved (all kernels) | fwd blocks | "
          "wgrad blocks | bound | expected us (all kernels) | % of HGEMM |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} -> {r[2]}, {r[3]} | {r[4]:.2f} | {r[5]:.1f} | {r[6]} | {r[7]} | {r[8]} | "
              f"{r[9]:.0f} | {r[10]:.0f}% |")
    if kernels:
        print("\n| layer | kernel | launches | MFLOP | KB | blocks | expected us |\n|---|---|---|---|---|---|---|")
        for r in by_row(ls):
            print(f"| {r['layer']} | {r['kernel']} | {r['launches']} | {r['flop'] / 1e6:.1f} | "
                  f"{r['bytes'] / 1e3:.1f} | {r['blocks']} | {r['us']:.1f} |")
    flop = sum(r["flop"] for r in ls)
    alone = sum(r["us"] for r in ls)
    gemm_us = sum(r["us"] for r in ls if r["exec_flop"] > 0)
    print(f"\nconv GEMMs {gemm_us:.0f} us for {flop / 1e9:.1f} GFLOP ({100 * flop / (gemm_us * 1e-6) / HGEMM:.0f}% of "
          f"HGEMM); {len(ls)} launches, {alone:.0f} us of kernels alone:")
    for how, per in (("eager", LAUNCH_US), ("as a graph", GRAPH_US)):
        step = alone + len(ls) * per
        print(f"{how}: the step is ~{step:.0f} us: {100 * flop / (step / 1e6) / HGEMM:.0f}% of HGEMM on "
              f"the conv FLOPs, {batch / (step / 1e6):.0f} images/s")


def compare(path):
    """The model beside a bench report's kernel table, row by row; 1 where they disagree on the work."""
    with open(path) as f:
        r = json.load(f)
    if not r.get("kernels"):
        print(f"perf model: {path} has no kernel table (a CPU bench, or --kernel-steps 0)")
        return 1
    if not r["model"].startswith("vgg8 ") or r.get("channels") != 3:
        print(f"perf model: {path} is a bench of {r['model']}; the model knows VGG8 on 3-channel 32x32 inputs")
        return 1
    mine = {(m["layer"], m["kernel"]): m for m in by_row(launches(r["width"], r["batch"], r["classes"]))}
    theirs = {(k["layer"], k["kernel"]): k for k in r["kernels"]}
    who = "stand-in emulator, not a GPU" if r.get("emulated") else r["device"]
    print(f"the model (assumed H100 rates) beside the bench's kernel table ({who}), VGG8 width {r['width']:g}, "
          f"batch {r['batch']}:")
    print(f"{'layer':<6} {'kernel':<24} {'launches':>8} {'MFLOP':>10} {'KB':>10} {'model us':>9} {'measured us':>12}"
          f" {'ratio':>7}")
    bad = []
    for key in list(mine) + [k for k in theirs if k not in mine]:
        m, t = mine.get(key), theirs.get(key)
        if m is None or t is None:
            bad.append(f"layer {key[0]} {key[1]}: {'not launched by the engine' if t is None else 'not in the model'}")
            continue
        close = lambda a, b: abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0)
        for f in ("launches", "flop", "bytes"):
            if not close(float(m[f]), float(t[f])):
                bad.append(f"layer {key[0]} {key[1]}: {f} {m[f]:g} in the model, {t[f]:g} launched")
        layer = "heads" if key[0] > r["layers"] else str(key[0])
        print(f"{layer:<6} {key[1]:<24} {m['launches']:>8} {m['flop'] / 1e6:>10.1f} {m['bytes'] / 1e3:>10.1f} "
              f"{m['us']:>9.1f} {t['us']:>12.1f} {t['us'] / m['us']:>7.2f}")
    model_us = sum(m["us"] for m in mine.values())
    measured_us = sum(t["us"] for t in r["kernels"])
    print(f"kernels alone: {model_us:.0f} us in the model, {measured_us:.0f} us measured")
    if bad:
        for b in bad:
            print(f"perf model: DISAGREES: {b}")
        return 1
    print(f"perf model: {len(mine)} kernel rows agree with the bench's (launches, FLOPs, bytes)")
    return 0


def main(argv):
    if argv[:1] == ["--compare"] and len(argv) == 2:
        return compare(argv[1])
    batch, classes, kernels = 128, 10, False
    for opt in ("--batch", "--classes"):
        if opt in argv:
            k = argv.index(opt)
            v = int(argv[k + 1])
            batch, classes = (v, classes) if opt == "--batch" else (batch, v)
            argv = argv[:k] + argv[k + 2:]
    if "--kernels" in argv:
        kernels = True
        argv.remove("--kernels")
    widths = [float(w) for w in argv] or [1.0, 0.5, 0.25]
    for w in widths:
        print_model(w, batch, classes, kernels)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
