import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import difflab
from difflab.cli import main
from difflab.train import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from conftest import TINY
    from difflab.config import load_config

    out = tmp_path_factory.mktemp("pipe") / "run"
    train(load_config(None, TINY + [f"out={out}", "train.steps=3"]), progress=False)
    return out


def test_same_seed_same_samples_independent_of_batch_size(run_dir):
    pipe = difflab.load(run_dir)
    a = pipe(n=8, sampler="ddim", steps=5, guidance=3, seed=7, batch_size=8, progress=False)
    b = pipe(n=8, sampler="ddim", steps=5, guidance=3, seed=7, batch_size=3, progress=False)
    c = pipe(n=8, sampler="ddim", steps=5, guidance=3, seed=8, batch_size=8, progress=False)
    # the noise is identical; only float32 round-off of batched kernels may differ
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert torch.equal(a, pipe(n=8, sampler="ddim", steps=5, guidance=3, seed=7, batch_size=8, progress=False))
    assert (a - c).abs().max() > 0.1
    # a prefix of a larger request is the same samples
    torch.testing.assert_close(pipe(n=3, sampler="ddim", steps=5, guidance=3, seed=7, progress=False), a[:3],
                               rtol=0, atol=1e-5)
    d = pipe(n=8, sampler="ddpm", steps=5, seed=1, batch_size=8, progress=False)
    torch.testing.assert_close(d, pipe(n=8, sampler="ddpm", steps=5, seed=1, batch_size=5, progress=False),
                               rtol=0, atol=1e-5)
    assert a.shape == (8, 1, 8, 8) and a.min() >= -1 and a.max() <= 1


def test_pipeline_label_errors(run_dir):
    pipe = difflab.load(run_dir)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        pipe(n=2, labels=[3, 10], steps=2, progress=False)
    with pytest.raises(ValueError, match="valid samplers"):
        pipe(n=2, sampler="nope", steps=2, progress=False)
    with pytest.raises(ValueError, match="guide replaces classifier-free guidance; it takes no guidance"):
        pipe(n=2, steps=2, guidance=3, guide=lambda d: d, progress=False)
    assert pipe(n=2, steps=2, guide=lambda d: d, progress=False).shape == (2, 1, 8, 8)


