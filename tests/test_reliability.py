"""Reliability: checkpoints published whole, interrupts, one writer per run, finite or refused, and one
``difflab: error:`` line for every bad input (benchmarks/faults.py runs the kill -9 trials)."""
import errno
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import TINY
from difflab import files, load, runs
from difflab.cli import main
from difflab.config import load_config
from difflab.generate import NonFiniteSample, SamplingSettings, generate
from difflab.interrupts import Interrupted, StopRequests
from difflab.schedules import EDM
from difflab.train import Trainer, TrainingError, train


def _same_weights(a, b) -> bool:
    for name in ("model", "ema"):
        wa, wb = load_file(str(runs.weights_path(a, name))), load_file(str(runs.weights_path(b, name)))
        if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
            return False
    return True


@pytest.fixture
def cfg(tmp_path):
    def make(name, *overrides):
        return load_config(None, TINY + [f"out={tmp_path / name}", *overrides])
    return make


@pytest.fixture
def straight(cfg):
    return train(cfg("straight", "train.steps=6"), progress=False)


def test_a_checkpoint_is_published_whole_and_only_the_newest_are_kept(cfg):
    run = train(cfg("run", "train.steps=6", "train.keep_checkpoints=2"), progress=False)
    ckpt = runs.published(run)
    assert ckpt.step == 6 and ckpt.folder == run / "checkpoints" / "step_0000006"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000004", "step_0000006"]
    assert all(runs.file_sha256(ckpt.path(f)) == ckpt.sha256[f] for f in runs.CHECKPOINT_FILES)
    assert runs.weights_path(run) == ckpt.path("ema.safetensors")
    assert not list(run.rglob("*.tmp"))


class Killed(BaseException):
    """Stands for kill -9 in the middle of a write (in-process: the test then plants what a kill leaves)."""


def test_a_kill_inside_a_checkpoint_write_keeps_the_last_one_and_resume_is_exact(cfg, straight, monkeypatch):
    real, writes = files.atomic_write, []

    def dying(path, write):
        if "checkpoints" in str(path) and "0000004" in str(path):
            writes.append(path)
            if len(writes) == 2:  # inside ema.safetensors of step 4
                raise Killed
        real(path, write)

    monkeypatch.setattr(files, "atomic_write", dying)
    with pytest.raises(Killed):
        train(cfg("run", "train.steps=6"), progress=False)
    monkeypatch.setattr(files, "atomic_write", real)
    run = straight.parent / "run"
    assert runs.published(run).step == 2 and load(run).cfg.train.steps == 6  # sample meanwhile: step 2, whole
    # what a kill -9 leaves: a half-written temporary folder and file, a complete but unpublished folder
    (run / "checkpoints" / ".step_0000004.tmp").mkdir()
    (run / "checkpoints" / ".step_0000004.tmp" / "model.safetensors").write_bytes(b"half")
    shutil.copytree(run / "checkpoints" / "step_0000002", run / "checkpoints" / "step_0000004")
    (run / ".config.yaml.x1.tmp").write_text("half")
    train(cfg("run", "train.steps=6"), resume=True, progress=False)
    assert _same_weights(run, straight)
    assert not list(run.rglob("*.tmp")) and runs.published(run).step == 6


def test_a_full_disk_keeps_the_last_checkpoint_and_the_run_resumes_after(cfg, straight, monkeypatch):
    real = files.atomic_write

    def full(path, write):
        if "step_0000004" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, write)

    monkeypatch.setattr(files, "atomic_write", full)
    with pytest.raises(TrainingError, match=r"No space left on device \(the checkpoint of step 2 is intact; free space"):
        train(cfg("run", "train.steps=6"), progress=False)
    monkeypatch.setattr(files, "atomic_write", real)
    run = straight.parent / "run"
    assert runs.published(run).step == 2 and not list(run.rglob("*.tmp"))
    train(cfg("run", "train.steps=6"), resume=True, progress=False)
    assert _same_weights(run, straight)


