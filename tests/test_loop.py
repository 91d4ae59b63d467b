"""The whole-loop runner: config checking, and the demo end to end on a reduced setting."""

from __future__ import annotations

import json
import time

import pytest

import interp
from interp.cli import main
from interp.export import pairs_digest
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
    assert main(["run", str(bad)]) == 2  # the CLI prints the message as one line, no traceback
    err = capsys.readouterr().err
    assert message.split(";")[0] in err and err.count("\n") == 1


@pytest.mark.parametrize("text, message", [
    ("lora:\n  r: 0\n", "'lora.r' in bad.yaml is 0; it must be an integer >= 1"),
    ("lora:\n  lr: 0\n", "'lora.lr' in bad.yaml is 0; it must be a finite number > 0"),
    ("lora:\n  lr: -1.0e-3\n", "'lora.lr' in bad.yaml is -0.001"),
    ("lora:\n  lr: .nan\n", "'lora.lr' in bad.yaml is nan"),
    ("lora:\n  dropout: 1.0\n", "'lora.dropout' in bad.yaml is 1.0; it must be in [0, 1)"),
    ("lora:\n  batch_size: 0\n", "'lora.batch_size' in bad.yaml is 0"),
    ("lora:\n  grad_accum: -2\n", "'lora.grad_accum' in bad.yaml is -2"),
    ("lora:\n  ce_weight: 0\n  kl_weight: 0\n", "both 0"),
    ("data:\n  limit: -5\n", "'data.limit' in bad.yaml is -5; it must be unset (null) or an integer >= 1"),
    ("data:\n  limit: 0\n", "'data.limit' in bad.yaml is 0"),
    ("data:\n  eval_fraction: 1.5\n", "'data.eval_fraction' in bad.yaml is 1.5"),
    ("features:\n  top: -3\n", "'features.top' in bad.yaml is -3"),
    ("layers:\n  layers: [-1, 2]\n", "'layers.layers' in bad.yaml is [-1, 2]"),
    ("layers:\n  layers: [1.5]\n", "'layers.layers' in bad.yaml is [1.5], which is not a valid"),
    ("sae:\n  k: 64\n  d_sae: 32\n", "'sae.k' in bad.yaml is 64, more than sae.d_sae=32"),
    ("sae:\n  train_prompts: 100000\n", "uses all"),
    ("ablation:\n  ranges:\n    early: 0-x\n", "'ablation.ranges.early' in bad.yaml is '0-x'"),
    ("seed: -1\n", "'seed' in bad.yaml is -1"),
])
def test_run_rejects_a_bad_value_at_once_without_loading_a_model(tmp_path, text, message, capsys, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(interp, "load", refuse)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    t0 = time.perf_counter()
    assert main(["run", str(bad)]) == 2
    assert time.perf_counter() - t0 < 1.0  # a bad lora.r used to fail after 30 s of work
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("settings, message", [
    ({"model": {"source": "no-such-model"}}, "'model.source' in config: unknown model 'no-such-model'"),
    ({"model": {"source": "/no/such/folder"}}, "model folder not found: '/no/such/folder'"),
    ({"model": {"device": "cuda:7"}}, "'model.device' in config='cuda:7'"),
    ({"model": {"dtype": "int8"}}, "'model.dtype' in config is 'int8'; models run in a floating-point dtype"),
    ({"data": {"pairs": "no/such/pairs.jsonl"}}, "'data.pairs' in config is 'no/such/pairs.jsonl': no such file"),
    ({"data": {"image_root": "no/such/images"}}, "'data.image_root' in config is 'no/such/images': no such folder"),
    ({"model": {"source": "tiny-llava"}, "layers": {"layers": [2, 3, 4]}},
     "'layers.layers' in config reaches layer 4, but the model has layers 0-3"),
    ({"model": {"source": "tiny-llava"}, "sae": {"layer": 9}}, "'sae.layer' in config is 9"),
    ({"model": {"source": "tiny-llava"}, "layers": {"width": 2}, "ablation": {"enabled": True, "ranges": {"late": "2-6"}}},
     "'ablation.ranges.late' in config is '2-6', which reaches layer 6, outside 0-3"),
    ({"output": "/proc/interp-run"}, "'output' in config '/proc/interp-run' is inside a system folder"),
])
def test_check_resolves_paths_model_and_layers_before_any_work(settings, message, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(interp, "load", refuse)
    config = LoopConfig.from_dict(settings)
    with pytest.raises(interp.InterpError) as err:
        interp.loop.run_loop(config, progress=False)
    assert message in str(err.value)


def test_run_refuses_an_output_folder_of_user_files_and_leaves_them(tmp_path, monkeypatch):
    monkeypatch.setattr(interp, "load", lambda *a, **k: pytest.fail("loaded a model"))
    (tmp_path / "paper.tex").write_text("my draft")
    config = LoopConfig.from_dict({"output": str(tmp_path)})
    with pytest.raises(interp.InterpError, match="already holds files that interp did not write"):
        interp.loop.run_loop(config, progress=False)
    assert (tmp_path / "paper.tex").read_text() == "my draft" and sorted(p.name for p in tmp_path.iterdir()) == [
        "paper.tex"]
    a_file = tmp_path / "paper.tex"
    with pytest.raises(interp.InterpError, match="is a file, not a folder"):
        LoopConfig.from_dict({"output": str(a_file)}).check()


def test_builtin_depths_match_the_models(tiny_medgemma, tiny_llava):
    from interp.loop import BUILTIN_DEPTH

    assert BUILTIN_DEPTH["tiny-medgemma"] == tiny_medgemma.n_layers
    assert BUILTIN_DEPTH["tiny-llava"] == tiny_llava.n_layers
    assert set(BUILTIN_DEPTH) == set(interp.models.BUILTINS)


@pytest.mark.slow
def test_builtin_depth_of_the_270m(gemma270m):
    from interp.loop import BUILTIN_DEPTH

    assert BUILTIN_DEPTH["gemma3-270m"] == gemma270m.n_layers


def test_loop_chooses_features_and_layers_on_training_pairs_only(tmp_path, monkeypatch):
    """register_features and layer_profile see only training pairs; evaluation sees only held-out ones,
    and the report names both sets."""
    seen: dict[str, list[set[str]]] = {}

    def spy(name):
        original = getattr(interp, name)

        def wrapped(model, *args, **kw):
            pairs = args[1] if name == "register_features" else args[0]
            seen.setdefault(name, []).append({p.id for p in pairs})
            return original(model, *args, **kw)

        monkeypatch.setattr(interp, name, wrapped)

    for name in ("register_features", "layer_profile", "evaluate", "train_lora"):
        spy(name)
    config = LoopConfig.from_dict({
        "model": {"source": "tiny-llava"}, "data": {"limit": 24},
        "sae": {"d_sae": 32, "k": 4, "steps": 10, "train_prompts": 12},
        "transfer": {"n_prompts": 6, "n_boot": 20, "ce": False},
        "layers": {"method": "residual", "width": 2},
        "lora": {"r": 2, "epochs": 1, "grad_accum": 2, "max_steps": 1, "train_pairs": 6},
        "output": str(tmp_path / "run")})
    report = interp.loop.run_loop(config, progress=False)
    _, train_pairs, eval_pairs = interp.loop.loop_pairs(config)
    train_ids, eval_ids = {p.id for p in train_pairs}, {p.id for p in eval_pairs}
    assert train_ids and eval_ids and not train_ids & eval_ids
    for stage in ("register_features", "layer_profile"):
        assert seen[stage] == [train_ids], stage
    assert all(ids == eval_ids for ids in seen["evaluate"])
    assert all(ids <= train_ids for ids in seen["train_lora"])
    data = report.summary["data"]
    assert data["selection"]["n"] == len(train_ids) and data["evaluation"]["n"] == len(eval_ids)
    assert data["selection"] == {"pairs": "train", **pairs_digest(train_pairs)}
    text = (tmp_path / "run" / "report.md").read_text()
    assert f"chosen on the {len(train_ids)} training pairs" in text
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["selection"]["ids_sha256"] == data["selection"]["ids_sha256"]
    for pkg in ("torch", "transformers", "peft", "sae-lens", "accelerate", "safetensors", "numpy", "scipy",
                "statsmodels"):
        assert manifest["versions"][pkg], pkg
    assert manifest["python"] and manifest["platform"] and manifest["device"]


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
    assert "transfer.medical.r2" in metrics and "consistency.compare.p_flip" in metrics
    assert "consistency.compare.p_z_unpaired" in metrics and "consistency.after.relative_margin_diff" in metrics
    assert summary["compare"]["flip_test"] and "yes_rate" in summary["consistency_after"]
    assert (tmp_path / "figures" / "consistency_after.html").is_file()
    assert (tmp_path / "adapter").is_dir()
    report = (tmp_path / "report.md").read_text()
    assert "flip rate, before -> after" in report and "figures/consistency_compare.html" in report


def test_stage_commands_run_on_a_tiny_model(tmp_path):
    """Each `interp <stage>` command runs end to end and writes what it says."""
    out = tmp_path / "out"
    assert main(["capture", "--model", "tiny-llava", "--layers", "0-1", "--cache", str(tmp_path / "cache")]) == 0
    assert any((tmp_path / "cache").iterdir())
    assert main(["evaluate", "--model", "tiny-medgemma", "--limit", "6", "--split", "all", "--out", str(out)]) == 0
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
