"""Train a small PyTorch CNN from a loader server, on the GPU when there is one.

    loader-server demo --out /tmp/demo-images
    loader-server serve --data /tmp/demo-images --size 64x64 --layout chw &
    python examples/torch_loop.py --epochs 2

With --checkpoint-dir (or CHECKPOINT_DIR, as docker/compose.yaml sets it) each epoch ends with
DIR/last.pt: the model, the optimizer and the loader's position (`state_dict()`), written to a
temporary file and renamed, so a killed run never leaves half a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from loader_client import client_options_from_env
from loader_client.torch import LoaderDataset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default=None,
                        help="default: LOADER_ENDPOINTS (comma-separated, several loader hosts) or LOADER_ENDPOINT, "
                             "with CURVE keys from LOADER_SERVER_PUBLIC_KEY and LOADER_CLIENT_KEYS; "
                             "else tcp://127.0.0.1:5555")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--checkpoint-dir", default=os.environ.get("CHECKPOINT_DIR"),
                        help="write DIR/last.pt after every epoch (default: CHECKPOINT_DIR; none when unset)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.endpoint:
        options: dict = {"endpoint": args.endpoint}
    elif os.environ.get("LOADER_ENDPOINTS") or os.environ.get("LOADER_ENDPOINT"):
        options = client_options_from_env()  # a Kubernetes manifest holds the endpoints and key paths
    else:
        options = {"endpoint": "tcp://127.0.0.1:5555"}
    endpoint = options.pop("endpoint")
    # pinned only where an accelerator exists
    dataset = LoaderDataset(endpoint, timeout_s=60, device=device, **options)  # type: ignore[arg-type]
    client = dataset.client
    chw = client.info["layout"] == "chw"
    channels = client.x_shape[0] if chw else client.x_shape[-1]
    classes = client.num_classes or 1000  # from the server's handshake
    model = torch.nn.Sequential(
        torch.nn.Conv2d(channels, 16, 3, stride=2), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, classes),
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    try:
        for epoch in range(1, args.epochs + 1):
            started, total, steps = time.perf_counter(), 0.0, 0
            for x, y in dataset:
                if not chw:
                    x = x.permute(0, 3, 1, 2)  # HWC batch viewed as NCHW
                loss = torch.nn.functional.cross_entropy(model(x.float().div_(255)), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, steps = total + loss.item(), steps + 1
            print(f"epoch {epoch}: loss {total / steps:.4f}, {steps} steps, "
                  f"{steps * client.batch_size / (time.perf_counter() - started):.0f} images/s on {device}, "
                  f"waited {client.wait_s:.2f} s for data in total", flush=True)
            if args.checkpoint_dir:
                path = os.path.join(args.checkpoint_dir, "last.pt")
                torch.save({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "loader": dataset.state_dict()}, path + ".partial")
                os.replace(path + ".partial", path)
                print(f"epoch {epoch}: checkpoint {path}", flush=True)
    finally:
        dataset.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
