"""The whole-loop runner: config checking, and the demo end to end on a reduced setting."""

from __future__ import annotations

import json

import pytest

import interp
from interp.cli import main
from interp.loop import LoopConfig


@pytest.mark.parametrize("text, message", [
    ("lora:\n  rank: 4\n", "unknown key 'lora.rank' in bad.yaml; known keys here: r, alpha"),
    ("lora:\n  r: big\n", "'lora.r' in bad.yaml is 'big', which is not a valid int"),
    ("layers:\n  method: magic\n", "'layers.method' in bad.yaml is 'magic'"),
    ("modle:\n  source: x\n", "unknown key 'modle' in bad.yaml; did you mean 'model'?"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("sae: 3\n", "'sae' in bad.yaml must be a mapping"),
])
def test_run_rejects_a_bad_config_naming_the_key(tmp_path, text, message, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(interp.InterpError) as err:
        LoopConfig.from_yaml(bad)
    assert message in str(err.value)
    assert main(["run", str(bad)]) == 2  # the CLI prints the message, no traceback
    assert message.split(";")[0] in capsys.readouterr().out.replace("\n", " ")


def test_shipped_configs_are_valid():
    from pathlib import Path

    for path in Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"):
        LoopConfig.from_yaml(path)


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_reduced_setting(tmp_path):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["selected_layers"]) == 5
    for key in ("consistency_before", "consistency_after"):
        assert 0 <= summary[key]["flip_rate"] <= 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "transfer.medical.r2" in metrics and "consistency.compare.p_z" in metrics
    assert (tmp_path / "figures" / "consistency_after.html").is_file()
    assert (tmp_path / "adapter").is_dir()
