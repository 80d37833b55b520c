"""Checks asge's ONNX exports against the engine: runs each exported graph with onnxruntime on the images of an
`asge eval --dump-logits FILE --dump-inputs` file and compares its logits with the engine's.

    python3 tools/onnx_check.py DUMP.safetensors last=last.onnx best=best.onnx fusion=fusion.onnx [--rtol 1e-4]

Fails (exit 1) when a graph does not pass onnx.checker, when any logit differs from the engine's by more than
rtol times its row's largest logit, or when a prediction differs where the top-2 margin is not a near-tie.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from asge_logits import compare, read_safetensors  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dump")
    ap.add_argument("graphs", nargs="+", help="strategy=file.onnx")
    ap.add_argument("--rtol", type=float, default=1e-4)
    a = ap.parse_args()
    tensors, meta = read_safetensors(a.dump)
    x = tensors["inputs"]
    failed = False
    for spec in a.graphs:
        strategy, path = spec.split("=", 1)
        model = onnx.load(path)
        onnx.checker.check_model(model, full_check=True)
        opset = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {"image": x.astype(np.float32)})[0]
        print(f"{path}: opset {opset[0]}, {len(model.graph.node)} nodes")
        worst, over, differ, unexplained = compare(strategy, got, tensors[strategy], a.rtol)
        if over or unexplained:
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
