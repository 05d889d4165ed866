"""Config files, command-line overrides and their validation."""

import textwrap

import pytest

from peft_jax.config import ConfigError, apply_overrides, load_config_file, split_config_args


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "exp.py"
    p.write_text(textwrap.dedent('''
        import ml_collections
        def get_config(arg=None):
            c = ml_collections.ConfigDict()
            c.peft = ml_collections.ConfigDict()
            c.peft.prompt = ml_collections.ConfigDict(dict(length=100, init="uniform"))
            c.train = ml_collections.ConfigDict(dict(lr=0.3, steps=10, bf16=False))
            c.name = arg or "default"
            return c
    '''))
    return str(p)


def test_load_and_override(cfg_file):
    cfg = load_config_file(cfg_file + ":sst2")
    assert cfg.name == "sst2"
    apply_overrides(cfg, ["peft.prompt.length=20", "train.lr=1", "train.bf16=true"])
    assert cfg.peft.prompt.length == 20
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.bf16 is True


def test_typo_names_key_and_suggests(cfg_file):
    cfg = load_config_file(cfg_file)
    with pytest.raises(ConfigError, match=r"unknown key 'lenght'.*did you mean length"):
        apply_overrides(cfg, ["peft.prompt.lenght=20"])


def test_wrong_type_names_key(cfg_file):
    cfg = load_config_file(cfg_file)
    with pytest.raises(ConfigError, match=r"peft.prompt.length: expected int"):
        apply_overrides(cfg, ["peft.prompt.length=abc"])


def test_group_cannot_be_overwritten(cfg_file):
    cfg = load_config_file(cfg_file)
    with pytest.raises(ConfigError, match="group of fields"):
        apply_overrides(cfg, ["peft.prompt=3"])


def test_split_args():
    spec, ov, rest = split_config_args(["--config", "a.py:x", "--config.a.b=3", "--config.c", "4",
                                        "--workdir", "w"])
    assert spec == "a.py:x" and ov == ["a.b=3", "c=4"] and rest == ["--workdir", "w"]


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config_file("/nonexistent/exp.py")
