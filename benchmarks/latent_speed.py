"""Training-step time of latent vs pixel diffusion at equal U-Net width (issue: latent diffusion).

Three text-conditional U-Nets, each built from its config by the trainer's ``build_unet``:
  - latent 8x8x4: ``configs/shapes-latent.yaml`` (VAE latents of 32x32 images): widths 32 and 64,
    attention at its 4x4 bottom;
  - pixel 16x16x3: the pixel model of the conditioning issue (``configs/shapes-text.yaml``): widths
    32, 64 and 64, attention at 8x8 and at its 4x4 bottom;
  - pixel 32x32x3: ``configs/shapes-text.yaml`` at ``data.image_size=32``, the latent model's output size.
Each step is what the trainer does: look up the text condition of 96 captions of the shapes world
in the MiniLM embedding table (10% dropped to the empty prompt, padding cut to the batch's longest
caption), EDM loss on random data of the model's shape, backward, gradient clipping, the trainer's
fused AdamW. The latents are cached before training, so the latent step does not run the VAE. Models
are timed round-robin, ``--steps`` steps each per round, for ``--rounds`` rounds; the table gives the
median seconds per step, and the floating-point work of one step (convolutions and matrix products,
forward and backward, counted by ``torch.utils.flop_counter``): the FLOP ratio is the speed-up a
step could reach if both models ran at the same FLOP rate (attention kernels are not counted:
torch's counter has no CPU formula for them). The cross-attention K/V projections of the 384-d text
context cost the same at every resolution, so the FLOPs fall less than the number of positions.

``--channels`` widens all three U-Nets alike (base width; the configs' is 32).

    python benchmarks/latent_speed.py [--rounds 5] [--steps 5] [--threads 2] [--channels 32]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results  # noqa: E402

from difflab.config import load_config  # noqa: E402
from difflab.train.build import adamw, build_denoiser, build_unet, data_shape  # noqa: E402
from difflab.train.trainer import batch_indices  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = [  # name, config, overrides ({vae}: a stand-in for the VAE run, see vae_stand_in)
    ("latent 8x8x4 (32x32 images)", "shapes-latent.yaml", ["model.vae={vae}"]),
    ("pixel 16x16x3 (conditioning issue)", "shapes-text.yaml", []),
    ("pixel 32x32x3 (same output size)", "shapes-text.yaml", ["data.image_size=32"])]


def vae_stand_in(folder: Path) -> Path:
    """A run folder holding only ``configs/shapes-vae.yaml`` as its config: the latent model's U-Net and
    data shape follow from it, and the step never runs the VAE, so none need be trained."""
    shutil.copy(ROOT / "configs" / "shapes-vae.yaml", folder / "config.yaml")
    return folder


def text_conditions(cfg):
    """The trainer's text conditioner for the shapes captions and a function giving step k's labels."""
    from difflab.conditioning import conditioner_for
    from difflab.data import load_shapes_data

    data = load_shapes_data(cfg.data)
    conditioner = conditioner_for(cfg, data)
    labels = conditioner.labels(data.captions)
    t = cfg.train

    def batch_labels(k: int, batch: int):
        g = torch.Generator().manual_seed(k)
        rows = labels[batch_indices(k, batch, len(labels), t.seed)]
        return torch.where(torch.rand(batch, generator=g) < t.label_dropout, conditioner.null_index, rows)

    return conditioner, batch_labels


def make_step(cfg, batch: int, conditioner, batch_labels):
    torch.manual_seed(0)
    net = build_unet(cfg, conditioner)
    denoiser = build_denoiser(cfg, net)
    opt = adamw(net, 1e-4)
    g = torch.Generator().manual_seed(0)
    shape = (batch, *data_shape(cfg))
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    sigma = denoiser.schedule.sample_sigma(batch, g).float()
    count = iter(range(10**9))

    def step():
        cond = conditioner.cond(batch_labels(next(count), batch))
        loss = denoiser.loss(x0, sigma, noise, cond).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    return step, sum(p.numel() for p in net.parameters())


def unet_shape(cfg) -> dict:
    return {k: getattr(cfg.model, k) for k in ("channels", "channel_mult", "attn_levels")}


def step_flops(step) -> int:
    """Convolution and matmul FLOPs of one step (attention kernels are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels", type=int, default=None, help="U-Net base width (default: the configs')")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    width = [f"model.channels={args.channels}"] if args.channels else []
    with tempfile.TemporaryDirectory() as folder:  # the stand-in is read while the U-Nets are built
        vae = vae_stand_in(Path(folder))
        configs = {name: load_config(ROOT / "configs" / file, [*(o.format(vae=vae) for o in overrides), *width])
                   for name, file, overrides in CASES}
        conditioner, batch_labels = text_conditions(configs[CASES[1][0]])  # the captions do not depend on the size
        steps = {name: make_step(cfg, args.batch, conditioner, batch_labels) for name, cfg in configs.items()}
    times = {name: [] for name in steps}
    flops = {name: step_flops(step) for name, (step, _) in steps.items()}  # also the warm-up
    for _ in range(args.rounds):
        for name, (step, _) in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
    latent, latent_flops = statistics.median(times[CASES[0][0]]), flops[CASES[0][0]]
    rows = [{"model": name, "params": f"{steps[name][1] / 1e6:.2f}M",
             "s/step (median)": f"{statistics.median(t):.4f}",
             "latent speed-up": f"{statistics.median(t) / latent:.2f}x",
             "GFLOP/step": f"{flops[name] / 1e9:.2f}", "FLOP ratio": f"{flops[name] / latent_flops:.2f}x",
             "GFLOP/s": f"{flops[name] / 1e9 / statistics.median(t):.0f}"} for name, t in times.items()]
    print(table(rows, list(rows[0])))
    path = write_results(__file__, {"batch": args.batch, "rounds": args.rounds, "steps_per_round": args.steps,
                                    "threads": args.threads,
                                    "unets": {name: unet_shape(c) for name, c in configs.items()},
                                    "seconds_per_step": times,
                                    "median": {k: statistics.median(v) for k, v in times.items()},
                                    "speedup_vs_latent": {k: statistics.median(v) / latent for k, v in times.items()},
                                    "flops_per_step": flops,
                                    "flop_ratio_vs_latent": {k: f / latent_flops for k, f in flops.items()}},
                         name=f"latent_speed-c{args.channels}" if args.channels else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
