"""What attention hooks cost when none is installed: sampling time against a U-Net whose attention
layers call fused ``scaled_dot_product_attention`` directly (the code before hooks), interleaved
rounds, median ratio; and the cost of a hook that only reads the probabilities (the explicit path).

    python benchmarks/attention_hooks.py [--rounds 7] [--channels 64] [--size 16] [--batch 32]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results  # noqa: E402

from difflab import denoisers, schedules  # noqa: E402
from difflab.cond import Cond  # noqa: E402
from difflab.nn import AttentionHook, UNet, attention_hooks  # noqa: E402
from difflab.nn import unet as unet_module  # noqa: E402
from difflab.samplers import sample_dpmpp_2m  # noqa: E402


def direct(self, q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--context", type=int, default=0, help="text context width (0: self-attention only)")
    args = p.parse_args()
    torch.manual_seed(0)
    net = UNet(3, channels=args.channels, channel_mult=(1, 2), attn_levels=(0, 1), head_dim=32,
               context_dim=args.context or None).eval()
    d = denoisers.build("edm", net, schedules.EDM(), 0.5)
    cond = Cond(context=torch.randn(args.batch, 8, args.context)) if args.context else None
    sigmas = schedules.EDM().sigmas(args.steps, "karras")
    x = torch.randn(args.batch, 3, args.size, args.size) * sigmas[0]
    hooked = unet_module._Attending.attend

    def run() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            sample_dpmpp_2m(d, x, sigmas, cond, progress=False)
        return time.perf_counter() - t0

    times = {"direct SDPA (before hooks)": [], "hooks, none installed": [], "a reading hook on every layer": []}
    run()  # warm-up
    for _ in range(args.rounds):
        unet_module._Attending.attend = direct
        times["direct SDPA (before hooks)"].append(run())
        unet_module._Attending.attend = hooked
        times["hooks, none installed"].append(run())
        with attention_hooks(net, AttentionHook()):
            times["a reading hook on every layer"].append(run())
    base = statistics.median(times["direct SDPA (before hooks)"])
    rows = [{"variant": k, "median s": round(statistics.median(v), 4),
             "ratio": round(statistics.median([t / b for t, b in zip(v, times["direct SDPA (before hooks)"])]), 4)}
            for k, v in times.items()]
    print(table(rows, ["variant", "median s", "ratio"]))
    print(f"(dpmpp_2m x{args.steps}, batch {args.batch}, {args.size}x{args.size}, c{args.channels}; "
          f"direct median {base:.4f} s)")
    print(f"wrote {write_results(__file__, {'settings': vars(args), 'rows': rows, 'times': times})}")


if __name__ == "__main__":
    main()
