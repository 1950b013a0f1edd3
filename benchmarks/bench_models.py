"""Speed and memory of the model families on this machine (a benchmark: prints figures, asserts nothing).

    python benchmarks/bench_models.py [--steps 5] [--eval-images 500] [--data ../shared/datasets/cifar10/test]

Training images/s per family and prior (batch 256, 32x32, fwd+bwd+step), peak RSS, and evaluation images/s of the
bundled checkpoints (per-image entropy coding + decoding included).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models.backbones import FAMILIES
from models.data import load_image_folder
from models.evaluate import evaluate_split, load_split_model
from models.split import SplitModel, bits_per_pixel


def train_speed(arch: str, prior: str, steps: int, batch: int = 256) -> float:
    model = SplitModel(arch, prior).to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        out = model(x)
        loss = F.cross_entropy(out.logits, y) + 0.08 * bits_per_pixel(out.likelihoods, 1024)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return batch / (sum(times[1:]) / steps)  # first step is warm-up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--eval-images", type=int, default=500)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/cifar10/test"))
    args = ap.parse_args()
    rows = []
    for arch, spec in FAMILIES.items():
        if spec.paper_scale:
            continue
        for prior in ("fp", "mshp"):
            rows.append({"what": "train", "arch": arch, "prior": prior,
                         "images_per_s": round(train_speed(arch, prior, args.steps), 1)})
            print(rows[-1], flush=True)
    if Path(args.data).is_dir():
        data = load_image_folder(args.data, 32, args.eval_images, per_class=True)
        for name in ("default-fp", "default-mshp"):
            model, _ = load_split_model(name)
            res = evaluate_split(model, data, progress=False)
            rows.append({"what": "eval", "checkpoint": name, "images_per_s": round(res["images_per_s"], 1)})
            print(rows[-1], flush=True)
    print(json.dumps({"threads": torch.get_num_threads(),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": rows}))


if __name__ == "__main__":
    main()
