"""Few-step generation: the flow parametrisation, consistency models, progressive distillation, reflow."""
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from difflab import denoisers, schedules
from difflab.cli import main
from difflab.config import load_config
from difflab.distill import distance, progressive_loss, straightness, two_step_target
from difflab.distill.consistency import ascending_levels, ct_level_probs, ct_levels
from difflab.distill.progressive import teacher_grid
from difflab.generate import sample_seeds
from difflab.samplers import SeededNoise, sample_consistency, sample_ddim, sample_euler
from difflab.testing import GaussianMixture


class Net(torch.nn.Module):
    """A fixed random function of (x, c_noise): a stand-in network with a finite, non-zero output."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, c_noise, cond=None):
        return torch.tanh(self.conv(x)) + c_noise.reshape(-1, 1, 1, 1)


def test_consistency_boundary_condition_is_exact():
    """f(x, sigma_min) = x bit for bit: c_skip = 1 and c_out = 0 there."""
    torch.manual_seed(0)
    f = denoisers.build("consistency", Net(), schedules.EDM(), sigma_data=0.75)
    x = torch.randn(5, 1, 8, 8) * 3
    assert torch.equal(f(x, f.schedule.sigma_min), x)
    assert not torch.equal(f(x, 0.01), x)
    assert f.schedule.spacings[0] == "karras_trailing"


def test_flow_conversions_round_trip_and_loss_target_is_velocity():
    torch.manual_seed(0)
    x0, n = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.5, 3.0, 900.0], dtype=torch.float64)[:, None]
    x = x0 + sigma * n
    v = denoisers.velocity_from_x0(x, x0, sigma)
    assert torch.allclose(v, n - x0)
    assert torch.allclose(denoisers.x0_from_velocity(x, v, sigma), x0)
    t = sigma / (1 + sigma)
    assert torch.allclose(x / (1 + sigma), (1 - t) * x0 + t * n)  # the straight path
    flow = denoisers.FlowDenoiser(torch.nn.Identity(), schedules.RectifiedFlow())
    c_skip, c_out, _ = flow.scalings(sigma.squeeze(1))
    target = (x0 - c_skip[:, None] * x) / c_out[:, None]  # what Denoiser.loss regresses onto
    assert torch.allclose(target, n - x0)


def test_ddim_on_a_flow_is_the_euler_flow_step():
    """difflab's DDIM on a flow's sigma grid is Euler in t: x_t' = x_t + (t' - t) v, v from x0_hat."""
    flow = schedules.RectifiedFlow()
    gm = GaussianMixture(torch.tensor([[-1.0, 0.5], [1.0, 0.0]]), [0.3, 0.2], schedule=flow)
    sigmas = flow.sigmas(3)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    t, x_t = flow.t(sigmas), x / (1 + sigmas[0])
    for i in range(3):
        x_sigma = x_t * (1 + sigmas[i])
        x0_hat = gm(x_sigma, torch.full((6,), float(sigmas[i]), dtype=torch.float64))
        x_t = x_t + (t[i + 1] - t[i]) * denoisers.velocity_from_x0(x_sigma, x0_hat, sigmas[i])
    assert torch.allclose(sample_ddim(gm, x, sigmas, progress=False), x_t, rtol=0, atol=1e-10)


def test_flow_schedule_logit_normal_and_grid():
    flow = schedules.RectifiedFlow()
    sigma = flow.sample_sigma(200000, torch.Generator().manual_seed(0))
    logit_t = torch.logit(flow.t(sigma))
    assert abs(logit_t.mean()) < 0.01 and abs(logit_t.std() - 1) < 0.01
    grid = flow.sigmas(4)
    expected = torch.tensor([0.999, 0.999 * 3 / 4, 0.999 / 2, 0.999 / 4, 0], dtype=torch.float64)
    assert torch.allclose(flow.t(grid), expected)


def test_karras_trailing_grids_nest_under_halving():
    s = schedules.EDM()
    for n in (1, 2, 4, 32):
        coarse, fine = s.sigmas(n, "karras_trailing"), s.sigmas(2 * n, "karras_trailing")
        assert len(coarse) == n + 1 and coarse[-1] == 0 and coarse[0] == s.sigma_max
        assert torch.allclose(coarse, fine[::2])


def test_progressive_target_is_the_two_step_teacher_in_closed_form():
    """One student DDIM step with the target x0 lands exactly where two teacher DDIM steps land."""
    gm = GaussianMixture.default(dim=3)
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([5.0, 1.3, 0.2], dtype=torch.float64)
    x = gm.sample(6, g) + grid[0] * torch.randn(6, 3, generator=g, dtype=torch.float64)
    rows = lambda v: torch.full((6,), float(v), dtype=torch.float64)  # noqa: E731
    target = two_step_target(gm, x, rows(grid[0]), rows(grid[1]), rows(grid[2]))
    student_step = target + (grid[2] / grid[0]) * (x - target)
    assert torch.allclose(student_step, sample_ddim(gm, x, grid, progress=False), atol=1e-12)
    assert not torch.allclose(target, gm(x, rows(grid[0])), atol=1e-3)  # not simply the teacher's x0


def test_progressive_loss_is_zero_on_a_point_mass_for_a_student_equal_to_its_teacher():
    """DDIM is exact for a point mass (x0_hat = c everywhere), so two steps equal one."""
    point = GaussianMixture(torch.full((1, 1, 4, 4), 0.3), [0.0])
    g = torch.Generator().manual_seed(0)
    grid = schedules.EDM().sigmas(8, "karras_trailing")
    x0 = torch.full((16, 1, 4, 4), 0.3, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    level = torch.randint(0, 4, (16,), generator=g)
    assert progressive_loss(point, point, x0, grid, level, noise).abs().max() < 1e-20
    other = GaussianMixture(torch.full((1, 1, 4, 4), 0.2), [0.0])
    assert progressive_loss(other, point, x0, grid, level, noise).min() > 1e-4


def test_progressive_loss_at_a_level_by_hand():
    """Student level l steps from teacher level 2l to 2l + 2; the error is weighted by max(1/sigma^2, 1)."""
    teacher = GaussianMixture.default(dim=3)
    student = GaussianMixture(teacher.means, [0.5] * 4)  # another model of the same means
    g = torch.Generator().manual_seed(1)
    grid = schedules.EDM().sigmas(8, "karras_trailing")
    x0, noise = teacher.sample(4, g), torch.randn(4, 3, generator=g, dtype=torch.float64)
    rows = lambda v: torch.full((4,), float(v), dtype=torch.float64)  # noqa: E731
    for level in range(4):
        s, s_mid, s_next = grid[2 * level], grid[2 * level + 1], grid[2 * level + 2]
        x = x0 + s * noise
        landing = sample_ddim(teacher, x, torch.stack([s, s_mid, s_next]), progress=False)  # two teacher steps
        target = (landing - (s_next / s) * x) / (1 - s_next / s)
        expected = (student(x, rows(s)) - target).pow(2).mean(1) * max(float(s) ** -2, 1.0)
        got = progressive_loss(student, teacher, x0, grid, torch.full((4,), level), noise)
        assert torch.allclose(got, expected.float(), rtol=1e-5, atol=0)  # the loss is float32


def test_progressive_teacher_grid_nests_onto_the_students_sampling_grid():
    for overrides, schedule in ((["distill.steps=8", "eval.spacing=karras_trailing"], schedules.EDM()),
                                (["distill.steps=8", "diffusion.parametrization=flow"], schedules.RectifiedFlow())):
        cfg = load_config(None, overrides)
        assert torch.allclose(teacher_grid(cfg)[::2], schedule.sigmas(4, cfg.eval.spacing or None))


def test_consistency_sampler_one_step_and_noise_levels():
    gm = GaussianMixture.default(dim=2)
    x = torch.randn(8, 2, dtype=torch.float64) * 80
    one = sample_consistency(gm, x, torch.tensor([80.0, 0.0], dtype=torch.float64), progress=False)
    assert torch.equal(one, gm(x, torch.full((8,), 80.0, dtype=torch.float64)))
    seen = []
    z = torch.ones(8, 2, dtype=torch.float64)
    sample_consistency(gm, x, torch.tensor([80.0, 2.0, 0.0], dtype=torch.float64), noise=lambda *a: z,
                       callback=lambda info: seen.append(info), progress=False)
    x0 = gm(x, torch.full((8,), 80.0, dtype=torch.float64))
    assert torch.allclose(seen[1]["x"], x0 + math.sqrt(4 - 0.002**2) * z)


def test_consistency_training_curriculum_and_level_distribution():
    assert [ct_levels(k, 1000, 10, 40) for k in (0, 332, 333, 666, 999)] == [11, 11, 21, 41, 41]
    levels = ascending_levels(11, 0.002, 80.0)
    assert levels[0] == pytest.approx(0.002) and levels[-1] == pytest.approx(80.0) and (levels.diff() > 0).all()
    p = ct_level_probs(levels)
    assert len(p) == 10 and p.sum() == pytest.approx(1.0) and p.argmax() not in (0, 9)
    a, b = torch.zeros(2, 64), torch.ones(2, 64)
    assert torch.allclose(distance(a, b, "l2"), torch.ones(2))
    c = 0.00054 * 8
    assert torch.allclose(distance(a, b, "pseudo_huber"), torch.full((2,), math.sqrt(64 + c * c) - c))


def test_straightness_is_zero_for_straight_paths():
    flow = schedules.RectifiedFlow()
    point = GaussianMixture(torch.full((1, 4), 0.3), [0.0], schedule=flow)
    noise = torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert straightness(point, noise, steps=20) < 1e-20
    two = GaussianMixture(torch.tensor([[-1.0] * 4, [1.0] * 4]), [0.1, 0.1], schedule=flow)
    assert straightness(two, noise, steps=20) > 0.05
    # one Euler step of a point-mass flow is already exact
    x = sample_euler(point, noise * flow.sigma_max, flow.sigmas(1), progress=False)
    assert torch.allclose(x, torch.full_like(x, 0.3))


# ----------------------------------------------------------------- end to end on tiny models

@pytest.fixture
def teacher(tmp_path):
    from conftest import TINY
    run = tmp_path / "teacher"
    assert main(["train", *TINY, "train.steps=2", f"out={run}", "--no-eval", "--quiet"]) == 0
    return run


def _tiny(*extra):
    return ["train.steps=2", "train.batch_size=8", "train.checkpoint_every=1", "--quiet", "--no-eval", *extra]


def test_progressive_distillation_end_to_end_and_resume(teacher, tmp_path, capsys):
    out = tmp_path / "pd"
    assert main(["distill", "progressive", "--teacher", str(teacher), "--out", str(out), "distill.steps=4",
                 *_tiny()]) == 0
    stages = [out / "2-steps", out / "1-steps"]
    for run, steps in zip(stages, (2, 1)):
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        e = cfg["eval"]
        assert (e["steps"], e["guidance"], e["spacing"]) == (steps, 1.0, "karras_trailing")
        assert json.loads((run / "teacher.json").read_text())["path"] == str(teacher if steps == 2 else stages[0])
    assert main(["sample", "--run", str(stages[1]), "--n", "4", "--out", str(tmp_path / "s.png"), "--quiet"]) == 0
    before = (stages[0] / "checkpoint.json").read_text()
    assert main(["distill", "progressive", "--teacher", str(teacher), "--out", str(out), "distill.steps=4",
                 *_tiny("--resume")]) == 0  # both halvings finished: nothing is trained again
    assert (stages[0] / "checkpoint.json").read_text() == before
    assert main(["distill", "progressive", "--teacher", str(teacher), "--out", str(out), "distill.steps=3",
                 *_tiny()]) == 2
    assert "power of two" in capsys.readouterr().err


def test_consistency_distillation_and_training_end_to_end(teacher, tmp_path):
    from conftest import TINY
    cd = tmp_path / "cd"
    assert main(["distill", "consistency", "--teacher", str(teacher), "--out", str(cd), "distill.levels=6",
                 "distill.teacher_sampler=dpmpp_2m", *_tiny()]) == 0
    cfg = yaml.safe_load((cd / "config.yaml").read_text())
    assert cfg["diffusion"]["parametrization"] == "consistency" and cfg["eval"]["sampler"] == "consistency"
    for steps in ("1", "2"):
        assert main(["sample", "--run", str(cd), "--sampler", "consistency", "--steps", steps, "--n", "4",
                     "--out", str(tmp_path / f"cd{steps}.png"), "--quiet"]) == 0
    assert main(["distill", "consistency", "--teacher", str(teacher), "--out", str(tmp_path / "x"),
                 "distill.teacher_sampler=ddpm", *_tiny()]) == 2
    ct = tmp_path / "ct"
    assert main(["train", *TINY, "diffusion.parametrization=consistency", "train.steps=3", f"out={ct}",
                 "--no-eval", "--quiet"]) == 0
    assert main(["train", *TINY, "diffusion.parametrization=consistency", "train.steps=4", f"out={ct}",
                 "--resume", "--no-eval", "--quiet"]) == 0
    log = [json.loads(line) for line in (ct / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4] and all(math.isfinite(e["loss"]) for e in log)


def test_flow_training_and_reflow_end_to_end(tmp_path, capsys):
    from conftest import TINY
    flow = tmp_path / "flow"
    assert main(["train", *TINY, "diffusion.parametrization=flow", "diffusion.schedule=flow", "train.steps=2",
                 f"out={flow}", "--no-eval", "--quiet"]) == 0
    out = tmp_path / "reflow"
    assert main(["reflow", str(flow), "--out", str(out), "distill.pairs=16", "distill.pair_steps=3", *_tiny()]) == 0
    pairs = load_file(out / "reflow_pairs.safetensors")
    assert pairs["noise"].shape == pairs["samples"].shape == (16, 1, 8, 8) and len(pairs["labels"]) == 16
    evaluation = SeededNoise(sample_seeds(0, 16), (1, 8, 8))()  # the evaluation stream's start noise
    assert not torch.isclose(pairs["noise"], evaluation).flatten(1).all(1).any()  # no pair shares it
    assert main(["train", *TINY, "diffusion.parametrization=flow", "diffusion.schedule=edm", f"out={tmp_path / 'bad'}",
                 "--quiet"]) == 2
    assert "diffusion.schedule=flow" in capsys.readouterr().err
    # the flow parametrisation brings its schedule; the papers' spelling and the issue's key are accepted
    for key in ("diffusion.parametrization", "model.parametrisation"):
        cfg = load_config(None, [f"{key}=flow"])
        assert (cfg.diffusion.parametrization, cfg.diffusion.schedule) == ("flow", "flow")
    cfg = load_config(None, ["diffusion.parametrization=consistency"])  # evaluated as what it is
    assert (cfg.eval.sampler, cfg.eval.steps) == ("consistency", 1)
    cfg = load_config(None, ["diffusion.parametrization=consistency", "eval.sampler=euler"])
    assert (cfg.eval.sampler, cfg.eval.steps) == ("euler", 50)
    assert main(["reflow", str(tmp_path / "nothing"), *_tiny()]) == 2


def test_level_streams_do_not_fold_onto_the_training_stream():
    """torch's CPU generator keeps a seed's low 32 bits: a stream constant must not vanish there."""
    from difflab.distill import consistency, progressive
    from difflab.seeds import derive_seed
    from difflab.train.trainer import step_generator
    for stream in (progressive.LEVEL_STREAM, consistency.LEVEL_STREAM):
        for seed, step in ((0, 0), (0, 7), (3, 7)):
            levels, batch = step_generator(derive_seed(seed, stream), step), step_generator(seed, step)
            assert not torch.equal(torch.rand(8, generator=levels), torch.rand(8, generator=batch))
