"""Wire-path figures (a benchmark: prints figures, asserts nothing).

    python benchmarks/bench_wire.py [--images 300] [--batch 32]

* edge head + encode ms/image, batch 1: onnxruntime (the edge runtime) vs eager torch;
* server images/s over gRPC on loopback with dynamic batching vs the bare tail (decoder + tail) at the same batch;
* payload bytes (coded stream), serialized message bytes and estimated bytes (-log2 p / 8) per image.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from edge_client.client import EdgeClient
from edge_client.runtime import EdgeEncoder
from models.data import to_tensor
from models.evaluate import load_split_model
from models.export import export_bundle
from server.service import RunningServer, ServerConfig
from tests.conftest import eval_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    images, _ = eval_images(args.images)
    results = []
    for prior in ("fp", "mshp"):
        name = f"default-{prior}"
        model, _ = load_split_model(name)
        codec = model.codec_model()
        bundle = tempfile.mkdtemp(prefix=f"bundle-{prior}-")
        export_bundle(name, bundle)
        encoder = EdgeEncoder(bundle)
        t = time.perf_counter()
        encoded = [encoder.encode(images[i:i + 1])[0] for i in range(len(images))]
        ort_ms = (time.perf_counter() - t) * 1000 / len(images)
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(len(images)):
                y = model.encode_latent(to_tensor(images[i:i + 1]))
                z = model.entropy.side_latent(y)
                codec.encode(y[0].numpy(), None if z is None else z[0].numpy())
        torch_ms = (time.perf_counter() - t) * 1000 / len(images)
        with torch.no_grad():
            lik = model.entropy(model.encode_latent(to_tensor(images))).likelihoods
            est = float(sum((-torch.log2(v)).sum() for v in lik.values()) / 8 / len(images))

        server = RunningServer(ServerConfig(insecure=True, checkpoint=name, port=0, max_batch=args.batch,
                                            max_delay_ms=5.0))
        client = EdgeClient(f"127.0.0.1:{server.port}", encoder.bundle, timeout=60)
        requests = [client.request(e) for e in encoded]
        list(client.infer_stream(requests[:args.batch]))  # warm-up
        t = time.perf_counter()
        replies = list(client.infer_stream(requests))
        server_ips = len(replies) / (time.perf_counter() - t)
        batches = [r.batch_size for r in replies]
        client.close()
        server.stop(1.0)

        y_hat = torch.from_numpy(np.stack([codec.decode(e.data, e.index_checksum) for e in encoded[:args.batch]]))
        with torch.no_grad():
            model.decode_tail(y_hat)
            t = time.perf_counter()
            reps = max(1, len(images) // args.batch)
            for _ in range(reps):
                model.decode_tail(y_hat)
            tail_ips = reps * args.batch / (time.perf_counter() - t)
        row = {"prior": prior, "edge_ms_onnxruntime": round(ort_ms, 2), "edge_ms_torch": round(torch_ms, 2),
               "server_images_per_s": round(server_ips, 1), "mean_batch": round(float(np.mean(batches)), 1),
               "bare_tail_images_per_s": round(tail_ips, 1), "payload_bytes": round(float(np.mean(
                   [len(e.data) for e in encoded])), 1), "message_bytes": round(float(np.mean(
                   [r.ByteSize() for r in requests])), 1), "estimated_bytes": round(est, 1)}
        results.append(row)
        print(row, flush=True)
    print(json.dumps({"images": args.images, "torch_threads": torch.get_num_threads(), "rows": results}))


if __name__ == "__main__":
    main()
