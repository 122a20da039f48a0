"""Config schemas: defaults, typo'd keys, wrong types, bad values; every config composes."""

import os

import pytest
from conftest import REPO, ToyTrainer, make_cfg
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import ckptkit
from ckptkit.config import load_config

CONFIGS = os.path.join(REPO, "configs")


def test_defaults_fill_missing_keys(tmp_path):
    run, full = load_config({"name": "x", "model": {"anything": [1, 2]}})
    assert run.run_dir == "runs/x"
    assert run.checkpoint.dir == "runs/x/checkpoints"
    assert run.checkpoint.max_to_keep == 3 and run.checkpoint.async_save is True
    assert run.checkpoint.resume == "auto" and run.export.from_ == "best"
    assert run.trainer.steps_per_loop == 100
    assert full.model.anything == [1, 2]  # user keys pass through untouched


@pytest.mark.parametrize(
    "override,key",
    [
        ({"trainer": {"max_step": 5}}, "trainer.max_step"),
        ({"checkpoint": {"best": {"metrc": "acc"}}}, "checkpoint.best.metrc"),
        ({"export": {"fromm": "last"}}, "export.fromm"),
    ],
)
def test_unknown_key_is_named(tmp_path, override, key):
    with pytest.raises(ckptkit.ConfigError, match=key.replace(".", r"\.")) as err:
        ToyTrainer({**make_cfg(tmp_path), **override})
    assert err.value.key == key


@pytest.mark.parametrize(
    "dotted,value",
    [
        ("trainer.max_steps", "many"),
        ("checkpoint.async_save", "maybe"),
        ("trainer.steps_per_loop", 2.5),
        ("export.verify", "perhaps"),
    ],
)
def test_wrong_type_is_named(tmp_path, dotted, value):
    with pytest.raises(ckptkit.ConfigError, match=dotted.replace(".", r"\.")):
        ToyTrainer(make_cfg(tmp_path, **{dotted: value}))


@pytest.mark.parametrize(
    "dotted,value,words",
    [
        ("trainer.max_steps", -5, "zero or positive"),
        ("checkpoint.save_every_steps", -5, "positive"),
        ("checkpoint.best.mode", "median", "min, max"),
        ("checkpoint.resume", "sometimes", "auto, never, must"),
        ("export.from", "middle", "best, last"),
        ("checkpoint.max_to_keep", 0, "positive"),
        ("checkpoint.save_every_seconds", "often", "auto or null"),
        ("checkpoint.max_overhead", 0.02, "only with checkpoint.save_every_seconds=auto"),
    ],
)
def test_bad_value_is_named(tmp_path, dotted, value, words):
    with pytest.raises(ckptkit.ConfigError) as err:
        ToyTrainer(make_cfg(tmp_path, **{dotted: value}))
    assert err.value.key == dotted and words in str(err.value)


def test_choices_reach_hooks_as_plain_strings(tmp_path):
    trainer = ToyTrainer(make_cfg(tmp_path, **{"checkpoint.best.mode": "max"}))
    assert trainer.cfg.checkpoint.best.mode == "max" and type(trainer.cfg.checkpoint.best.mode) is str
    assert type(trainer.settings.checkpoint.resume) is str
    assert type(trainer.settings.export.from_) is str


def test_name_or_run_dir_required():
    with pytest.raises(ckptkit.ConfigError, match="run_dir"):
        load_config({"trainer": {"max_steps": 3}})


def _compose(overrides=()):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="digits", overrides=list(overrides))


def test_digits_config_composes_and_validates():
    cfg = _compose()
    run, full = load_config(cfg)
    assert run.name == "digits" and run.run_dir == "runs/digits"
    assert run.checkpoint.best.metric == "accuracy" and run.checkpoint.best.mode == "max"
    assert full.data.batch_size == 64


@pytest.mark.parametrize("group", ["trainer", "checkpoint", "export", "strategy"])
def test_every_config_group_option_composes(group):
    from hydra.core.config_store import ConfigStore

    packaged = [n[:-5] for n in ConfigStore.instance().repo[group]]  # default, schema
    here = os.path.join(CONFIGS, group)
    options = packaged + [f[:-5] for f in (os.listdir(here) if os.path.isdir(here) else []) if f.endswith(".yaml")]
    assert "default" in options
    for option in options:
        run, _ = load_config(_compose([f"{group}={option}"]))
        assert run.trainer.max_steps > 0


