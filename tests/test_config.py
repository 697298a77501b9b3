"""config.py on its own: where each setting comes from (defaults < a saved run < YAML < flags), every problem
in one error, `none` for an optional number, unknown keys, what a resumed or reused run may change, and the
round trip through a run's config.json."""

import dataclasses
import json
from types import SimpleNamespace
from typing import get_type_hints

import pytest

from chatmask import checkpoints, cli, config
from chatmask.config import ChatConfig, CompareConfig, DataConfig, TrainConfig
from chatmask.errors import ConfigError


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def _saved(out, data: dict, train: dict) -> str:
    """A run folder whose config.json holds these settings over the defaults, as train writes it."""
    out.mkdir()
    conf = {"data": "d.jsonl", "data_config": {**config.to_dict(DataConfig()), **data},
            "train_config": {**config.to_dict(TrainConfig()), **train}}
    (out / "config.json").write_text(json.dumps(conf))
    return str(out)


def test_each_setting_from_the_first_that_sets_it(tmp_path):
    """flags > --set > the YAML file > the saved run (with --resume) > the defaults, field by field."""
    out = _saved(tmp_path / "run", {"max_length": 512, "truncation": "right", "limit": 30},
                 {"lr": 0.1, "steps": 7, "batch_size": 3, "seed": 4})
    run_file = _yaml(tmp_path, "data:\n  truncation: drop\n  limit: 20\ntrain:\n  steps: 9\n  batch_size: 5\n")
    flags = SimpleNamespace(batch_size=6, model="m", tokenizer=None, steps=None)
    dc, tc, cc = config.resolve(flags, run_file=run_file, overrides=["data.limit=10"], resume_from=out)
    assert (tc.lr, tc.seed, dc.max_length) == (0.1, 4, 512)  # the saved run over the defaults
    assert (tc.steps, dc.truncation) == (9, "drop")  # the YAML file over the saved run
    assert dc.limit == 10  # --set over the YAML file
    assert tc.batch_size == 6  # a flag over everything
    assert tc.warmup == TrainConfig.warmup and tc.resume and cc is None  # set nowhere: the default
    assert dc.tokenizer == "m"  # the data's tokenizer is the model's unless named
    # without resume_from the saved run is not read
    dc, tc, _ = config.resolve(flags, run_file=run_file)
    assert (tc.lr, dc.max_length, tc.resume) == (TrainConfig().lr, DataConfig.max_length, False)


def test_flags_not_given_leave_the_yaml_file_its_say(tmp_path):
    """train's flags default to None (not given): a YAML value is not overwritten by a flag's default."""
    run_file = _yaml(tmp_path, "train:\n  steps: 9\n  packing: true\ndata:\n  truncation: drop\n")
    args = cli.build_parser().parse_args(["train", "d.jsonl", "--out", str(tmp_path / "o"), "--lr", "0.5"])
    dc, tc, _ = config.resolve(args, run_file=run_file)
    assert (tc.steps, tc.packing, dc.truncation, tc.lr) == (9, True, "drop", 0.5)


def test_every_problem_in_one_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.check(TrainConfig(steps=0, val_split=1.5, quantize="4bit", finetune="full", dtype="float16"))
    for flag in ("--steps", "--val-split", "--quantize", "--dtype"):
        assert flag in str(e.value)
    # and across the sections of a run: the data's problem and the training's, together
    run_file = _yaml(tmp_path, "data:\n  max_length: 0\n  train_on: everything\ntrain:\n  batch_size: 0\n")
    with pytest.raises(ConfigError) as e:
        config.resolve(run_file=run_file, compare=True, overrides=["compare.arms=masked,nope"])
    for flag in ("--max-length", "--train-on", "--batch-size", "--arms"):
        assert flag in str(e.value)
    assert ", ".join(config.TRAIN_ON) in str(e.value)  # the valid values, in their one spelling


def test_none_is_no_value_for_an_optional_number_only(tmp_path):
    dc = config.build(DataConfig, {"max_length": "none", "limit": "None", "stop_tokens": "none"})
    assert (dc.max_length, dc.limit) == (None, None)
    assert dc.stop_tokens == "none"  # a string setting keeps it: --stop-tokens none means no stop tokens
    args = cli.build_parser().parse_args(["prepare", "d.jsonl", "--out", "o", "--max-length", "none"])
    assert config.build(DataConfig, None, args).max_length is None
    tc = config.resolve(run_file=_yaml(tmp_path, "train:\n  val_rows: none\n"))[1]
    assert tc.val_rows is None
    with pytest.raises(ConfigError, match="--steps must be a number"):
        config.build(TrainConfig, {"steps": "many"})


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.build(TrainConfig, {"stepz": 3, "lr": 0.1})
    assert "stepz" in str(e.value) and "valid: " in str(e.value)
    assert all(f.name in str(e.value) for f in dataclasses.fields(TrainConfig))
    with pytest.raises(ConfigError, match=r"unknown section\(s\) trian in the run file; valid: data, train, compare"):
        config.resolve(run_file=_yaml(tmp_path, "trian:\n  steps: 3\n"))
    with pytest.raises(ConfigError, match="expected section.key=value"):
        config.resolve(overrides=["steps=3"])


