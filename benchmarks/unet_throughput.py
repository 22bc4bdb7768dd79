"""difflab's UNet vs diffusers' UNet2DModel at equal widths, blocks and attention.

Measures training steps/s (forward, MSE backward, AdamW step) and sampling
forwards/s (no_grad), interleaved round by round in one process, and reports
the median of each and their ratio (difflab / diffusers; > 1 means difflab is
faster). diffusers is a benchmark-only dependency: ``pip install -e .[bench]``.

    python benchmarks/unet_throughput.py [--rounds 7] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results  # noqa: E402

from difflab.cond import Cond  # noqa: E402
from difflab.nn import UNet  # noqa: E402

CASES = [  # name, in_ch, size, batch, channels, mult, blocks, attn_levels, head_dim, groups, classes
    ("digits-default 8x8", 1, 8, 128, 32, (1, 2), 1, (1,), 32, 8, 10),
    ("rgb 32x32", 3, 32, 32, 64, (1, 2, 2), 2, (1, 2), 32, 32, 10),
]


def build_pair(in_ch, channels, mult, blocks, attn_levels, head_dim, groups, classes):
    from diffusers import UNet2DModel

    ours = UNet(in_ch, channels=channels, channel_mult=mult, num_res_blocks=blocks, attn_levels=attn_levels,
                head_dim=head_dim, groups=groups, num_classes=classes, scale_shift=True)
    down = tuple("AttnDownBlock2D" if i in attn_levels else "DownBlock2D" for i in range(len(mult)))
    up = tuple("AttnUpBlock2D" if i in attn_levels else "UpBlock2D" for i in reversed(range(len(mult))))
    theirs = UNet2DModel(sample_size=None, in_channels=in_ch, out_channels=in_ch,
                         block_out_channels=tuple(channels * m for m in mult), layers_per_block=blocks,
                         down_block_types=down, up_block_types=up, attention_head_dim=head_dim,
                         norm_num_groups=groups, num_class_embeds=classes + 1,
                         resnet_time_scale_shift="scale_shift", flip_sin_to_cos=True, freq_shift=0)
    return ours, theirs


def forward_fn(model, is_ours):
    if is_ours:
        return lambda x, t, y: model(x, t, Cond(labels=y))
    return lambda x, t, y: model(x, t, class_labels=y).sample


def time_train(fwd, model, x, t, y, iters):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    start = time.perf_counter()
    for _ in range(iters):
        loss = (fwd(x, t, y) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return iters / (time.perf_counter() - start)


@torch.no_grad()
def time_sample(fwd, model, x, t, y, iters):
    model.eval()
    start = time.perf_counter()
    for _ in range(iters):
        fwd(x, t, y)
    sync()
    return iters / (time.perf_counter() - start)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    rows = []
    for name, in_ch, size, batch, *arch in CASES:
        torch.manual_seed(0)
        ours, theirs = (m.to(args.device) for m in build_pair(in_ch, *arch))
        n_ours, n_theirs = (sum(q.numel() for q in m.parameters()) for m in (ours, theirs))
        x = torch.randn(batch, in_ch, size, size, device=args.device)
        t = torch.rand(batch, device=args.device) * 999
        y = torch.randint(0, arch[-1], (batch,), device=args.device)
        models = {"difflab": (forward_fn(ours, True), ours), "diffusers": (forward_fn(theirs, False), theirs)}
        speed = {(lib, kind): [] for lib in models for kind in ("train", "sample")}
        for lib, (fwd, m) in models.items():  # warm-up
            time_train(fwd, m, x, t, y, 2)
            time_sample(fwd, m, x, t, y, 2)
        for _ in range(args.rounds):  # interleaved rounds
            for lib, (fwd, m) in models.items():
                speed[lib, "train"].append(time_train(fwd, m, x, t, y, args.iters))
                speed[lib, "sample"].append(time_sample(fwd, m, x, t, y, args.iters))
        med = {k: statistics.median(v) for k, v in speed.items()}
        rows.append({"case": name, "batch": batch, "params difflab": n_ours, "params diffusers": n_theirs,
                     "param ratio": round(n_ours / n_theirs, 4),
                     "train it/s difflab": round(med["difflab", "train"], 2),
                     "train it/s diffusers": round(med["diffusers", "train"], 2),
                     "train ratio": round(med["difflab", "train"] / med["diffusers", "train"], 3),
                     "fwd/s difflab": round(med["difflab", "sample"], 2),
                     "fwd/s diffusers": round(med["diffusers", "sample"], 2),
                     "sample ratio": round(med["difflab", "sample"] / med["diffusers", "sample"], 3)})
    cols = list(rows[0])
    print(table(rows, cols))
    path = write_results(__file__, {"device": args.device, "rounds": args.rounds, "iters": args.iters, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
