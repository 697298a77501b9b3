"""What a newcomer reads: every subcommand's --help, and the mistakes a user makes, through the CLI
(exit codes and message text)."""

import json

import pytest

from chatmask import cli

OK = {"messages": [{"role": "user", "content": "Hi there, how are you today?"},
                   {"role": "assistant", "content": "Hello! I am fine."}]}
COMMANDS = ("demo", "check", "prepare", "view", "stats", "train", "compare", "chat")


def _help(capsys, command) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare as one line


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help_and_no_empty_default(command, capsys):
    text = _help(capsys, command)
    assert "(default: None)" not in text and "(default: ...)" not in text
    assert text.count("(default:") == text.count("(default: ") and "default: ... (default" not in text
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings[0]} has no help"
            assert action.help.count("default:") <= 1, f"{command} {action.option_strings[0]}: {action.help}"


def test_help_says_what_newcomers_ask(capsys):
    assert "none: no limit" in _help(capsys, "prepare")
    view = _help(capsys, "view")
    assert "--salvage, --no-salvage" in view and "which tokens get labels" in view and "row format" in view
    assert "the model to fine-tune" in _help(capsys, "demo")
    stats = _help(capsys, "stats")
    assert "rows_dropped_for_length" in stats and "trained_fraction" in stats
    assert "--epochs" in _help(capsys, "train") and "--quantize" in _help(capsys, "train")


@pytest.fixture
def data(tmp_path, monkeypatch, bpe_tok):
    monkeypatch.setenv("CHATMASK_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(OK) for _ in range(4)))
    tok = tmp_path / "tok"
    bpe_tok.save_pretrained(tok)
    return str(p), str(tok)


def test_max_length_none_means_no_limit(data, tmp_path, capsys):
    d, tok = data
    assert cli.main(["prepare", d, "--tokenizer", tok, "--out", str(tmp_path / "p"), "--max-length", "none",
                     "--quiet"]) == 0
    assert json.loads((tmp_path / "p" / "config.json").read_text())["max_length"] is None
    with pytest.raises(SystemExit) as e:
        cli.main(["prepare", d, "--tokenizer", tok, "--out", str(tmp_path / "p"), "--max-length", "nine"])
    assert e.value.code == 2


def test_max_length_too_small_names_the_fix_and_every_reason(data, tmp_path, capsys):
    d, tok = data
    rc = cli.main(["prepare", d, "--tokenizer", tok, "--out", str(tmp_path / "p"), "--max-length", "10", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "no row became an example" in err and "4 first answer past max_length" in err
    assert "raise --max-length" in err and "Fix the row" not in err


@pytest.mark.parametrize("command", ["prepare", "train", "compare"])
def test_out_that_is_a_file(command, data, tmp_path, capsys):
    d, tok = data
    f = tmp_path / "afile"
    f.write_text("x")
    rc = cli.main([command, d, "--tokenizer", tok, "--out", str(f)])
    assert rc == 2 and "is a file; pass a folder" in capsys.readouterr().err


def test_fail_if_is_checked_before_anything_is_computed(data, tmp_path, capsys):
    d, tok = data
    rc = cli.main(["stats", d, "--tokenizer", tok, "--fail-if", "bogus>1"])
    cap = capsys.readouterr()
    assert rc == 2 and "unknown statistic 'bogus'" in cap.err and "rows_dropped_for_length" in cap.err
    assert "labelling" not in cap.out
    assert cli.main(["stats", d, "--tokenizer", tok, "--quiet", "--max-length", "30",
                     "--fail-if", "rows_dropped_for_length>0"]) == 1  # every row dropped: still the audit


def test_messages_count_from_one_like_lines(tmp_path, data, capsys):
    d, tok = data
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}))
    assert cli.main(["prepare", str(bad), "--tokenizer", tok, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "bad.jsonl:1, message 2: unknown role 'robot'" in capsys.readouterr().err
