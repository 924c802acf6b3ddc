"""The command line's grammar: a subcommand per stage, each with --help; --flags for command options; positional
key=value items as config overrides; anything else one line `error: ...` and exit code 2, never a traceback or a
usage dump. Nothing here trains or runs a stage."""

from __future__ import annotations

import pytest
from conftest import cli, write_config

from pipeline.orchestration.cli import COMMANDS, _parser, main

CONFIG = ["CONFIG", "key=value"]
PHOTOS = ["BUNDLE", "PATH", "--out CSV", "--whole-image", "--batch-size N", "--detect-size PX", "--workers N"]
OPTIONS = {  # what each command's --help must list
    **dict.fromkeys(("run", "folds", "train", "predict", "blend"), [*CONFIG, "--model NAME", "--fold K"]),
    "tune": [*CONFIG, "--trials N", "--folds 0,1"],
    "export": [*CONFIG, "--format {torch,onnx,kaggle}", "--python 3.12", "--wheels DIR"],
    "submit": [*CONFIG, "--file PATH", "--message TEXT", "--wait"],
    "submissions": CONFIG,
    "predict-images": [*PHOTOS, "--device"],
    "app": ["BUNDLE", "--host HOST", "--port PORT", "--max-file-size MB", "--device", "--detect-size PX"],
    "demo": ["OUT_DIR"],
}


def one_line_error(capsys) -> str:
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "usage:" not in out, out
    return err


def test_every_command_is_listed_and_has_a_help():
    assert set(COMMANDS) == set(OPTIONS)


def test_the_top_level_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: agegender [-h] COMMAND ...")
    for name, command in COMMANDS.items():
        assert f"    {name}" in out and command.help.split()[0] in out
    assert "agegender run demo" in out and "--model NAME --fold 0" in out
    assert main([]) == 2 and capsys.readouterr().out.startswith("usage: agegender")  # no command: the help, exit 2


@pytest.mark.parametrize("command", list(OPTIONS))
def test_each_command_help_lists_its_options_each_with_a_help_string(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: agegender {command} ")
    for option in OPTIONS[command]:
        assert option in out, option
    chosen = _parser(command)[1]
    for action in chosen._actions:
        assert action.help and len(action.help) > 10, action.dest


def test_python_dash_m_pipeline_is_the_same_command(tmp_path):
    r = cli("train", "--help", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage: agegender train") and "--fold K" in r.stdout
    r = cli("train", "cfg.yaml", "model=lite0", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == "error: model=lite0 is not a config key: use --model lite0\n"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv, words",
    [
        (["run", "cfg.yaml", "--foo"], ["unrecognized arguments: --foo", "--model NAME", "--fold K", "CONFIG"]),
        (["export", "cfg.yaml", "--wait"], ["unrecognized arguments: --wait", "--format", "--python", "--wheels"]),
        (["predict-images", "b.tar.gz", "x.jpg", "--port", "1"], ["unrecognized arguments: --port 1", "--out CSV"]),
        (["demo", "out", "data.root=x"], ["unrecognized arguments: data.root=x", "OUT_DIR"]),
        (["frobnicate", "cfg.yaml"], ["invalid choice: 'frobnicate'", "predict-images", "submissions"]),
        (["--foo"], ["the following arguments are required: COMMAND"]),
        (["train"], ["the following arguments are required: CONFIG", "--model NAME"]),
        (["export", "cfg.yaml", "--format", "zip"], ["argument --format: invalid choice: 'zip'", "onnx", "kaggle"]),
        (["tune", "cfg.yaml", "--folds", "0,x"], ["argument --folds: expected fold numbers", "'0,x'", "--trials N"]),
        (["train", "cfg.yaml", "--fold", "notanumber"], ["argument --fold: invalid int value: 'notanumber'"]),
        (["predict", "cfg.yaml", "--fold"], ["argument --fold: expected one argument", "--model NAME"]),
    ],
)
def test_a_wrong_command_line_is_one_line_naming_the_valid_options(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = one_line_error(capsys)
    for w in words:
        assert w in err, (w, err)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "command, item, instead",
    [
        ("train", "model=x", "use --model x"),
        ("predict", "fold=0", "use --fold 0"),
        ("run", "fold=1", "use --fold 1"),
        ("tune", "trials=3", "use --trials 3"),
        ("tune", "folds=0,1", "use --folds 0,1"),
        ("tune", "fold=1", "use --folds 1"),
        ("tune", "model=x", "use tune.model=x"),
        ("export", "format=onnx", "use --format onnx"),
        ("export", "python=3.11", "use --python 3.11"),
        ("export", "wheels=dist", "use --wheels dist"),
        ("export", "gender_labels=male,female", "use data.gender_labels=[male,female]"),
        ("submit", "file=a.csv", "use --file a.csv"),
        ("submit", "message=first try", "use --message 'first try'"),
        ("run", "format=onnx", "agegender run has no --format (agegender run --help)"),
    ],
)
def test_old_style_command_options_say_what_to_use_instead(command, item, instead, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([command, "cfg.yaml", "train.ema=0.9", item]) == 2
    assert one_line_error(capsys) == f"error: {item} is not a config key: {instead}\n"
    assert not list(tmp_path.iterdir())


def test_overrides_and_flags_mix_in_any_order():
    from pipeline.orchestration.cli import parse

    args = parse(["train", "c.yaml", "a.b=1", "--model", "m", "c.d=2", "--fold", "1", "e=[x,y]"])
    assert (args.command, args.config, args.model, args.fold) == ("train", "c.yaml", "m", 1)
    assert args.overrides == ["a.b=1", "c.d=2", "e=[x,y]"]
    args = parse(["export", "c.yaml", "--format=kaggle", "--python", "3.11", "experiment=x"])
    assert (args.format, args.python, args.wheels, args.overrides) == ("kaggle", "3.11", "", ["experiment=x"])
    args = parse(["submit", "c.yaml", "--wait", "--message", "a b"])
    assert (args.file, args.message, args.wait) == ("", "a b", True)
    assert parse(["tune", "c.yaml", "--folds", "0,2"]).folds == [0, 2]
    assert parse(["run", "c.yaml"]).overrides == [] and parse(["run", "c.yaml"]).model is None


def test_a_bad_override_key_is_refused_by_the_config_in_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "cfg.yaml")
    assert main(["train", str(cfg), "--model", "scratch_cnn", "train.nope=1"]) == 2
    assert "train.nope" in one_line_error(capsys)
    assert main(["predict", str(cfg), "nonsense"]) == 2  # not key=value: the config says how overrides look
    assert "key=value" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]