def test_a_full_disk_is_an_os_error_whichever_library_wrote(tmp_path, monkeypatch):
    """safetensors says "(os error 28)" in its own error type; torch.save says "unexpected pos"."""
    def fails(message):
        def write(tmp):
            raise RuntimeError(message)
        return write

    with pytest.raises(OSError) as err:
        files.atomic_write(tmp_path / "a", fails("I/O error: No space left on device (os error 28)"))
    assert err.value.errno == errno.ENOSPC
    with pytest.raises(RuntimeError, match="unexpected pos"):  # space is left: not a full disk
        files.atomic_write(tmp_path / "b", fails("[enforce fail at inline_container.cc:672] . unexpected pos 5"))
    monkeypatch.setattr(files, "_free_bytes", lambda folder: 0)
    with pytest.raises(OSError) as err:
        files.atomic_write(tmp_path / "c", fails("[enforce fail at inline_container.cc:672] . unexpected pos 5"))
    assert err.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_after_the_current_step_and_resume_is_exact(cfg, straight, monkeypatch, capsys, signum):
    real = Trainer.train_step

    def signalled(self):
        if self.step == 3:
            os.kill(os.getpid(), signum)
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", signalled)
    c = cfg("run", "train.steps=6", "train.checkpoint_every=100")
    args = ["train", *TINY, f"out={c.out}", "train.steps=6", "train.checkpoint_every=100", "--no-eval", "--quiet"]
    assert main(args) == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"difflab: {signal.Signals(signum).name} at step 4: checkpoint saved in {c.out}; "
                       "continue with `difflab train ... --resume`")
    assert runs.published(c.out).step == 4
    monkeypatch.setattr(Trainer, "train_step", real)
    train(c, resume=True, progress=False)
    assert _same_weights(c.out, straight)


def test_a_second_ctrl_c_aborts_at_once():
    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert Interrupted(signal.SIGTERM, "x").exit_code == 143


def test_one_trainer_per_run_and_a_stale_lock_is_taken_over(cfg, capsys):
    first = Trainer(cfg("run"), progress=False)
    first.run.joinpath("keep").write_text("")  # so that close() keeps the folder
    with pytest.raises(runs.RunLockedError, match=f"is being trained by PID {os.getpid()} on"):
        Trainer(cfg("run"), progress=False)
    first.close()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (first.run / runs.LOCK).write_text(f"{dead.pid} otherhost\n")  # its holder died without releasing it
    train(cfg("run"), progress=False)
    assert f"took over the lock of {first.run} left by PID {dead.pid} on otherhost" in capsys.readouterr().err
    assert (first.run / runs.LOCK).read_text() == ""


def test_a_run_of_the_earlier_layout_loads_and_resumes(cfg, tmp_path):
    old, new = (train(cfg(name, "train.steps=4"), progress=False) for name in ("old", "new"))
    ckpt = runs.published(old)
    for name in runs.CHECKPOINT_FILES:
        shutil.move(ckpt.path(name), old / name)
    shutil.rmtree(old / "checkpoints")
    (old / runs.POINTER).unlink()
    assert runs.published(old).folder == old and load(old).cfg.train.steps == 4
    for name in ("old", "new"):
        train(cfg(name, "train.steps=8"), resume=True, progress=False)
    assert _same_weights(old, new)
    assert not (old / "model.safetensors").exists()  # pruned once two newer checkpoints were published


def test_sampling_stops_at_the_step_that_went_non_finite():
    class Unstable(torch.nn.Module):
        schedule = EDM()

        def forward(self, x, sigma, cond=None):
            return x / 2 if float(sigma.flatten()[0]) > 1 else x * float("nan")

    with pytest.raises(NonFiniteSample, match=r"NaN or infinite values at step \d+ of 10 \(sigma 0\.\d+"):
        generate(Unstable(), (1, 4, 4), 2, SamplingSettings(steps=10), progress=False)


def test_settings_and_labels_are_finite_numbers_and_integers(tmp_path):
    for bad in (dict(guidance=float("nan")), dict(guidance=float("inf")), dict(guidance_rescale=5.0),
                dict(steps=0), dict(batch_size=0)):
        with pytest.raises(ValueError):
            SamplingSettings(**bad)
    for bad in (dict(guidance="3"), dict(steps=2.5), dict(seed="1"), dict(sampler=3)):
        with pytest.raises(TypeError):
            SamplingSettings(**bad)
    run = train(load_config(None, TINY + [f"out={tmp_path / 'r'}", "train.steps=2"]), progress=False)
    pipe = load(run)
    with pytest.raises(ValueError, match="labels must be a list of integers"):
        pipe(n=2, labels=[1.7, 2.9], steps=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\], got 50"):
        pipe(n=2, labels=[50, 1], steps=2)


