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
    report = (tmp_path / "report.md").read_text()
    assert "flip rate, before -> after" in report and "figures/consistency_compare.html" in report


def test_stage_commands_run_on_a_tiny_model(tmp_path):
    """Each `interp <stage>` command runs end to end and writes what it says."""
    out = tmp_path / "out"
    assert main(["capture", "--model", "tiny-llava", "--layers", "0-1", "--cache", str(tmp_path / "cache")]) == 0
    assert any((tmp_path / "cache").iterdir())
    assert main(["evaluate", "--model", "tiny-medgemma", "--limit", "6", "--out", str(out)]) == 0
    report = json.loads((out / "consistency.json").read_text())
    assert report["n"] == 6 and 0 <= report["flip_rate"] <= 1
    assert main(["find-layers", "--model", "tiny-llava", "--method", "residual", "--width", "2", "--limit", "8",
                 "--out", str(out)]) == 0
    assert len(json.loads((out / "layers.json").read_text())["layers"]) == 2
    assert main(["train", "--model", "tiny-llava", "--layers", "1-2", "--limit", "8", "--epochs", "1",
                 "--grad-accum", "2", "--out", str(tmp_path / "adapter")]) == 0
    assert list((tmp_path / "adapter").rglob("adapter_config.json"))


def test_sae_commands_take_a_saved_sae_folder(tmp_path):
    model = interp.load("tiny-llava")
    acts = interp.capture(model, interp.prompts.general()[:12], layers=[1], positions="all", progress=False)
    sae = interp.train_sae(acts, layer=1, d_sae=64, architecture="topk", k=8, steps=20, progress=False)
    sae.save_model(str(tmp_path / "sae"))
    out = tmp_path / "out"
    assert main(["transfer", "--model", "tiny-llava", "--sae", str(tmp_path / "sae"), "--layer", "1",
                 "--n-prompts", "6", "--out", str(out)]) == 0
    assert json.loads((out / "transfer.json").read_text())["layer"] == 1
    assert main(["features", "--model", "tiny-llava", "--sae", str(tmp_path / "sae"), "--layer", "1",
                 "--limit", "8", "--top", "3", "--out", str(out)]) == 0
    assert (out / "features.json").is_file()
    # an SAE for another layer is refused with the reason, not a traceback
    assert main(["transfer", "--model", "tiny-llava", "--sae", str(tmp_path / "sae"), "--layer", "2",
                 "--n-prompts", "4"]) == 2


def test_lab_launches_jupyterlab():
    with pytest.raises(SystemExit) as done:
        main(["lab", "--version"])
    assert done.value.code == 0
