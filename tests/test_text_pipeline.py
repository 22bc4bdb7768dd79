"""Text-to-image end to end on the shapes world: config -> training -> pipeline and CLI with prompts."""
import pytest
import torch

import difflab
from difflab import runs
from difflab.cli import main
from difflab.config import ConfigError, load_config
from difflab.train import train

TINY_TEXT = ["data.dataset=shapes", "data.image_size=8", "data.channels=3", "data.scenes=48",
             "model.text_encoder=minilm", "model.channels=16", "model.groups=4", "model.head_dim=16",
             "model.channel_mult=[1,2]", "model.attn_levels=[1]", "train.batch_size=8", "train.steps=3",
             "train.warmup=1", "train.checkpoint_every=3", "train.sample_every=3", "train.log_every=1",
             "eval.steps=3", "eval.n_samples=8"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "run"
    train(load_config(None, TINY_TEXT + [f"out={out}"]), progress=False)
    return out


def test_text_model_trains_and_samples_from_prompts(text_run):
    pipe = difflab.load(text_run)
    assert pipe.is_text and pipe.num_classes is None
    a = pipe("a red circle", n=4, steps=3, guidance=3, seed=0, progress=False)
    assert a.shape == (4, 3, 8, 8) and a.abs().max() <= 1
    assert torch.equal(a, pipe("a red circle", n=4, steps=3, guidance=3, seed=0, progress=False))
    b = pipe("a blue square", n=4, steps=3, guidance=3, seed=0, progress=False)
    assert not torch.equal(a, b)  # the prompt reaches the network
    neg = pipe("a red circle", n=4, steps=3, guidance=3, seed=0, negative_prompt="a blue square", progress=False)
    assert not torch.equal(a, neg)
    per_sample = pipe(["a red circle", "a blue square"], n=2, steps=3, guidance=3, seed=0, progress=False)
    torch.testing.assert_close(per_sample[0], a[0], rtol=1e-4, atol=1e-5)
    assert (text_run / "samples" / "step_0000003.png").exists()


def test_text_pipeline_errors(text_run):
    pipe = difflab.load(text_run)
    with pytest.raises(ValueError, match="prompt"):
        pipe(n=2, steps=2, progress=False)
    with pytest.raises(ValueError, match="not labels"):
        pipe("a red circle", n=2, labels=[1, 2], steps=2, progress=False)
    with pytest.raises(ValueError, match="list of 3 prompts"):
        pipe(["a", "b"], n=3, steps=2, progress=False)
    with pytest.raises(TypeError, match="n="):
        pipe(4)


def test_cli_sample_with_prompt(text_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--run", str(text_run), "--prompt", "a green triangle", "--negative-prompt", "red",
                 "--guidance", "4", "--guidance-rescale", "0.5", "--n", "4", "--steps", "2", "--out", str(out),
                 "--quiet"]) == 0
    assert out.exists() and out.with_suffix(".npz").exists()
    assert main(["sample", "--run", str(text_run), "--labels", "3", "--n", "2", "--quiet",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "text-conditional" in capsys.readouterr().err


def test_text_config_errors():
    with pytest.raises(ConfigError, match="text_encoder"):
        load_config(None, ["data.dataset=shapes", "data.channels=3", "data.image_size=16"])
    with pytest.raises(ConfigError, match="captioned data"):
        load_config(None, ["model.text_encoder=minilm"])
    with pytest.raises(ConfigError, match="RGB"):
        load_config(None, ["data.dataset=shapes", "model.text_encoder=minilm"])


def test_concept_embedding_is_the_masked_mean(text_run):
    c = difflab.load(text_run).conditioner
    prompts = ["a red circle", "a small red square on the left"]
    each, concept = c.encode(prompts), c.encode_concept(prompts)
    assert concept.context.shape[0] == 1 and concept.context.shape[1] == each.context.shape[1]
    short = int(each.context_mask[0].sum())
    torch.testing.assert_close(concept.context[0, :short], each.context[:, :short].mean(0))
    torch.testing.assert_close(concept.context[0, short:], each.context[1, short:])  # only the long prompt is there
    torch.testing.assert_close(concept.pooled[0], each.pooled.mean(0))


def test_text_training_resumes_bit_exactly(tmp_path):
    from safetensors.torch import load_file

    def cfg(steps, out):
        return load_config(None, TINY_TEXT + [f"train.steps={steps}", "train.checkpoint_every=2",
                                              "train.sample_every=0", f"out={tmp_path / out}"])
    train(cfg(4, "straight"), progress=False)
    train(cfg(2, "resumed"), progress=False)
    train(cfg(4, "resumed"), resume=True, progress=False)
    for name in ("model", "ema"):
        a, b = (load_file(str(runs.weights_path(tmp_path / run, name))) for run in ("straight", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_different_text_encoder_is_refused(text_run, tmp_path):
    import json
    import shutil

    from difflab.train import TrainingError

    run = tmp_path / "copy"
    shutil.copytree(text_run, run)
    record = json.loads((run / "text_encoder.json").read_text())
    assert record["name"] == "all-MiniLM-L6-v2" and len(record["weights_sha256"]) == 64
    record["weights_sha256"] = "0" * 64  # as if trained against other weights of the same width
    (run / "text_encoder.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="text encoder"):
        difflab.load(run)
    with pytest.raises(TrainingError, match="text encoder"):
        train(load_config(None, TINY_TEXT + [f"out={run}", "train.steps=5"]), resume=True, progress=False)


def test_encode_runs_each_distinct_prompt_once_with_the_same_result(text_run):
    c = difflab.load(text_run).conditioner
    prompts = ["a red circle", "a small blue square on the left", "a red circle"]
    calls = []
    encoder = c.encoder
    c.encoder = lambda captions: calls.append(list(captions)) or encoder(captions)
    got = c.encode(prompts)
    c.encoder = encoder
    direct = encoder(prompts)
    assert calls == [["a red circle", "a small blue square on the left"]]
    torch.testing.assert_close(got.context, direct.tokens)
    assert torch.equal(got.context_mask, direct.mask)
    torch.testing.assert_close(got.pooled, direct.pooled)
