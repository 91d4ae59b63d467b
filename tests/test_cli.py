"""The command line: every bad value is one line on stderr with a non-zero exit code, every option documents
its default, and the stage commands take their side of the train/held-out split."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from interp.cli import _pairs, build_parser, main


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading a model: values must be checked before that."""
    import interp

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad value was found")

    monkeypatch.setattr(interp, "load", refuse)


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--limit", "0"], "argument --limit: 0 must be >= 1"),
    (["evaluate", "--limit", "-1"], "argument --limit: -1 must be >= 1"),
    (["features", "--sae", "x", "--top", "-3"], "argument --top: -3 must be >= 1"),
    (["capture", "--layers", "abc"], "argument --layers: 'abc' is not a layer list"),
    (["capture", "--layers=-1"], "argument --layers: '-1' is not a layer list"),
    (["capture", "--layers", "5-3"], "'5-3' is not a layer list"),
    (["evaluate", "--mapping", "question_a"], "--mapping 'question_a': write our_field=their_column"),
    (["capture", "--prompts", "no/such/prompts.txt"], "--prompts 'no/such/prompts.txt': no such file"),
    (["evaluate", "--pairs", "no/such/pairs.jsonl"], "--pairs 'no/such/pairs.jsonl': no such file"),
    (["train", "--layers", "1-2", "--lr", "nan"], "argument --lr: nan must be a finite number"),
    (["train", "--layers", "1-2", "--lr", "0"], "argument --lr: 0 must be a finite number in (0, inf)"),
    (["train", "--layers", "1-2", "--dropout", "1"], "argument --dropout: 1 must be a finite number in [0, 1)"),
    (["train", "--layers", "1-2", "--r", "0"], "argument --r: 0 must be >= 1"),
    (["evaluate", "--batch-size", "0"], "argument --batch-size: 0 must be >= 1"),
    (["evaluate", "--eval-fraction", "1"], "argument --eval-fraction: 1 must be a finite number in (0, 1)"),
    (["evaluate", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["evaluate", "--model", "tiny-medgemma", "--device", "nonsense"], "'nonsense' is not a torch device"),
    (["evaluate", "--model", "tiny-medgemma", "--dtype", "floaty"], "dtype='floaty' is not a torch dtype"),
    (["evaluate", "--model", "tiny-medgemma", "--dtype", "int8"], "--dtype int8: models run in a floating-point"),
    (["evaluate", "--out", "/proc/interp"], "--out '/proc/interp' is inside a system folder"),
    (["find-layers", "--method", "sae"], "--method sae needs --sae"),
    (["evaluate", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ([], "the following arguments are required: COMMAND"),
    (["export", "--param", "import os;os.system('true');x=1"], "is not a Python identifier"),
    (["export", "--seed", "-1"], "argument --seed: -1 must be >= 0"),
])
def test_a_bad_value_is_one_line_on_stderr_and_exit_2(argv, message, capsys, no_model):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err, err
    assert "Traceback" not in out + err


def test_an_output_path_that_is_a_file_or_holds_user_files_is_refused(tmp_path, capsys, no_model):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main(["evaluate", "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "consistency.json").write_text("my own results")
    assert main(["evaluate", "--out", str(folder)]) == 2
    assert "already holds files that interp did not write (consistency.json)" in capsys.readouterr().err
    assert (folder / "consistency.json").read_text() == "my own results"


def test_the_installed_command_exits_non_zero_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "interp", "evaluate", "--limit", "0"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: interp evaluate: argument --limit: 0 must be >= 1 (see 'interp evaluate --help')"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_text_and_shows_its_default():
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"interp {name} {action.option_strings or action.dest}: no help text"
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.option_strings[-1] in text
        if any(a.option_strings and not isinstance(a, argparse._HelpAction) for a in sub._actions):
            assert "(default:" in " ".join(text.split()), name


def test_train_help_says_where_its_defaults_differ_from_the_demo():
    from interp.loop import LoopConfig

    demo = LoopConfig.demo().lora  # the demo's settings live in interp.demo; train's defaults are the study's
    text = " ".join(_subparsers(build_parser())["train"].format_help().split())
    assert demo.r == 8 and demo.lr != 2e-4 and demo.epochs != 3
    assert f"--r {demo.r} (here 16)" in text and f"--lr {demo.lr:g} (here 0.0002)" in text
    assert f"--epochs {demo.epochs} (here 3)" in text


def test_selection_commands_take_the_training_side_and_evaluate_the_held_out_side():
    parser = build_parser()
    sides = {}
    for command, extra in (("find-layers", []), ("train", ["--layers", "1-2"]), ("evaluate", [])):
        args = parser.parse_args([command, "--limit", "40", *extra])
        chosen, held = _pairs(args)
        sides[command] = {p.id for p in chosen}
        assert {p.id for p in held} == (sides[command] if command == "evaluate" else
                                        {p.id for p in held} - sides[command])
    assert sides["find-layers"] == sides["train"]
    assert not sides["find-layers"] & sides["evaluate"]
    args = parser.parse_args(["evaluate", "--limit", "40", "--split", "all"])
    assert len(_pairs(args)[0]) == 40
