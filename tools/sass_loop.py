#!/usr/bin/env python3
"""Counts the instructions of the main loop of each conv GEMM kernel in `cuobjdump -sass` listings.

The main loop is the smallest backward branch whose body holds every HMMA of the kernel (every FFMA in the f32
kernels, which have no HMMA): one K step (forward) or one pixel step (weight gradient) of one warp. The counts are static: each instruction once, as the listing has
it; both sides of an if are counted, and the calls into out-of-line slow paths (the IEEE division's, the
weight gradient's several-cells case), not the paths themselves.
usage: sass_loop.py [--check BASELINE] LISTING.sass ...
"""
import collections
import re
import sys

CLASSES = ["HMMA", "FFMA", "LDSM", "LDS", "STS", "LDG", "BAR"]


def functions(path):
    cur, out = None, {}
    for line in open(path):
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            out[cur] = []
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and cur:
            out[cur].append((int(m.group(1), 16), m.group(2).strip()))
    return out


def opcode(ins):
    return re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0]


def main_loop(ins):
    hmma = [a for a, i in ins if opcode(i) == "HMMA"] or [a for a, i in ins if opcode(i) == "FFMA"]
    if not hmma:
        return None
    best = None
    for a, i in ins:
        m = re.search(r"BRA (?:!?U?P\w+, )?0x([0-9a-f]+)", i)
        if m:
            t = int(m.group(1), 16)
            if t < a and t <= min(hmma) and a >= max(hmma) and (best is None or a - t < best[1] - best[0]):
                best = (t, a)
    return None if best is None else [i for a, i in ins if best[0] <= a <= best[1]]


def main(argv):
    """Prints each kernel's main-loop counts; with --check BASELINE, fails (exit 1) when a kernel listed there
    issues more instructions per MMA than its committed count (or has lost its main loop)."""
    baseline = {}
    if len(argv) >= 2 and argv[0] == "--check":
        for line in open(argv[1]):
            line = line.split("#")[0].split()
            if line:
                baseline[line[0]] = float(line[1])
        argv = argv[2:]
    seen, worse = {}, []
    for path in argv:
        for name, ins in sorted(functions(path).items()):
            body = main_loop(ins)
            if body is None:
                continue
            c = collections.Counter(opcode(i) for i in body)
            known = sum(c.get(k, 0) for k in CLASSES)
            unit = "HMMA" if c.get("HMMA") else "FFMA"
            per = len(body) / c[unit]
            seen[name] = per
            label = "MMA" if unit == "HMMA" else "FFMA"
            print(f"{name:28} {per:5.2f} instructions per {label} (main loop {len(body)}: "
                  + ", ".join(f"{k} {c.get(k, 0)}" for k in CLASSES) + f", other {len(body) - known})")
    for name, committed in baseline.items():
        if name not in seen:
            worse.append(f"{name}: no main loop found (committed {committed:.2f} instructions per MMA)")
        elif seen[name] > committed + 0.005:
            worse.append(f"{name}: {seen[name]:.2f} instructions per MMA, worse than the committed {committed:.2f}")
    if worse:
        print("SASS check failed (tools/sass-baseline.txt):\n  " + "\n  ".join(worse))
        return 1
    if baseline:
        print(f"SASS check: {len(baseline)} kernels at or below their committed instructions per MMA")
    return 0


sys.exit(main(sys.argv[1:]))
