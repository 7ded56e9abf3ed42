"""``python -m gradad.deploy MODEL IMAGE... [--backend openvino]``: scores images with an exported
model, one JSON object per image on stdout (numpy, Pillow and a runtime only)."""
from __future__ import annotations

import argparse
import json
import sys

from .scorer import BACKENDS, Scorer


def main(argv=None) -> int:
    """``python -m gradad.deploy MODEL IMAGE...``: one JSON line per image."""
    parser = argparse.ArgumentParser(prog="python -m gradad.deploy", description=main.__doc__)
    parser.add_argument("model", help="exported model (.onnx or OpenVINO .xml) with its .json beside it")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--threshold", type=float, help="decision threshold instead of the metadata's")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, help="the runtime's threads in all (default: its own choice)")
    parser.add_argument("--streams", type=int, default=1,
                        help="parts of a batch scored at once, each on its share of the threads (default 1)")
    args = parser.parse_args(argv)
    scorer = Scorer(args.model, backend=args.backend, threshold=args.threshold, threads=args.threads,
                    streams=args.streams)
    for path, pred in zip(args.images, scorer.predict(args.images, batch_size=args.batch_size)):
        print(json.dumps({"path": path, "score": pred.score, "anomalous": pred.anomalous,
                          "threshold": scorer.threshold}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
