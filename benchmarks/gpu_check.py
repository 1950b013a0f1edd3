"""Checks that need a CUDA GPU: the server's tail on CUDA over real gRPC, and the entropy attack's speed.

1. Serving: a server with ``--device cuda`` and one with ``--device cpu`` on loopback receive the same coded
   streams (the package's sample images, coded by the torch-free edge); predictions must agree with the in-process
   CPU model (TF32 convolutions may flip a near-tie), throughput is measured over pipelined InferStream calls.
2. Attack: entropy PGD (L∞, 20 steps, EOT 16) on the sample images on CUDA vs CPU: seconds, and the real coded
   bytes of the results (coded on the CPU with the same codec).

Prints one JSON document; ``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def serve_check(prior: str, images: np.ndarray, repeat: int, devices: list[str]) -> dict:
    from edge_client.client import EdgeClient
    from edge_client.runtime import EdgeEncoder
    from models.evaluate import load_split_model
    from models.export import export_bundle
    from server.service import RunningServer, ServerConfig

    name = f"default-{prior}"
    bundle = Path(tempfile.mkdtemp()) / "bundle"
    export_bundle(name, bundle)
    encoder = EdgeEncoder(bundle)
    encs = encoder.encode(images)
    model, _ = load_split_model(name)
    codec = model.codec_model()
    with torch.no_grad():
        y_hat = np.stack([codec.decode(e.data, e.index_checksum if prior == "mshp" else None) for e in encs])
        reference = model.decode_tail(torch.from_numpy(y_hat)).argmax(1).numpy()
    out: dict = {}
    for device in devices:
        server = RunningServer(ServerConfig(insecure=True, checkpoint=name, port=0, device=device, decode_workers=8,
                                            max_batch=64, max_delay_ms=2.0))
        try:
            client = EdgeClient(f"127.0.0.1:{server.port}", encoder.bundle, timeout=60)
            reqs = [client.request(e) for e in encs]  # fresh request ids: no reply comes from the cache
            preds = [r.top_k[0].label for r in client.infer_stream(reqs, timeout=120)]  # warm-up and agreement
            t0 = time.perf_counter()
            n = 0
            for _ in range(repeat):
                replies = list(client.infer_stream([client.request(e) for e in encs], timeout=300))
                n += len(replies)
            seconds = time.perf_counter() - t0
            batches = [r.batch_size for r in replies]
            out[device] = {"agree_with_cpu_model": int(np.sum(np.array(preds) == reference)), "images": len(encs),
                           "images_per_s": n / seconds, "mean_batch": float(np.mean(batches)),
                           "tail_ms_mean": float(np.mean([r.tail_ms for r in replies])),
                           "decode_ms_mean": float(np.mean([r.decode_ms for r in replies]))}
            client.close()
        finally:
            server.stop(1)
    return out


def attack_check(images: np.ndarray, steps: int, eot: int, devices: list[str]) -> dict:
    from models.evaluate import load_split_model
    from resilience.attacks import entropy_pgd

    model, _ = load_split_model("default-mshp")
    codec = model.codec_model()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255

    def real_bytes(batch: torch.Tensor) -> float:
        with torch.no_grad():
            y = model.encode_latent(batch)
            z = model.entropy.side_latent(y)
        return float(np.mean([len(codec.encode(y[i].numpy(), z[i].numpy()).data) for i in range(len(y))]))

    out = {"clean_bytes": real_bytes(x)}
    for device in devices:
        m = model.to(device)
        xd = x.to(device)
        entropy_pgd(m, xd[:8], eps=8 / 255, steps=2, eot_iter=eot, seed=0)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        adv = entropy_pgd(m, xd, eps=8 / 255, steps=steps, eot_iter=eot, seed=0)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        model.to("cpu")
        adv_u8 = (adv.cpu() * 255).round() / 255
        out[device] = {"seconds": seconds, "images_per_s": len(x) / seconds, "attacked_bytes": real_bytes(adv_u8)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="passes over the images when timing serving")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eot", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--devices", default="cuda,cpu")
    args = ap.parse_args()
    devices = args.devices.split(",")
    if "cuda" in devices and not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 2
    from models.data import load_image_folder

    data = load_image_folder(ROOT / "splitinfer" / "sample_images", use_cache=False)
    doc = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__,
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "cpu_threads": torch.get_num_threads(),
           "images": len(data.images)}
    for prior in ("fp", "mshp"):
        doc[f"serve_{prior}"] = serve_check(prior, data.images, args.repeat, devices)
        print(json.dumps({f"serve_{prior}": doc[f"serve_{prior}"]}), flush=True)
    doc["attack"] = attack_check(data.images, args.steps, args.eot, devices)
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