def test_cli_sample_writes_png_and_npz(run_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(["sample", "--run", str(run_dir), "--n", "6", "--sampler", "ddim", "--steps", "4",
                 "--guidance", "3", "--seed", "0", "--out", str(out), "--quiet", "--labels", "4"])
    assert code == 0 and out.exists()
    data = np.load(out.with_suffix(".npz"))
    assert data["images"].shape == (6, 1, 8, 8) and data["labels"].tolist() == [4] * 6
    pipe = difflab.load(run_dir)
    again = pipe(n=6, labels=[4] * 6, sampler="ddim", steps=4, guidance=3, seed=0, progress=False)
    np.testing.assert_array_equal(data["images"], again.numpy())


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["sample", "--run", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "is not a difflab run folder (it has no config.yaml" in err and err.count("\n") == 1
    assert main(["train", "train.stpes=3", f"out={tmp_path / 'r'}"]) == 2
    assert "unknown config key 'train.stpes' (did you mean 'train.steps'?)" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_overrides_may_follow_options_and_strays_are_refused(capsys):
    from difflab.cli import _config, parse_args
    args = parse_args(["train", "train.steps=3", "--quiet", "out=runs/x", "eval.steps=7", "--no-eval"])
    cfg = _config(args)
    assert (cfg.train.steps, cfg.out, cfg.eval.steps, args.quiet, args.no_eval) == (3, "runs/x", 7, True, True)
    for argv in (["train", "--bogus"], ["samplers", "train.steps=3"]):
        with pytest.raises(SystemExit) as stop:
            parse_args(argv)
        assert stop.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_cli_eval_writes_metrics(run_dir, capsys):
    assert main(["eval", "--run", str(run_dir), "--n", "40", "--steps", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("class_accuracy", "frechet_samples", "frechet_floor", "frechet_baseline", "sampler", "steps",
                "guidance", "n_samples", "train_seconds"):
        assert key in metrics
    assert metrics["n_samples"] == 40 and metrics["steps"] == 3 and metrics["guidance"] == 3.0
    assert [s["guidance"] for s in metrics["sweep"]] == [3.0, 1.0]
    # the floor (real vs real) is far below the trivial baseline, and the classifier is good
    assert metrics["frechet_floor"] < metrics["frechet_baseline"] / 5
    assert metrics["classifier_heldout_accuracy"] > 0.95
    assert "floor: real train vs held-out" in printed


def test_samplers_command_lists_names():
    out = subprocess.run([sys.executable, "-m", "difflab.cli", "samplers"], capture_output=True, text=True)
    assert out.returncode == 0 and "ddim" in out.stdout and "ddpm" in out.stdout and "stochastic" in out.stdout


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_sde", "unipc", "heun"])
def test_every_kind_of_sampler_runs_from_the_pipeline_batch_independently(run_dir, sampler):
    pipe = difflab.load(run_dir)
    a = pipe(n=4, sampler=sampler, steps=4, spacing="karras", guidance=2, seed=3, batch_size=4, progress=False)
    b = pipe(n=4, sampler=sampler, steps=4, spacing="karras", guidance=2, seed=3, batch_size=2, progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert torch.isfinite(a).all()


def test_cli_sample_with_a_named_sampler_and_grid(run_dir, tmp_path):
    out = tmp_path / "k.png"
    assert main(["sample", "--run", str(run_dir), "--n", "2", "--sampler", "dpmpp_2m", "--schedule", "karras",
                 "--steps", "5", "--out", str(out), "--quiet"]) == 0
    assert out.exists()
    assert main(["sample", "--run", str(run_dir), "--n", "2", "--sampler", "dpm++", "--out", str(out)]) == 2


def test_cli_sampler_options_reach_the_sampler_and_unknown_ones_are_refused(run_dir, tmp_path, capsys):
    args = ["sample", "--run", str(run_dir), "--n", "2", "--sampler", "dpmpp_3m", "--steps", "6", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a.png")]) == 0
    assert main(args + ["--option", "taylor_d2=true", "--out", str(tmp_path / "b.png")]) == 0
    a, b = (np.load(tmp_path / f"{k}.npz")["images"] for k in "ab")
    assert np.abs(a - b).max() > 1e-6  # the option changed the update
    capsys.readouterr()
    assert main(args + ["--option", "corrector=false", "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert "no option 'corrector'" in err and "taylor_d2" in err
    assert main(args + ["--option", "taylor_d2", "--out", str(tmp_path / "c.png")]) == 2
    assert main(args + ["--option", "taylor_d2=maybe", "--out", str(tmp_path / "c.png")]) == 2
    assert "expected bool" in capsys.readouterr().err
    unipc = ["sample", "--run", str(run_dir), "--n", "2", "--sampler", "unipc", "--steps", "6", "--quiet"]
    assert main(unipc + ["--out", str(tmp_path / "u.png")]) == 0
    assert main(unipc + ["--option", "corrector=false", "--out", str(tmp_path / "p.png")]) == 0
    u, p = (np.load(tmp_path / f"{k}.npz")["images"] for k in "up")
    assert np.abs(u - p).max() > 1e-6


def test_sampler_options_are_typed_by_the_defaults():
    from difflab.samplers import check_options

    assert check_options("ddim", {"eta": "1e-3"}) == {"eta": 1e-3}  # YAML reads 1e-3 as a string
    assert check_options("heun", {"s_churn": 40, "s_tmax": "inf"}) == {"s_churn": 40.0, "s_tmax": float("inf")}
    assert check_options("euler", {"callback": print}) == {"callback": print}  # passed along to the sampler
    for name, options, match in [("ddim", {"eta": "abc"}, "expected float"), ("unipc", {"order": 3.0}, "expected int"),
                                 ("unipc", {"corrector": 0}, "expected bool"), ("euler", {"noise": None}, "no option")]:
        with pytest.raises(ValueError, match=match):
            check_options(name, options)
