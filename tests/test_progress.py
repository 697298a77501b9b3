"""Progress in logs: plain lines at intervals when stderr is not a terminal (tqdm would draw nothing)."""

from chatmask.progress import Lines, progress


def test_plain_lines_at_intervals_with_eta_and_postfix(capsys):
    p = Lines(4, "train (assistant)", "steps", every=0)
    p.update(1, loss="1.5000")
    p.update(1)
    p.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("train (assistant): 1/4 steps (25%), 0s, ~") and "left" in lines[0]
    assert lines[0].endswith("loss=1.5000") and lines[1].startswith("train (assistant): 2/4 steps (50%)")
    assert len(lines) == 2  # close() does not repeat the state already printed


def test_quiet_between_intervals_but_the_end_is_always_said(capsys):
    p = Lines(None, "labelling", "conversations", every=3600)
    for _ in range(1000):
        p.update(1)
    assert capsys.readouterr().out == ""
    p.close()
    assert capsys.readouterr().out.startswith("labelling: 1,000 conversations, ")


def test_resumed_counts_from_the_initial_step(capsys):
    p = Lines(10, "train", "steps", initial=8, every=3600)
    p.update(1)
    p.update(1)
    assert "10/10 steps (100%)" in capsys.readouterr().out


def test_not_a_terminal_gives_lines():
    assert isinstance(progress(3, "x", "steps"), Lines)  # pytest captures stderr: not a terminal
