"""The CLI: one flat table, --help on every command, one clear error line without a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from preftune.cli import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([*name.split(" "), "--help"])
    assert e.value.code == 0
    assert COMMANDS[name][1].split(" ")[0] in capsys.readouterr().out


def test_every_handler_exists():
    import importlib

    for name, (target, _, _) in COMMANDS.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


def test_config_error_is_one_clear_message_without_traceback(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dpo:\n  bta: 0.1\n")
    r = subprocess.run([sys.executable, "-m", "preftune.cli", "config", "show", str(p)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("preftune: error: 1 problem(s) in")
    assert "did you mean 'dpo.beta'" in r.stderr and "Traceback" not in r.stderr


def test_debug_shows_the_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "preftune.cli", "--debug", "config", "show", str(tmp_path / "x.yaml")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_config_show_prints_resolved_yaml(capsys, tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dpo:\n  beta: 0.2\n")
    assert main(["config", "show", str(p), "dpo.loss=ipo"]) == 0
    out = capsys.readouterr().out
    loss = yaml.safe_load(out)["dpo"]["loss"]  # the loss with every parameter resolved
    assert loss == {"name": "ipo", "beta": 0.2, "f_divergence": "reverse_kl", "f_alpha": 0.5, "normalize": "mean"}
