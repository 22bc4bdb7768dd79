"""The memory planner: simulated activations vs real tracking and profiler peaks, exact static bytes, errors."""
import pytest
import torch

from difflab import memory as M
from difflab.memory import simulate
from difflab.memory.inputs import _cond_tensors
from difflab.train import Trainer
from difflab.train.build import autocast, build_denoiser, diffusion_loss

TEXT = ["data.dataset=shapes", "data.channels=3", "data.image_size=16", "model.text_encoder=minilm",
        "model.text_max_length=8", "model.channel_mult=[1,2]", "model.attn_levels=[1]"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the profiler's curve and the planner agree best without other threads' buffers
    yield
    torch.set_num_threads(threads)


def test_tracker_counts_each_storage_once_until_freed():
    x = torch.zeros(10)
    with M.StorageTracker(ignore=[x]) as tracker:
        y = x + 1                      # 40 bytes
        view = y[2:]                   # same storage: nothing more
        x.add_(1)                      # an ignored storage: nothing
        z = torch.empty(5, dtype=torch.float64)
        assert tracker.current == 40 + 40
        del y
        assert tracker.current == 80   # the view keeps y's storage alive
        del view
        assert tracker.current == 40
        del z
    assert tracker.current == 0 and tracker.peak == 80


def test_static_bytes_equal_what_the_trainer_holds(tiny_cfg):
    cfg = tiny_cfg("train.batch_size=8")
    trainer = Trainer(cfg, progress=False)
    trainer.train_step()
    est = M.estimate_training(cfg, 8, 8, "fp32", False)[0]
    params = list(trainer.net.parameters())
    opt_states = [v for s in trainer.parts.opt.state.values() for v in s.values()]
    assert est.weights == M.storage_bytes(params)
    assert est.ema == M.storage_bytes([*trainer.ema.model.parameters(), *trainer.ema.model.buffers()])
    assert est.gradients == M.storage_bytes([p.grad for p in params])
    assert est.optimizer == M.storage_bytes(opt_states)
    assert est.optimizer == 2 * est.weights + 4 * len(params)


@pytest.mark.parametrize("precision,checkpointing", [("fp32", False), ("bf16", True)])
def test_fake_simulation_equals_tracking_real_tensors(tiny_cfg, precision, checkpointing):
    """Same ops, same storages: conv, GroupNorm, masked SDPA, their backward, autocast, recomputation."""
    cfg = tiny_cfg(*TEXT)
    sim = M.simulate_training(cfg, 4, precision, checkpointing)
    torch.manual_seed(0)
    net = M.make_net(cfg, checkpointing).train()
    denoiser = build_denoiser(cfg, net)
    x0, sigma, noise, cond = M.random_batch(cfg, 4)
    with M.StorageTracker(ignore=[*net.parameters(), x0, sigma, noise, *_cond_tensors(cond)]) as tracker:
        with autocast("cpu", precision):
            loss = diffusion_loss(cfg, denoiser, x0, sigma, noise, cond) / cfg.train.grad_accum
        loss.backward()
        del loss
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in tracker.ops
    assert sim["peak"] == pytest.approx(tracker.peak, rel=0.01)  # c_noise is shape-only in the simulation


@pytest.mark.parametrize("overrides", [[], ["model.checkpointing=true"], TEXT + ["model.checkpointing=true"]])
def test_predicted_training_peak_matches_measured(tiny_cfg, overrides):
    cfg = tiny_cfg("model.channels=32", "model.groups=8", "train.batch_size=32", *overrides)
    predicted = M.estimate_training(cfg, 32, 32, "fp32", cfg.model.checkpointing)[0]
    measured = M.measure_training_peak(cfg, steps=1)
    assert measured["before_forward"] == pytest.approx(predicted.static, rel=0.01)
    assert predicted.peak == pytest.approx(measured["peak"], rel=0.15)
    assert predicted.fwd_bwd_peak == pytest.approx(measured["activations"], rel=0.15)


def test_checkpointing_and_bf16_reduce_activations(tiny_cfg):
    cfg = tiny_cfg("model.channels=32", "model.groups=8", "train.batch_size=32")
    rows = {(t.precision, t.checkpointing): t for t in M.plan(cfg).training}
    assert rows["fp32", True].activations < 0.7 * rows["fp32", False].activations
    assert rows["bf16", False].activations < 0.7 * rows["fp32", False].activations
    assert rows["bf16", True].activations < rows["bf16", False].activations
    plain = M.measure_training_peak(cfg, steps=1, checkpointing=False)["activations"]
    checkpointed = M.measure_training_peak(cfg, steps=1, checkpointing=True)["activations"]
    assert checkpointed < 0.7 * plain


def test_activations_grow_with_the_batch(tiny_cfg):
    cfg = tiny_cfg()
    small, large = (M.estimate_training(cfg, b, b, "fp32", False)[0] for b in (8, 32))
    assert large.activations > 3 * small.activations
    assert large.weights == small.weights


def test_inference_doubles_the_batch_under_guidance(tiny_cfg):
    assert M.inference_batch(tiny_cfg("eval.batch_size=10", "eval.guidance=3.0")) == 20
    assert M.inference_batch(tiny_cfg("eval.batch_size=10", "eval.guidance=1.0")) == 10
    assert M.inference_batch(tiny_cfg("eval.batch_size=10", "data.conditional=false")) == 10
    cfg = tiny_cfg("model.channels=32", "model.groups=8", "eval.batch_size=64", "eval.guidance=3.0")
    predicted = M.estimate_inference(cfg)[0]
    unguided = M.estimate_inference(tiny_cfg("model.channels=32", "model.groups=8", "eval.batch_size=64",
                                             "eval.guidance=1.0"))[0]
    assert predicted.activations > 1.6 * unguided.activations
    assert predicted.peak == pytest.approx(M.measure_inference_peak(cfg, steps=2)["peak"], rel=0.15)


def test_format_marks_the_configs_own_setting(tiny_cfg):
    plan = M.plan(tiny_cfg("train.precision=bf16", "model.checkpointing=true"))
    text = M.format_plan(plan)
    assert plan.configured().precision == "bf16" and plan.configured().checkpointing
    starred = [line for line in text.splitlines() if "train *" in line]
    assert len(starred) == 1 and "bf16" in starred[0] and " on " in starred[0]
    assert len(plan.rows()) == 5 and "sample" in text
    assert " vae " not in text and " decode " not in text  # a pixel model has neither column


def test_bad_inputs_give_clear_errors(tiny_cfg):
    cfg = tiny_cfg()
    with pytest.raises(M.PlanError, match="expected a batch size >= 1, got 0"):
        M.plan(cfg, batch_size=0)
    with pytest.raises(M.PlanError, match="divisible by train.grad_accum=4, got 6"):
        M.plan(tiny_cfg("train.grad_accum=4"), batch_size=6)
    with pytest.raises(M.PlanError, match="fp16"):
        M.plan(tiny_cfg("train.precision=fp16"), device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(M.PlanError, match="expected a CUDA device"):
            M.plan(cfg, device="cuda")


def test_a_model_that_needs_values_cannot_be_simulated(tiny_cfg, monkeypatch):
    monkeypatch.setattr(simulate._ShapeOnlySchedule, "c_noise", lambda self, sigma: sigma * sigma.max().item())
    with pytest.raises(M.PlanError, match="could not simulate the training step on fake tensors"):
        M.simulate_training(tiny_cfg("diffusion.schedule=cosine", "diffusion.parametrization=eps"), 4, "fp32", False)


def test_cli_prints_the_plan(tiny_cfg, capsys):
    from difflab.cli import main

    assert main(["memory", "configs/digits.yaml", "model.channels=16", "model.groups=4", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "memory plan on cpu" in out and "train batch 8" in out
    assert sum(line.lstrip().startswith("train") for line in out.splitlines()) == 4  # fp32/bf16 x ckpt off/on
    assert main(["memory", "configs/digits.yaml", "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err


def test_tracker_still_counts_after_ignored_tensors_are_dropped():
    # ignored storages are keyed by address; the tracker holds them so no new allocation reuses one
    # (under fake tensors, as the planner runs, freed addresses are reused at once)
    with simulate._fake_mode():
        tracker = M.StorageTracker()
        batch = [torch.randn(256) for _ in range(20)]
        tracker.ignore(batch)
        del batch
        with tracker:
            kept = [torch.randn(256) for _ in range(200)]
        assert tracker.current == 200 * 256 * 4 and len(kept) == 200