def _another(cls, name: str):
    """A valid value of field `name` of `cls` other than its default."""
    value = getattr(cls(), name)
    kind, choices = config.field_kind(get_type_hints(cls)[name])
    if choices:
        return next(c for c in choices if c != value)
    if kind is bool:
        return not value
    if kind is float:
        return 0.5 if not value else value / 2  # fractions stay fractions
    if kind is int:
        return 1 if value is None else value + 1
    return {"template": "chatml", "arms": "masked"}.get(name, "x")


def test_run_changes_tells_safe_from_unsafe():
    saved = {"data_config": config.to_dict(DataConfig()), "train_config": config.to_dict(TrainConfig())}
    unsafe, safe = checkpoints.run_changes(saved, DataConfig(max_length=512),
                                      TrainConfig(lr=1e-3, steps=200, eval_every=5, resume=True))
    assert unsafe == {"max_length": (2048, 512), "lr": (None, 1e-3)}
    assert safe == {"steps": (None, 200), "eval_every": (20, 5)}  # resume itself is no change to report
    assert checkpoints.describe_changes(unsafe) == "--max-length 2048 -> 512, --lr None -> 0.001"
    # a setting the saved run predates is not compared
    old = {"data_config": {"max_length": 2048}, "train_config": {}}
    assert checkpoints.run_changes(old, DataConfig(stream="segments"), TrainConfig(lr=1.0)) == ({}, {})


# every DataConfig field but num_proc (processes that label rows: the labels are the same for any number)
@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(DataConfig) if f.name != "num_proc"])
def test_every_data_setting_changes_the_run(name):
    """Labels made another way are another run: --resume and compare's reuse refuse any such change."""
    saved = {"data_config": config.to_dict(DataConfig()), "train_config": config.to_dict(TrainConfig())}
    changed = dataclasses.replace(DataConfig(), **{name: _another(DataConfig, name)})
    unsafe, _ = checkpoints.run_changes(saved, changed, TrainConfig())
    assert list(unsafe) == [name]


@pytest.mark.parametrize("cls", [DataConfig, TrainConfig, CompareConfig, ChatConfig])
def test_to_dict_and_build_round_trip(cls):
    """What a run writes to config.json builds the same config back, as a YAML section or a saved run."""
    exclusive = ("quantize", "epochs")  # with full fine-tuning and with --steps: not at once
    cfg = config.check(cls(**{f.name: _another(cls, f.name) for f in dataclasses.fields(cls)
                              if f.name not in exclusive}))
    assert cfg != cls()
    written = json.loads(json.dumps(config.to_dict(cfg)))
    assert config.build(cls, written) == cfg
    assert config.build(cls, None, base=written) == cfg


def test_saved_run_turns_resume_on_and_is_empty_before_the_first_start(tmp_path):
    assert config.saved_run(tmp_path / "nothing") == {}
    out = _saved(tmp_path / "run", {}, {"steps": 3})
    assert config.saved_run(out)["train_config"]["resume"] is True


def test_train_on_and_truncation_are_spelt_in_one_place():
    """config's TRAIN_ON / TRUNCATION are what DataConfig validates, labels checks and the demo offers."""
    from chatmask import labels

    assert labels.TRAIN_ON is config.TRAIN_ON and labels.TRUNCATION is config.TRUNCATION
    hints = get_type_hints(DataConfig)
    assert config.field_kind(hints["train_on"])[1] == list(config.TRAIN_ON)
    assert config.field_kind(hints["truncation"])[1] == list(config.TRUNCATION)
    demo = cli.build_parser()._subparsers._group_actions[0].choices["demo"]
    assert next(a for a in demo._actions if a.dest == "train_on").choices is config.TRAIN_ON


@pytest.mark.parametrize("cls, name", [(CompareConfig, "seeds"), (CompareConfig, "metric_questions"),
                                       (TrainConfig, "keep_checkpoints"), (TrainConfig, "lora_r")])
def test_a_count_of_zero_is_refused_before_any_work(cls, name):
    """`compare --seeds 0` ran nothing and then failed on an empty report; `--keep-checkpoints 0` kept all."""
    with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')} must be at least 1, not 0"):
        config.check(cls(**{name: 0}))
