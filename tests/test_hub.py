"""Where models and tokenizers come from: the generic tokenizer folder loaded without torch and equal to
AutoTokenizer's, a hub name that cannot be reached failing at once with what to do, folders written with
the user's umask."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_main, run_cli, write_jsonl

from chatmask import hub
from chatmask.errors import ConfigError

ROW = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}


def test_generic_folder_loads_like_autotokenizer(tok_dir):
    from transformers import AutoTokenizer

    assert hub._generic_folder(tok_dir)
    ours, auto = hub.load_tokenizer(tok_dir), AutoTokenizer.from_pretrained(tok_dir)
    assert type(ours) is type(auto)
    assert ours.get_vocab() == auto.get_vocab()
    assert ours.all_special_tokens == auto.all_special_tokens and ours.chat_template == auto.chat_template
    text = "<|im_start|>user\nHello there, world!<|im_end|>\n"
    assert ours(text)["input_ids"] == auto(text)["input_ids"]


def test_folder_with_model_config_goes_through_autotokenizer(tok_dir, tmp_path):
    # a config.json may make AutoTokenizer pick the model type's own class: never bypass it then
    d = tmp_path / "withconfig"
    d.mkdir()
    for f in Path(tok_dir).iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not hub._generic_folder(str(d))


def test_check_and_prepare_do_not_import_torch(tok_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [ROW])
    prepare = ["prepare", data, "--tokenizer", tok_dir, "--out", str(tmp_path / "p"), "--quiet"]
    code = ("import sys; from chatmask.cli import main; "
            f"assert main(['check', '--tokenizer', {tok_dir!r}]) == 0; assert main({prepare!r}) == 0; "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"


def _offline_cli(tmp_path, *argv, **env):
    """The CLI in a process of its own (huggingface_hub reads HF_HUB_OFFLINE at import), not offline unless
    `env` says so, with a hub cache of its own."""
    return run_cli(*argv, env={"HF_HUB_OFFLINE": None, "HF_HOME": str(tmp_path / "hf"), **env}, timeout=60)


def test_unreachable_hub_fails_at_once_with_what_to_do(tmp_path):
    # a port nothing listens on: the hub "cannot be reached"; huggingface_hub would retry for most of a minute
    r = _offline_cli(tmp_path, "check", "--tokenizer", "nobody/no-such-model", HF_ENDPOINT="http://127.0.0.1:9")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "Retry" not in r.stderr
    assert "cannot be reached" in r.stderr and "nobody/no-such-model" in r.stderr
    assert "local folder" in r.stderr and ".gguf" in r.stderr


def test_offline_mode_names_itself(tmp_path):
    r = _offline_cli(tmp_path, "check", "--tokenizer", "nobody/no-such-model", HF_HUB_OFFLINE="1")
    assert r.returncode == 2 and "HF_HUB_OFFLINE is set" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name, msg", [("./no/such/folder", "no such folder"), ("~/nope-chatmask-x", "no such folder"),
                                       ("a/b/c", "no such folder"), ("missing.gguf", "no such GGUF file")])
def test_local_names_that_do_not_exist(name, msg):
    with pytest.raises(ConfigError, match=msg):
        hub.locate(name, "tokenizer")


def test_a_file_is_not_a_model_folder(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ConfigError, match="is a file, not a model folder"):
        hub.locate(str(f))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_prepared_folder_has_the_umask_permissions(umask, tmp_path, tok_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [ROW])
    old = os.umask(umask)
    try:
        rc, _, err = cli_main(capsys, "prepare", data, "--tokenizer", tok_dir, "--out", str(tmp_path / "p"), "--quiet")
    finally:
        os.umask(old)
    assert rc == 0, err
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o777 & ~umask


def test_a_model_folder_without_a_tokenizer_says_so(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="has no tokenizer.*--tokenizer"):
        hub.load_tokenizer(str(tmp_path))
