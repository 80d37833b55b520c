#!/usr/bin/env python3
"""The ASGE training step of the authors' released recipe, written in PyTorch from docs/method.md
(this project's own code), timed at the same shapes and thread count as `asge bench`.

Per batch, as the released code does it (eager, fp32): for every layer, conv -> ReLU -> patch goodness
(adaptive_avg_pool2d of y^2) -> fixed projection -> cross-entropy -> backward into that conv only -> its own
AdamW step -> 2x2 avg pool (where the layer pools) -> dropout 0.1 -> per-sample RMS norm -> detach; then the
fusion heads (Linear on the global average pool of layers 2..L, logits summed) with their own AdamW.

    PYTHONPATH=<torch> python3 tools/torch_step.py --width 0.25 --batch 128 --threads 2 [--json]
    ... --device cuda [--channels-last-fp16]      (on a GPU: the same step with channels-last + fp16 autocast)

Prints images/s (median over --rounds timed rounds of --steps steps each).
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

VGG8 = [(128, False), (256, True), (256, False), (512, True), (512, True), (512, True), (512, False)]
VGG11 = [(128, False), (256, True), (256, False), (512, True), (512, False), (512, True), (512, False),
         (512, True), (512, False), (512, False)]
TINY = math.exp(-50)


def scale(c, width):
    return max(8, int(round(c * width / 8)) * 8)


def rms_norm(x):
    return x / (x.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt() + TINY)


class Layer(nn.Module):
    def __init__(self, c_in, c_out, pool, p, classes, lr, wd):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)
        self.register_buffer("proj", torch.randn(c_out * p * p, classes) / math.sqrt(classes))
        self.register_buffer("proj_b", torch.randn(classes) / math.sqrt(classes))
        self.pool, self.p = pool, p
        self.opt = torch.optim.AdamW(self.conv.parameters(), lr=lr, weight_decay=wd)

    def train_step(self, x, labels, amp):
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=amp):
            y = F.relu(self.conv(x))
            g = F.adaptive_avg_pool2d(y.float() * y.float(), self.p).flatten(1)
            loss = F.cross_entropy(g @ self.proj + self.proj_b, labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            o = F.avg_pool2d(y, 2) if self.pool else y
            o = F.dropout(o.float(), 0.1, training=True)
            return rms_norm(o).to(x.dtype)


class Asge(nn.Module):
    def __init__(self, arch, width, channels, classes, lr=2e-4, wd=1e-3):
        super().__init__()
        chans = [scale(c, width) for c, _ in arch]
        c_last = chans[-1]
        layers, c_in, h = [], channels, 32
        for c, (_, pool) in zip(chans, arch):
            p = min(max(1, round(c_last / c)), h)
            layers.append(Layer(c_in, c, pool, p, classes, lr, wd))
            c_in, h = c, (h // 2 if pool else h)
        self.layers = nn.ModuleList(layers)
        self.heads = nn.ModuleList(nn.Linear(c, classes) for c in chans[1:])
        for hd in self.heads:
            nn.init.kaiming_normal_(hd.weight, nonlinearity="relu")
            nn.init.zeros_(hd.bias)
        self.head_opt = torch.optim.AdamW(self.heads.parameters(), lr=lr, weight_decay=wd)

    def train_step(self, x, labels, amp=False):
        feats = []
        for i, layer in enumerate(self.layers):
            x = layer.train_step(x, labels, amp)
            if i >= 1:
                feats.append(x.float().mean(dim=(2, 3)))
        logits = sum(h(f) for h, f in zip(self.heads, feats))
        loss = F.cross_entropy(logits - logits.max(dim=1, keepdim=True).values.detach(), labels)
        self.head_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.head_opt.step()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vgg8", choices=["vgg8", "vgg11"])
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--channels-last-fp16", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                    help="TF32 on CUDA: 'default' pins PyTorch's defaults, which the authors' released code runs "
                         "with (cuDNN convolutions TF32 on, matmul off); 'on'/'off' set both")
    a = ap.parse_args()
    conv_tf32, mm_tf32 = {"default": (True, False), "on": (True, True), "off": (False, False)}[a.tf32]
    torch.backends.cudnn.allow_tf32 = conv_tf32
    torch.backends.cuda.matmul.allow_tf32 = mm_tf32
    tf32 = f"tf32 conv {'on' if conv_tf32 else 'off'} matmul {'on' if mm_tf32 else 'off'}"
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(42)
    dev = torch.device(a.device)
    model = Asge(VGG8 if a.model == "vgg8" else VGG11, a.width, a.channels, a.classes).to(dev)
    x = rms_norm(torch.rand(a.batch, a.channels, 32, 32, device=dev))
    labels = torch.randint(0, a.classes, (a.batch,), device=dev)
    amp = a.channels_last_fp16
    if amp:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up: allocator, oneDNN/cuDNN algorithm choice
        model.train_step(x, labels, amp)
    sync()
    rates = []
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        for _ in range(a.steps):
            model.train_step(x, labels, amp)
        sync()
        rates.append(a.steps * a.batch / (time.perf_counter() - t0))
    med = statistics.median(rates)
    variant = "channels-last+fp16" if amp else "fp32 eager"
    if a.json:
        print(json.dumps({"images_per_s": med, "rounds": rates, "threads": torch.get_num_threads(),
                          "variant": variant, "torch": torch.__version__, "device": str(dev), "tf32": tf32}))
    else:
        print(f"torch {torch.__version__} {dev} {variant} ({tf32}), {torch.get_num_threads()} threads: "
              f"{a.model} width {a.width} batch {a.batch}: {med:.1f} images/s (rounds {', '.join(f'{r:.1f}' for r in rates)})")


if __name__ == "__main__":
    main()
