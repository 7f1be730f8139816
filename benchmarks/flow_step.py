"""Time of one flow training step (forward, backward, Adam) on random features, per memory layout.

    python benchmarks/flow_step.py --runs 5                   # resnet18-shaped features at 256 px
    python benchmarks/flow_step.py --channels 768,384 --sides 28,14 --batch 4   # MS-CaiT at 448 px
    python benchmarks/flow_step.py --compile                  # also torch.compile (minutes to compile on a CPU)

Says where fit time goes once features are cached: the flow alone, which
uflow and anomalib train alike. Prints the median step time and ms per image
for each variant, and the first (warm-up, compile) step separately.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from uflow.flow import FlowConfig, UFlow, negative_log_likelihood


def time_steps(channels: list[int], sides: list[int], batch: int, runs: int, channels_last: bool, compile: bool, device: str) -> tuple[float, float]:
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    flow = UFlow(FlowConfig(feature_channels=tuple(channels))).to(device, memory_format=layout)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    features = [torch.randn(batch, c, s, s, device=device).contiguous(memory_format=layout) for c, s in zip(channels, sides)]

    def step() -> None:
        z, log_det = flow(features)
        loss = negative_log_likelihood(z, log_det).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if compile:
        step = torch.compile(step)
    times = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", default="64,128,256", help="feature channels per scale, finest first")
    parser.add_argument("--sides", default="64,32,16", help="feature map side per scale, finest first")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    channels = [int(c) for c in args.channels.split(",")]
    sides = [int(s) for s in args.sides.split(",")]
    print(f"{time.strftime('%Y-%m-%d')} · {platform.machine()}, {torch.get_num_threads()} threads · device {args.device} · "
          f"features {channels} at {sides} px · batch {args.batch} · median of {args.runs} steps")
    variants = [("contiguous (NCHW)", False, False), ("channels-last", True, False)]
    if args.compile:
        variants.append(("torch.compile, NCHW", False, True))
    for name, channels_last, compile in variants:
        first, median = time_steps(channels, sides, args.batch, args.runs, channels_last, compile, args.device)
        print(f"{name:22s} step {median * 1000:8.1f} ms  ({median * 1000 / args.batch:6.1f} ms/image)  first step {first:.1f} s")


if __name__ == "__main__":
    main()
