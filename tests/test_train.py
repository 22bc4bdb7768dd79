import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflab import runs
from difflab.train import Trainer, TrainingError, train
from difflab.train.trainer import batch_indices


def _weights(run: Path, name="model"):
    return load_file(str(runs.weights_path(run, name)))


def _assert_same(a: dict, b: dict, exact: bool):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            # Adam's first steps are ~lr * g / (|g| + 1e-8): where |g| ~ 1e-8 (attention key biases get
            # exactly zero), float round-off in g moves a weight by up to lr * 1e-2 ~ 3e-5. A real
            # mismatch (other rows, other noise) moves weights by ~lr = 1e-3.
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-4, msg=k)


def test_batches_cover_each_epoch_once():
    rows = torch.cat([batch_indices(s, 7, 20, seed=3) for s in range(20)])  # 140 rows = 7 epochs
    for epoch in range(7):
        assert sorted(rows[epoch * 20:(epoch + 1) * 20].tolist()) == list(range(20))
    assert torch.equal(batch_indices(5, 7, 20, 3), batch_indices(5, 7, 20, 3))


def test_resume_is_bit_exact(tiny_cfg, tmp_path):
    straight = tiny_cfg("train.steps=6", f"out={tmp_path / 'straight'}", "model.dropout=0.1")
    train(straight, progress=False)
    first = tiny_cfg("train.steps=3", f"out={tmp_path / 'resumed'}", "model.dropout=0.1")
    train(first, progress=False)
    second = tiny_cfg("train.steps=6", f"out={tmp_path / 'resumed'}", "model.dropout=0.1")
    train(second, resume=True, progress=False)
    for name in ("model", "ema"):
        _assert_same(_weights(tmp_path / "straight", name), _weights(tmp_path / "resumed", name), exact=True)
    assert not list((tmp_path / "resumed").glob("*.tmp")) and not list((tmp_path / "resumed").glob(".*tmp"))


def test_gradient_accumulation_equals_large_batch(tiny_cfg, tmp_path):
    big = Trainer(tiny_cfg("train.steps=3", f"out={tmp_path / 'big'}"), progress=False)
    acc = Trainer(tiny_cfg("train.steps=3", "train.grad_accum=4", f"out={tmp_path / 'acc'}"), progress=False)
    for _ in range(3):
        loss_big, loss_acc = big.train_step()["loss"], acc.train_step()["loss"]
        assert loss_big == pytest.approx(loss_acc, rel=1e-5)
        for (name, p), q in zip(big.net.named_parameters(), acc.net.parameters()):
            # float32 sums in another order: equal to 1e-4 of the tensor's largest gradient
            assert (p.grad - q.grad).abs().max() <= 1e-4 * p.grad.abs().max(), name
    _assert_same({k: v for k, v in big.net.state_dict().items()},
                 {k: v for k, v in acc.net.state_dict().items()}, exact=False)


def test_refuses_to_overwrite_and_needs_a_run_to_resume(tiny_cfg):
    cfg = tiny_cfg("train.steps=2")
    train(cfg, progress=False)
    with pytest.raises(TrainingError, match="already holds a run; pass --resume"):
        Trainer(cfg)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trainer(tiny_cfg("out=/nonexistent/run"), resume=True)
    with pytest.raises(TrainingError, match="must be divisible by world_size x grad_accum"):
        Trainer(tiny_cfg("train.grad_accum=3", "out=/tmp/unused"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_cfg):
    cfg = tiny_cfg("train.steps=6", "train.checkpoint_every=2")
    trainer = Trainer(cfg, progress=False)
    real_step = trainer.train_step

    def poisoned():
        if trainer.step == 3:
            trainer.data.images[:] = float("nan")
        return real_step()

    trainer.train_step = poisoned
    with pytest.raises(TrainingError, match=r"loss became nan at step 3; .*last good checkpoint \(step 2\)"):
        trainer.fit()
    state = runs.load_trainer_state(cfg.out)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in _weights(Path(cfg.out)).values())


def test_bf16_autocast_trains_on_cpu(tiny_cfg):
    cfg = tiny_cfg("train.steps=2", "train.precision=bf16")
    train(cfg, progress=False)
    assert all(torch.isfinite(v).all() for v in _weights(Path(cfg.out)).values())


def test_torchrun_two_ranks_equal_single_process(tiny_cfg, tmp_path):
    """DDP (gloo) over 2 ranks, each with half the global batch, equals one process on the whole batch."""
    from conftest import TINY

    single = tmp_path / "single"
    train(tiny_cfg("train.steps=3", f"out={single}"), progress=False)
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "difflab.cli", "train", *TINY, "train.steps=3", f"out={ddp}", "--no-eval", "--quiet"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = lambda run: [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-5) and len(losses(ddp)) == 3
    _assert_same(_weights(single), _weights(ddp), exact=False)
    _assert_same(_weights(single, "ema"), _weights(ddp, "ema"), exact=False)