# ------------------------------------------------------------------------------------ bad inputs

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained tiny run, damaged copies of it, image folders and stray files."""
    root = tmp_path_factory.mktemp("world")
    run = train(load_config(None, TINY + [f"out={root / 'run'}"]), progress=False)
    (root / "afile").write_text("x\n")
    (root / "empty").mkdir()
    (root / "imgs").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / "imgs" / f"{i}.png")
    (root / "broken_imgs").mkdir()
    (root / "broken_imgs" / "a.png").write_bytes(b"\x89PNG not really")
    np.savez(root / "other.npz", x=np.zeros(3))
    (root / "bad.yaml").write_text("model:\n  channels: [1\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    for name, damage in DAMAGES.items():
        shutil.copytree(run, root / name)
        damage(root / name)
    return root


def _ema(run):
    return runs.weights_path(run)


def _nan_weights(run, fix_hash: bool):
    path = _ema(run)
    weights = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(path)).items()}
    save_file(weights, str(path), metadata=runs.weights_metadata(path))
    if fix_hash:  # damage that the recorded SHA-256 cannot see: written by a (buggy) trainer
        record = runs.published(run)
        files.write_json(run / runs.POINTER, {"step": record.step, "folder": f"checkpoints/{record.folder.name}",
                                              "sha256": {**record.sha256, "ema.safetensors": runs.file_sha256(path)}})


DAMAGES = {
    "truncated_ema": lambda r: os.truncate(_ema(r), 1000),
    "empty_ema": lambda r: os.truncate(_ema(r), 0),
    "random_ema": lambda r: _ema(r).write_bytes(os.urandom(5000)),
    "pickle_ema": lambda r: torch.save({"a": 1}, _ema(r)),
    "nan_ema": lambda r: _nan_weights(r, fix_hash=True),
    "nan_ema_unhashed": lambda r: _nan_weights(r, fix_hash=False),
    "empty_config": lambda r: (r / "config.yaml").write_text(""),
    "malformed_config": lambda r: (r / "config.yaml").write_text("out: [\n"),
    "truncated_config": lambda r: (r / "config.yaml").write_text(
        "".join((r / "config.yaml").read_text().splitlines(True)[:12])),
    "other_architecture": lambda r: (r / "config.yaml").write_text(
        (r / "config.yaml").read_text().replace("channels: 16", "channels: 32", 1)),
    "truncated_state": lambda r: os.truncate(runs.published(r).path(runs.TRAINER_STATE), 2000),
    "damaged_pointer": lambda r: (r / runs.POINTER).write_text('{"step": '),
    "missing_checkpoint": lambda r: shutil.rmtree(runs.published(r).folder),
}

R = "{root}/run"
BAD_INPUTS = [
    # sampling arguments
    (f"sample --run {R} --guidance nan", "guidance must be a finite number, got nan"),
    (f"sample --run {R} --guidance inf", "guidance must be a finite number, got inf"),
    (f"sample --run {R} --eta nan", "option 'eta' must be a finite number >= 0, got nan"),
    (f"sample --run {R} --eta -1", "option 'eta' must be a finite number >= 0, got -1.0"),
    (f"sample --run {R} --option s_noise=inf --sampler euler", "option 's_noise' must be a finite number"),
    (f"sample --run {R} --n -1", "--n must be >= 1, got -1"),
    (f"sample --run {R} --n 0", "--n must be >= 1, got 0"),
    (f"sample --run {R} --n 1000000000", "1000000000 samples of shape (1, 8, 8) need 238.4 GiB"),
    (f"sample --run {R} --nrow 0", "--nrow must be >= 1, got 0"),
    (f"sample --run {R} --batch-size 0", "--batch-size must be >= 1, got 0"),
    (f"sample --run {R} --steps 0", "--steps must be >= 1, got 0"),
    (f"sample --run {R} --labels a", "--labels expects comma-separated integers"),
    (f"sample --run {R} --labels 50", "labels must lie in [0, 9], got 50"),
    (f"sample --run {R} --labels 1,2 --n 3", "--labels gives 2 labels for --n 3"),
    (f"sample --run {R} --guidance-rescale 5", "guidance_rescale must be a finite number in [0, 1], got 5.0"),
    (f"sample --run {R} --out {{root}}/afile/x.png", "afile is a file, not a folder"),
    (f"sample --run {R} --out {{root}}/g.txt", "expected a .png, .jpg, .jpeg, .npz file name, got suffix '.txt'"),
    (f"sample --run {R} --option eta=abc", "expected float for sampler 'ddim' option 'eta'"),
    (f"sample --run {R} --option foo=1", "sampler 'ddim' has no option 'foo'"),
    (f"sample --run {R} --option eta", "override 'eta' is not of the form key=value"),
    (f"sample --run {R} --sampler foo", "unknown sampler 'foo'"),
    (f"sample --run {R} --spacing foo", "unknown spacing 'foo'"),
    (f"sample --run {R} --weights foo", "argument --weights: invalid choice: 'foo'"),
    (f"sample --run {R} --n x", "argument --n: invalid int value: 'x'"),
    (f"sample --run {R} --prompt hello", "this model is not text-conditional; it takes no prompt"),
    (f"sample --run {R} --negative-prompt hello", "this model is not text-conditional; it takes no prompt"),
    ("sample --run {root}/nothere", "run folder {root}/nothere does not exist"),
    ("sample --run {root}/empty", "is not a difflab run folder (it has no config.yaml)"),
    ("sample", "the following arguments are required: --run"),
    # damaged or mismatched run files
    ("sample --run {root}/truncated_ema", "ema.safetensors: does not match the SHA-256 that checkpoint.json recorded"),
    ("sample --run {root}/truncated_ema --no-verify", "ema.safetensors: is not a readable safetensors file"),
    ("sample --run {root}/empty_ema --no-verify", "ema.safetensors: is not a readable safetensors file"),
    ("sample --run {root}/random_ema --no-verify", "ema.safetensors: is not a readable safetensors file"),
    ("sample --run {root}/pickle_ema --no-verify", "ema.safetensors: is not a readable safetensors file"),
    ("sample --run {root}/nan_ema", "ema.safetensors: 129 tensors hold NaN or infinite values (first"),
    ("sample --run {root}/nan_ema_unhashed", "ema.safetensors: does not match the SHA-256"),
    ("sample --run {root}/empty_config", "config.yaml: is empty (rewrite it from the config"),
    ("sample --run {root}/malformed_config", "config.yaml: not valid YAML"),
    ("sample --run {root}/truncated_config", "config.yaml: lacks model.groups, model.scale_shift"),
    ("sample --run {root}/other_architecture", "ema.safetensors: does not fit the model its config describes"),
    ("sample --run {root}/damaged_pointer", "checkpoint.json: is damaged (JSONDecodeError"),
    ("sample --run {root}/missing_checkpoint", "checkpoint.json: names"),
    ("train {root}/truncated_state/config.yaml out={root}/truncated_state --resume",
     "trainer_state.pt: does not match the SHA-256"),
    ("train {root}/truncated_state/config.yaml out={root}/truncated_state --resume --no-verify",
     "trainer_state.pt: is not a readable trainer state"),
    ("train {root}/other_architecture/config.yaml out={root}/other_architecture --resume",
     "model.safetensors: does not fit the model its config describes"),
    ("train out={root}/run --resume", "--resume with another model or data than the run's config.yaml: "
                                      "model.channels=32 here, 16 in the run"),
    ("train out={root}/run", "already holds a run; pass --resume"),
    ("train out={root}/nothere --resume", "run folder {root}/nothere does not exist"),
    ("train out={root}/afile", "out={root}/afile is a file, not a run folder"),
    # config values
    ("train train.checkpoint_every=0", "config key 'train.checkpoint_every' must be >= 1, got 0"),
    ("train train.log_every=0", "config key 'train.log_every' must be >= 1, got 0"),
    ("train train.keep_checkpoints=0", "config key 'train.keep_checkpoints' must be >= 1, got 0"),
    ("train model.groups=0", "config key 'model.groups' must be >= 1, got 0"),
    ("train diffusion.timesteps=0", "config key 'diffusion.timesteps' must be >= 1, got 0"),
    ("train train.threads=-1", "config key 'train.threads' must be >= 0, got -1"),
    ("train train.device=foo", "config key 'train.device' must be auto, cpu, cuda, cuda:<index> or mps, got 'foo'"),
    ("train model.attn_levels=[7]", "config key 'model.attn_levels' names levels [7]; the U-Net has levels 0 .. 1"),
    ("train eval.sampler=foo out={root}/t", "config key 'eval.sampler': unknown sampler 'foo'"),
    ("train eval.spacing=trailing", "config key 'eval.spacing' must be one of karras"),
    ("train eval.guidance=.inf", "config key 'eval.guidance' must be a finite number, got inf"),
    ("train eval.guidance_rescale=2", "config key 'eval.guidance_rescale' must lie in [0, 1]"),
    ("train train.lr=-1", "config key 'train.lr' must be > 0, got -1.0"),
    ("train model.dropout=1.5", "config key 'model.dropout' must lie in [0, 1), got 1.5"),
    ("train model.channel_mult=[]", "config key 'model.channel_mult' must be a non-empty list"),
    ("train model.chanels=3", "unknown config key 'model.chanels' (did you mean 'model.channels'?)"),
    ("train train.batch_size=10 train.grad_accum=3 out={root}/t", "must be divisible by world_size x grad_accum = 3"),
    ("train train.precision=fp16 out={root}/t", "train.precision=fp16 needs CUDA; use bf16 on CPU"),
    ("train {root}/bad.yaml", "config file {root}/bad.yaml is not valid YAML"),
    ("train {root}/list.yaml", "config file {root}/list.yaml must hold a mapping at the top level"),
    ("train {root}/nothere.yaml", "config file {root}/nothere.yaml does not exist"),
    ("train-vae vae.latent_channels=0", "vae.channels, vae.latent_channels and vae.channel_mult must be positive"),
    ("memory --batch-size 0", "--batch-size must be >= 1, got 0"),
    ("memory --device foo", "unknown device 'foo'"),
    # image folders
    ("train data.dataset=folder data.path={root}/nothere data.channels=3 out={root}/t",
     "image folder {root}/nothere does not exist"),
    ("train data.dataset=folder data.path={root}/afile data.channels=3 out={root}/t",
     "image folder {root}/afile does not exist"),
    ("train data.dataset=folder data.path={root}/empty data.channels=3 out={root}/t", "no images (.bmp"),
    ("train data.dataset=folder data.path={root}/broken_imgs data.channels=3 out={root}/t",
     "cannot identify image file"),
    ("train data.dataset=folder data.path={root}/imgs data.channels=2 out={root}/t",
     "data.channels must be 1 or 3 for an image folder, got 2"),
    ("train data.dataset=folder data.path={root}/imgs data.channels=3 data.image_size=5",
     "data.image_size (5) must be divisible by the U-Net's downsampling factor"),
    ("train data.dataset=folder", "config key 'data.path' must name an image folder"),
    # text models
    ("train data.dataset=shapes data.channels=3 model.text_encoder=clip out={root}/t", "CLIP weights not found"),
    ("train data.dataset=shapes data.channels=3 model.text_encoder=clip model.text_encoder_path={root}/nothere "
     "out={root}/t", "CLIP weights not found: {root}/nothere"),
    ("train data.dataset=shapes data.channels=3 model.text_encoder=minilm model.text_max_length=0",
     "config key 'model.text_max_length' must be >= 1, got 0"),
    ("train data.dataset=shapes data.channels=3", "shapes are captioned: set model.text_encoder"),
    ("train model.text_encoder=minilm", "needs captioned data (data.dataset=shapes)"),
    ("train data.dataset=shapes data.channels=1 model.text_encoder=minilm", "shapes are RGB"),
    ("train model.text_encoder=gpt", "config key 'model.text_encoder' must be one of '', 'minilm', 'clip', got 'gpt'"),
    # evaluation
    (f"eval --run {R} --ref {{root}}/nothere.npz", "reference {root}/nothere.npz does not exist"),
    (f"eval --run {R} --ref {{root}}/other.npz", "other.npz: expected the keys 'mu' and 'sigma', found ['x']"),
    (f"eval --run {R} --ref {{root}}/afile", "afile: not a readable .npz of reference statistics"),
    (f"eval --run {R} --metrics foo", "unknown metric(s) foo"),
    (f"eval --run {R} --n 0", "--n must be >= 1, got 0"),
    (f"eval --run {R} --steps 0", "--steps must be >= 1, got 0"),
    (f"eval --run {R} --guidance nan", "guidance must be a finite number, got nan"),
    (f"eval --run {R} --ref {{root}}/other.npz --shard-size 0", "--shard-size must be >= 1, got 0"),
    (f"eval --run {R} --ref {{root}}/other.npz --batch-size 0", "--batch-size must be >= 1, got 0"),
    (f"eval --run {R} --extra-guidance a,b", "argument --extra-guidance: invalid comma-separated numbers value"),
    (f"eval --run {R} --extra-guidance nan", "argument --extra-guidance: invalid comma-separated numbers value"),
    (f"eval --run {R} --extra-guidance 1 --ref {{root}}/other.npz", "--extra-guidance belongs to the built-in"),
    (f"eval --run {R} --ref {{root}}/imgs --extractor clip", "CLIP weights not found"),
    (f"eval --run {R} --ref {{root}}/imgs --inception-weights {{root}}/nothere.pth",
     "Inception-v3 FID weights not found"),
    ("eval --run {root}/nothere", "run folder {root}/nothere does not exist"),
    # reference statistics
    ("fid-stats {root}/nothere --out {root}/s.npz --extractor digits", "image folder {root}/nothere does not exist"),
    ("fid-stats {root}/afile --out {root}/s.npz --extractor digits", "image folder {root}/afile does not exist"),
    ("fid-stats {root}/empty --out {root}/s.npz --extractor digits", "no images (.bmp"),
    ("fid-stats {root}/broken_imgs --out {root}/s.npz --extractor digits", "cannot identify image file"),
    ("fid-stats {root}/imgs --out {root}/s.npz --extractor digits --image-size 0", "--image-size must be >= 1, got 0"),
    ("fid-stats {root}/imgs --out {root}/s.txt --extractor digits", "expected a .npz file name, got suffix '.txt'"),
    ("fid-stats {root}/imgs --out {root}/afile/s.npz", "afile is a file, not a folder"),
    ("fid-stats {root}/imgs --out {root}/s.npz --extractor clip", "CLIP weights not found"),
    ("fid-stats {root}/imgs --out {root}/s.npz --weights {root}/nothere.pth", "Inception-v3 FID weights not found"),
    ("fid-stats {root}/imgs --out {root}/s.npz --extractor vgg", "argument --extractor: invalid choice: 'vgg'"),
]


@pytest.mark.parametrize("command,message", BAD_INPUTS, ids=[c for c, _ in BAD_INPUTS])
def test_every_bad_input_is_one_error_line(world, capsys, monkeypatch, command, message):
    monkeypatch.delenv("DIFFLAB_CLIP_PATH", raising=False)
    monkeypatch.delenv("DIFFLAB_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.chdir(world)
    args = command.format(root=world).split()
    code = _exit_code(args if args[0] == "memory" else [*args, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("difflab: error: ") and "Traceback" not in err[0], err
    assert message.format(root=world) in err[0]


def test_the_output_suffix_decides_the_format(world, capsys):
    run = world / "run"
    assert main(["sample", "--run", str(run), "--n", "4", "--steps", "2", "--out", str(world / "g.npz"), "--quiet"]) == 0
    arrays = np.load(world / "g.npz")
    assert arrays["images"].shape == (4, 1, 8, 8) and np.isfinite(arrays["images"]).all()
    assert not (world / "g.png").exists()  # the arrays only: no grid was drawn over them
    assert main(["sample", "--run", str(run), "--n", "4", "--steps", "2", "--out", str(world / "g.jpg"), "--quiet"]) == 0
    assert (world / "g.jpg").read_bytes()[:3] == b"\xff\xd8\xff" and Image.open(world / "g.jpg").format == "JPEG"
    assert np.load(world / "g.npz")["images"].shape == (4, 1, 8, 8)  # the jpg's arrays beside it


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_before_any_work(world, capsys):
    assert main(["train", "train.device=cuda", f"out={world / 'cuda'}", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == ("difflab: error: device 'cuda' asked for, but torch sees no CUDA GPU "
                                               "here; use cpu or auto")
    assert not (world / "cuda").exists()


def test_debug_shows_the_traceback_of_a_user_error(world, capsys):
    for args in (["--debug", "sample", "--run", str(world / "nothere")], ["sample", "--run", str(world / "nothere"), "--debug"]):
        with pytest.raises(runs.RunFolderError, match="does not exist"):
            main(args)
    assert main(["sample", "--run", str(world / "nothere")]) == 2


def _exit_code(args) -> int:
    try:
        return main(args)
    except SystemExit as stop:  # argparse's usage errors
        return stop.code
