from pathlib import Path

import pytest
import yaml

from difflab.config import Config, ConfigError, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_default_yaml_equals_builtin_defaults():
    assert load_config(ROOT / "configs" / "digits.yaml").to_dict() == Config().to_dict()


def test_overrides_are_typed():
    cfg = load_config(None, ["train.steps=10", "model.channel_mult=[1,2,2]", "train.lr=1", "eval.guidance=2"])
    assert cfg.train.steps == 10 and cfg.model.channel_mult == [1, 2, 2]
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert parse_overrides(["a.b=3", "a.c=x"]) == {"a": {"b": 3, "c": "x"}}


@pytest.mark.parametrize("override,message", [
    ("train.stpes=10", "unknown config key 'train.stpes' (did you mean 'train.steps'?)"),
    ("modle.channels=3", "unknown config key 'modle' (did you mean 'model'?)"),
    ("train.steps=ten", "config key 'train.steps' expects int, got 'ten'"),
    ("train.steps=0", "config key 'train.steps' must be >= 1"),
    ("diffusion.schedule=cosin", "config key 'diffusion.schedule' must be one of"),
    ("model.groups=7", "config key 'model.groups' (7) must divide"),
    ("train.steps", "is not of the form key=value"),
    ("train=3", "config key 'train' is a section"),
    ("model.mid_attn=1", "config key 'model.mid_attn' expects bool"),
])
def test_bad_config_is_one_clear_error(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"batchsize": 3}}))
    with pytest.raises(ConfigError, match="did you mean 'train.batch_size'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