def test_command_line_overrides_reach_the_settings():
    run, _ = load_config(_compose(["checkpoint.max_to_keep=7", "export.from=last", "name=other"]))
    assert run.checkpoint.max_to_keep == 7 and run.export.from_ == "last"
    assert run.checkpoint.dir == "runs/other/checkpoints"


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.max_step=5", "max_step"),
        ("checkpoint.best.moed=max", "moed"),
        ("trainer.seed=lots", "seed"),
        ("export.verify=perhaps", "verify"),
        ("checkpoint.best.mode=median", "best.mode"),
        ("export.from=middle", "from"),
    ],
)
def test_hydra_rejects_typos_and_types_at_compose_time(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        _compose([override])
    assert key in str(err.value) or key in str(err.value.__cause__)


def test_schemas_are_in_the_config_store():
    from hydra.core.config_store import ConfigStore

    repo = ConfigStore.instance().repo
    for group in ("trainer", "checkpoint", "export", "strategy"):
        assert "schema.yaml" in repo[group]
    assert OmegaConf.is_config(repo["checkpoint"]["schema.yaml"].node)


def test_a_rename_map_is_overridden_as_users_type_it():
    """`checkpoint.init_from.rename={old/: new/}` without Hydra's `+`; unknown keys of the
    group are still refused."""
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(
            config_name="digits",
            overrides=["checkpoint.init_from.rename={model/backbone/: model/encoder/, head/: top/}"],
        )
        assert dict(cfg.checkpoint.init_from.rename) == {"model/backbone/": "model/encoder/", "head/": "top/"}
        assert load_config(cfg)[0].checkpoint.init_from.rename == {"model/backbone/": "model/encoder/", "head/": "top/"}
        with pytest.raises(ConfigCompositionException, match="renam"):
            compose(config_name="digits", overrides=["checkpoint.init_from.renam={a/: b/}"])


def test_step_counts_accept_whole_floats_as_typed():
    """`trainer.max_steps=1e4` is a float to Hydra's parser: taken as 10000 (an int, for
    ckptkit and for the user's code); 2.5 steps are refused, naming the key."""
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="digits", overrides=["trainer.max_steps=1e4", "checkpoint.save_every_steps=5e2"])
        run, full = load_config(cfg)
        assert run.trainer.max_steps == 10000 and type(run.trainer.max_steps) is int
        assert run.checkpoint.save_every_steps == 500 and type(full.checkpoint.save_every_steps) is int
        with pytest.raises(ckptkit.ConfigError, match="trainer.max_steps.*whole number"):
            load_config(compose(config_name="digits", overrides=["trainer.max_steps=2.5"]))
        with pytest.raises(ckptkit.ConfigError, match="trainer.eval_every_steps.*must be a number"):
            load_config(compose(config_name="digits", overrides=["trainer.eval_every_steps=often"]))


@pytest.mark.parametrize(
    "key, value", [("exit_code_preempted", 0), ("exit_code_preempted", 256), ("exit_code_peer_lost", "x")]
)
def test_exit_codes_are_exit_statuses(tmp_path, key, value):
    cfg = make_cfg(tmp_path)
    cfg["trainer"][key] = value
    with pytest.raises(ckptkit.ConfigError, match=f"trainer.{key}"):
        ToyTrainer(cfg)


TYPOS = [
    ("trainer.max_step=5", "trainer.max_step", "did you mean trainer.max_steps?"),
    ("checkpoint.save_every_step=5", "checkpoint.save_every_step", "did you mean checkpoint.save_every_steps?"),
    ("checkpoint.best.metrc=accuracy", "checkpoint.best.metrc", "did you mean checkpoint.best.metric?"),
    ("export.enable=false", "export.enable", "did you mean export.enabled?"),
    ("strategy.knd=mirrored", "strategy.knd", "did you mean strategy.kind?"),
]


@pytest.mark.parametrize("plus", ["+", "++"])
@pytest.mark.parametrize("override, key, hint", TYPOS)
def test_a_typo_added_with_plus_is_refused_with_the_nearest_key(override, key, hint, plus):
    """Hydra's own hint turns `trainer.max_step=5` into `+trainer.max_step=5`, which adds
    the key past the schema (issue 31): ckptkit refuses it however it arrives."""
    cfg = _compose([plus + override])
    with pytest.raises(ckptkit.ConfigError) as err:
        load_config(cfg)
    assert str(err.value) == f"config key `{key}`: unknown key; {hint}"


def test_a_typo_in_a_group_file_is_refused(tmp_path):
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "base.yaml").write_text("max_step: 5\n")  # without the schema Hydra lets it in
    (tmp_path / "config.yaml").write_text(
        "defaults:\n  - trainer: base\n  - checkpoint: default\n  - export: default\n  - strategy: default\n"
        "  - _self_\nname: x\n"
    )
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose(config_name="config")
    with pytest.raises(ckptkit.ConfigError, match=r"trainer.max_step`: unknown key; did you mean trainer.max_steps"):
        load_config(cfg)


def test_an_old_record_holding_a_typo_names_the_file(tmp_path, capsys):
    """A run record written before typos were refused: export says where the key is."""
    import yaml

    from ckptkit import cli

    run = tmp_path / "run"
    ToyTrainer(make_cfg(run, **{"trainer.max_steps": 2})).fit()
    record = yaml.safe_load((run / "ckptkit_run.yaml").read_text())
    record["config"]["trainer"]["max_step"] = 5
    (run / "ckptkit_run.yaml").write_text(yaml.safe_dump(record))
    assert cli.main(["export", str(run)]) == 1
    message = capsys.readouterr().err
    assert "config key `trainer.max_step`: unknown key; did you mean trainer.max_steps?" in message
    assert f"in the run record {run}/ckptkit_run.yaml" in message and "correct or delete that line" in message


def test_a_file_url_run_dir_trains_exports_and_resumes(tmp_path):
    """`run_dir=file:///...` (issue 31): the local path, with every local-disk guarantee."""
    url = f"file://{tmp_path}/run"
    first = ToyTrainer(make_cfg(url, **{"trainer.max_steps": 10, "export.enabled": True, "export.verify": False}))
    assert first.run_dir == str(tmp_path / "run")
    result = first.fit()
    assert result.export_path == str(tmp_path / "run" / "export" / "1")
    assert ToyTrainer(make_cfg(url, **{"trainer.max_steps": 20})).fit().resumed_from == 10
    with pytest.raises(ckptkit.ConfigError, match="a file URL must name an absolute local path"):
        ToyTrainer(make_cfg("file://otherhost/runs/x"))
