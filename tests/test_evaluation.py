"""`difflab eval --ref`: sharded, resumable, rank-independent sampling and FID/KID/IS/PR against a reference."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import difflab
import difflab.metrics.digits
from difflab.cli import main
from difflab.data import load_digits
from difflab.evaluation import (
    KEEP_ROWS,
    build_extractor,
    evaluate_against_reference,
    format_evaluation,
    generate_shards,
    quantize,
    read_shard,
    reference_stats,
)
from difflab.metrics.digits import DigitsEvaluator
from difflab.train import train

N, SHARD, STEPS = 40, 16, 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from conftest import TINY

    from difflab.config import load_config

    out = tmp_path_factory.mktemp("evalrun") / "run"
    train(load_config(None, TINY + [f"out={out}", "train.steps=4"]), progress=False)
    return out


@pytest.fixture(scope="module")
def digits_evaluator():
    """One digits classifier for the module: training it is the slow part of every digits extractor."""
    return DigitsEvaluator()


@pytest.fixture(scope="module")
def digits(digits_evaluator):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(difflab.metrics.digits, "DigitsEvaluator", lambda: digits_evaluator)
        return build_extractor("digits", (1, 8, 8))


@pytest.fixture(scope="module")
def ref_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heldout")
    for i, img in enumerate(load_digits("heldout").images[:60]):
        Image.fromarray(((img[0] + 1) * 127.5).round().byte().numpy(), mode="L").save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def ref_npz(ref_folder, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "digits.npz"
    reference_stats(ref_folder, out, extractor=digits, image_size=8, channels=1, progress=False)
    return out


def _images(folder):
    return {p.name: read_shard(p)[0]["images"] for p in sorted(folder.glob("shard_*.npz"))}


def _assert_same_shards(a: dict, b: dict):
    """Equal up to float round-off of batched kernels: at most one 8-bit level, on very few pixels."""
    assert a.keys() == b.keys() and a
    for k, x in a.items():
        diff = np.abs(x.astype(int) - b[k].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, k


def _identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_shards_are_resumable_and_metrics_identical(run_dir, ref_npz, digits):
    kw = {"n": N, "metrics": "fid,kid,is,pr", "extractor": digits, "shard_size": SHARD, "steps": STEPS,
          "progress": False}
    first = evaluate_against_reference(run_dir, ref_npz, **kw)
    folder = first["samples"]["folder"]
    shards = sorted(os.listdir(folder))
    assert shards == ["settings.json", "shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    paths = {s: os.path.join(folder, s) for s in shards[1:]}
    mtimes = {s: os.stat(p).st_mtime_ns for s, p in paths.items()}
    before = _images(Path(folder))
    os.unlink(paths["shard_00001.npz"])

    pipe = difflab.load(run_dir)
    report = generate_shards(pipe, N, shard_size=SHARD, steps=STEPS, progress=False)
    assert str(report.folder) == folder and report.generated == [1] and report.reused == [0, 2]
    assert all(os.stat(paths[s]).st_mtime_ns == mtimes[s] for s in ("shard_00000.npz", "shard_00002.npz"))
    assert _identical(before, _images(report.folder))  # same process, same batches: bit-identical
    regenerated = os.stat(paths["shard_00001.npz"]).st_mtime_ns
    again = evaluate_against_reference(run_dir, ref_npz, **kw)  # everything reused: nothing regenerated
    assert {s: os.stat(p).st_mtime_ns for s, p in paths.items()} == {**mtimes, "shard_00001.npz": regenerated}
    assert again["metrics"] == first["metrics"]

    # each metric stands next to its N; the JSON is on disk and the table prints
    m = first["metrics"]
    assert m["fid"]["n_samples"] == N and m["fid"]["n_reference"] == 60 and m["fid"]["value"] > 0
    assert m["kid"]["n_samples"] == N and m["kid"]["subset_size"] == N and m["kid"]["n_reference"] == 60
    assert m["is"]["n_samples"] == N and 1 <= m["is"]["mean"] <= 10
    assert m["pr"]["n_samples"] == N and 0 <= m["pr"]["precision"] <= 1 and 0 <= m["pr"]["recall"] <= 1
    saved = json.loads(Path(first["path"]).read_text())
    assert saved["extractor"] == "digits" and saved["metrics"] == json.loads(json.dumps(m))
    assert first["path"].startswith(str(run_dir / "eval")) and "-n40" in first["path"]
    table = format_evaluation(first)
    assert "FID" in table and "KID" in table and "recall" in table and " 40 " in table


def test_shard_content_is_independent_of_batch_size_and_equals_the_pipeline(run_dir, tmp_path):
    pipe = difflab.load(run_dir)
    a = generate_shards(pipe, N, tmp_path / "a", shard_size=SHARD, steps=STEPS, seed=5, batch_size=16,
                        progress=False)
    b = generate_shards(pipe, N, tmp_path / "b", shard_size=SHARD, steps=STEPS, seed=5, batch_size=5,
                        progress=False)
    assert a.generated == b.generated == [0, 1, 2] and a.settings == b.settings
    _assert_same_shards(_images(a.folder), _images(b.folder))
    # shard k holds samples [16k, 16k + 16) of the same seeded stream as pipe(n=N), labels cycling 0..9
    direct = quantize(pipe(n=N, sampler=a.settings["sampler"], steps=STEPS, seed=5, progress=False))
    shards = [read_shard(p)[0] for p in a.paths]
    _assert_same_shards({"all": np.concatenate([s["images"] for s in shards])}, {"all": direct})
    assert np.concatenate([s["labels"] for s in shards]).tolist() == [i % 10 for i in range(N)]
    assert np.concatenate([s["index"] for s in shards]).tolist() == list(range(N))
    meta = read_shard(a.paths[2])[1]
    assert (meta["start"], meta["stop"], meta["n"], meta["train_step"]) == (32, 40, N, 4)
    assert meta["settings"]["seed"] == 5 and len(meta["settings"]["weights_sha256"]) == 64
    assert shards[0]["images"].dtype == np.uint8 and shards[0]["images"].shape == (SHARD, 1, 8, 8)


def test_a_folder_of_other_settings_is_refused(run_dir, tmp_path):
    pipe = difflab.load(run_dir)
    generate_shards(pipe, 8, tmp_path / "s", shard_size=4, steps=2, guidance=3, progress=False)
    with pytest.raises(ValueError, match=r"holds shards of other settings \(guidance: 3.0 there, 2.0 now\)"):
        generate_shards(pipe, 8, tmp_path / "s", shard_size=4, steps=2, guidance=2, progress=False)
    # a larger n reuses the finished shards
    report = generate_shards(pipe, 12, tmp_path / "s", shard_size=4, steps=2, guidance=3, progress=False)
    assert report.reused == [0, 1] and report.generated == [2]


def test_a_reference_of_another_extractor_is_refused_before_sampling(run_dir, ref_npz, tmp_path):
    samples = run_dir / "eval" / "samples"
    folders = set(samples.iterdir()) if samples.exists() else set()
    with pytest.raises(ValueError, match="holds digits features, but the inception extractor was requested"):
        evaluate_against_reference(run_dir, ref_npz, n=N, extractor="inception", progress=False)
    foreign = tmp_path / "pytorch_fid.npz"
    np.savez(foreign, mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="records no extractor"):
        evaluate_against_reference(run_dir, foreign, n=N, extractor="digits", progress=False)
    with pytest.raises(ValueError, match="is needs class logits; the clip extractor has none"):
        evaluate_against_reference(run_dir, None, n=N, metrics="is", extractor="clip", progress=False)
    with pytest.raises(ValueError, match="the shapes extractor takes square RGB renders"):
        evaluate_against_reference(run_dir, None, n=N, metrics="is", extractor="shapes", progress=False)
    assert (set(samples.iterdir()) if samples.exists() else set()) == folders  # nothing was sampled


def test_cli_eval_with_a_fid_stats_reference(run_dir, ref_folder, digits_evaluator, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(difflab.metrics.digits, "DigitsEvaluator", lambda: digits_evaluator)
    stats = tmp_path / "fid-stats.npz"
    assert main(["fid-stats", str(ref_folder), "--out", str(stats), "--extractor", "digits", "--quiet"]) == 0
    args = ["eval", "--run", str(run_dir), "--ref", str(stats), "--n", str(N), "--shard-size", str(SHARD),
            "--steps", str(STEPS), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    path = run_dir / "eval" / f"digits-fid-stats-ddim{STEPS}-g3-seed0-n{N}.json"
    result = json.loads(path.read_text())
    assert result["metrics"]["fid"]["n_samples"] == N and result["metrics"]["fid"]["n_reference"] == 60
    assert result["extractor"] == "digits" and "FID" in out and str(path) in out
    # fid-stats keeps raw feature rows too, so KID and precision/recall work from the same file
    assert main(args + ["--metrics", "fid,kid,pr"]) == 0
    capsys.readouterr()
    result = json.loads(path.read_text())
    assert result["metrics"]["kid"]["n_reference"] == 60 and "precision" in json.dumps(result["metrics"])
    assert main(["eval", "--run", str(run_dir), "--metrics", "fid", "--quiet"]) == 2
    assert "pass --ref" in capsys.readouterr().err
    # the Inception Score needs no reference
    assert main(args[:3] + args[5:] + ["--metrics", "is", "--extractor", "digits"]) == 0
    assert "IS (10 splits)" in capsys.readouterr().out
    assert (run_dir / "eval" / f"digits-noref-ddim{STEPS}-g3-seed0-n{N}.json").is_file()


def test_missing_inception_weights_fail_before_sampling(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.delenv("DIFFLAB_INCEPTION_WEIGHTS", raising=False)
    samples = run_dir / "eval" / "samples"
    folders = set(samples.iterdir()) if samples.exists() else set()
    assert main(["eval", "--run", str(run_dir), "--metrics", "is", "--n", "8", "--steps", "2", "--quiet"]) == 2
    assert "DIFFLAB_INCEPTION_WEIGHTS" in capsys.readouterr().err
    assert (set(samples.iterdir()) if samples.exists() else set()) == folders


def test_reference_folder_keeps_a_seeded_capped_subset(ref_folder, digits):
    full = reference_stats(ref_folder, extractor=digits, image_size=8, channels=1, progress=False)
    capped = reference_stats(ref_folder, extractor=digits, image_size=8, channels=1, keep=25, progress=False)
    assert full.n == capped.n == 60 and len(full.features) == 60 and len(capped.features) == 25 <= KEEP_ROWS
    np.testing.assert_allclose(full.mu, capped.mu)
    np.testing.assert_allclose(full.features.mean(0), full.mu, rtol=1e-10, atol=1e-12)


def test_torchrun_two_ranks_make_the_same_shards_as_one_process(run_dir, ref_npz, tmp_path):
    """Two gloo ranks split the shards (k % 2) and rank 0 scores; shards equal the single-process ones."""
    pipe = difflab.load(run_dir)
    single = generate_shards(pipe, N, tmp_path / "single", shard_size=SHARD, steps=STEPS, progress=False)
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           "-m", "difflab.cli", "eval", "--run-dir", str(run), "--ref", str(ref_npz), "--num-samples", str(N),
           "--shard-size", str(SHARD), "--steps", str(STEPS), "--metrics", "fid,is", "--quiet"]
    result = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = (run / "eval" / "samples").iterdir()
    assert json.loads((folder / "settings.json").read_text()) == single.settings
    assert [read_shard(p, images=False)[1]["rank"] for p in sorted(folder.glob("shard_*.npz"))] == [0, 1, 0]
    _assert_same_shards(_images(single.folder), _images(folder))
    (written,) = (run / "eval").glob("*.json")
    assert json.loads(written.read_text())["metrics"]["fid"]["n_samples"] == N
    assert result.stdout.count("FID") == 1  # only rank 0 prints
