"""Files on disk: nothing the workbench did not write is replaced or deleted, every write is atomic, no pickle is
ever loaded, and a bad path, file or argument is an `InterpError` that names it, never a traceback from pathlib,
json, PIL or torch."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import interp
from interp import _io
from interp._errors import ForeignFilesError, InterpError
from interp._io import OUTPUT_MARKER, atomic_write_text, mark_folder
from interp.export import Recorder, is_workbench_folder, prepare_output
from interp.interop import export_sae_lens, import_sae_lens
from interp.saes import SAEFileError, check_sae, load_sae

PROMPTS = ["Is there a right pleural effusion?", "heart looks big?", "Any pneumothorax on the left side?"]
LAYER = 2  # tiny-medgemma has 6 layers, d_model 64


@pytest.fixture(scope="module")
def acts(tiny_medgemma, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return interp.capture(tiny_medgemma, PROMPTS, layers=[LAYER], positions="last", progress=False, cache=cache)


def _tree(folder) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: to show that nothing in it changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. export_sae_lens replaces only an earlier export of its own ---------------------------------------
def test_export_sae_lens_refuses_a_train_lora_run_folder_and_leaves_it_whole(acts, tmp_path):
    run = mark_folder(tmp_path / "run", by="train_lora")  # what train_lora marks its output_dir with
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"weights of a finished run")
    (run / "checkpoints" / "step-00000001").mkdir(parents=True)
    (run / "result.json").write_text('{"adapter_path": "adapter", "history": [], "layers": [1]}')
    before = _tree(run)
    with pytest.raises(ForeignFilesError, match=r"out_dir '.*run' is another workbench folder \(train_lora output"
                                                r"\).*Choose a new or empty folder"):
        export_sae_lens(acts, run, layer=LAYER, context_size=1)
    assert _tree(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folder left beside it


def test_export_sae_lens_refuses_a_report_folder_with_the_users_notes(acts, tmp_path):
    report = prepare_output(tmp_path / "report")
    (report / "my_notes.md").write_text("weeks of notes")
    with pytest.raises(ForeignFilesError, match="my_notes.md"):
        export_sae_lens(acts, report, layer=LAYER, context_size=1)
    assert (report / "my_notes.md").read_text() == "weeks of notes"


def test_export_sae_lens_replaces_its_own_export_but_not_one_the_user_added_files_to(acts, tmp_path):
    out = export_sae_lens(acts, tmp_path / "sl", layer=LAYER, context_size=1)
    again = export_sae_lens(acts, out, layer=LAYER, context_size=3)  # a re-export replaces the old one
    assert json.loads((again / "interp_sae_lens.json").read_text())["context_size"] == 3
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ForeignFilesError, match="also holds files the export did not write.*notes.txt"):
        export_sae_lens(acts, out, layer=LAYER, context_size=1)
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "interp_sae_lens.json").read_text())["context_size"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sl"]


def test_export_sae_lens_does_not_delete_a_folder_that_gains_files_during_the_export(acts, tmp_path, monkeypatch):
    from interp import interop

    out = export_sae_lens(acts, tmp_path / "sl", layer=LAYER, context_size=1)
    real = interop.mark_folder

    def meanwhile(*a, **k):  # the user saves a file into the folder while the new export is being written
        (out / "added.txt").write_text("mine")
        return real(*a, **k)

    monkeypatch.setattr(interop, "mark_folder", meanwhile)
    with pytest.raises(ForeignFilesError, match="added.txt"):
        export_sae_lens(acts, out, layer=LAYER, context_size=1)
    assert (out / "added.txt").read_text() == "mine" and (out / "state.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sl"]


# ---- 2. a capture cache is not a run folder ------------------------------------------------------------
def test_export_into_a_copy_of_a_capture_cache_is_refused_and_the_cache_still_loads(acts, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(acts.path, cache)
    (cache / ".lock").unlink(missing_ok=True)
    before = _tree(cache)
    assert not is_workbench_folder(cache)
    with pytest.raises(ForeignFilesError, match="activation cache"):
        interp.export(cache, parameters={"model_name": "tiny-medgemma"}, notebooks=["01_capture"], progress=False)
    assert {k: v for k, v in _tree(cache).items() if k != ".lock"} == before
    back = interp.load_activations(cache)
    assert torch.equal(back[LAYER], acts[LAYER])


def test_a_marker_does_not_make_a_capture_cache_a_run_folder(acts, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(acts.path, cache)
    mark_folder(cache)
    assert not is_workbench_folder(cache)
    with pytest.raises(ForeignFilesError, match="activation cache"):
        prepare_output(cache)


# ---- 3. Recorder and notebook_setup go through prepare_output ------------------------------------------
def test_recorder_refuses_a_users_folder_and_leaves_their_tables(tmp_path):
    import pandas as pd

    mine = tmp_path / "myproject"
    (mine / "tables").mkdir(parents=True)
    (mine / "tables" / "flip_rates.csv").write_text("my,own,data\n1,2,3\n")
    with pytest.raises(ForeignFilesError, match="already holds files that interp did not write"):
        Recorder(mine, static=False).table("flip_rates", pd.DataFrame({"x": [1]}))
    assert (mine / "tables" / "flip_rates.csv").read_text() == "my,own,data\n1,2,3\n"
    assert not (mine / OUTPUT_MARKER).exists()


@pytest.mark.parametrize("text, why", [("[1, 2, 3]", "holds a JSON list"), ('{"mine": 1', "cannot be read as"),
                                       (b"\xff\xfe", "cannot be read as")])
def test_recorder_names_a_metrics_file_that_is_not_a_json_object(tmp_path, text, why):
    folder = prepare_output(tmp_path / "run")
    path = folder / "metrics.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InterpError, match=rf"metrics.json' {why}"):
        Recorder(folder, static=False)
    assert path.read_bytes() == (text if isinstance(text, bytes) else text.encode())


def test_recorder_on_a_file_or_an_unwritable_folder_is_an_interp_error(tmp_path, monkeypatch):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    with pytest.raises(InterpError, match="is a file, not a folder"):
        Recorder(a_file, static=False)
    with pytest.raises(InterpError, match="folder=None is of type NoneType, not a path"):
        Recorder(None, static=False)
    monkeypatch.setattr(_io.os, "access", lambda *a, **k: False)
    with pytest.raises(InterpError, match="cannot be created or written"):
        Recorder(tmp_path / "ro" / "run", static=False)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_recorder_in_a_read_only_folder_is_an_interp_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(InterpError, match="cannot be"):
            Recorder(ro / "run", static=False)
    finally:
        ro.chmod(0o755)


def test_a_recorder_reopens_its_own_folder_and_keeps_the_metrics(tmp_path):
    import plotly.graph_objects as go

    rec = Recorder(tmp_path / "run", static=False)
    rec.metric("a", 1)
    rec.figure("f", go.Figure(go.Bar(y=[1, 2])))
    again = Recorder(tmp_path / "run", static=False)  # a notebook run again into the same output_dir
    again.metric("b", 2)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"a": 1, "b": 2}
    names = sorted(p.name for p in (tmp_path / "run" / "figures").iterdir())
    assert names == ["f.html", "plotly.min.js"]  # no temporary file left
    assert 'src="plotly.min.js"' in (tmp_path / "run" / "figures" / "f.html").read_text()


def test_a_failed_figure_write_keeps_the_old_page_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import plotly.graph_objects as go

    rec = Recorder(tmp_path, static=False)
    page = rec.figure("f", go.Figure(go.Bar(y=[1, 2])))
    old = page.read_bytes()

    def half(self, file, **kw):
        open(file, "w").write("<html><body>half a page")  # noqa: SIM115
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(go.Figure, "write_html", half)
    with pytest.raises(OSError, match="No space"):
        rec.figure("f", go.Figure(go.Bar(y=[3, 4])))
    assert page.read_bytes() == old
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["f.html", "plotly.min.js"]


def test_notebook_setup_refuses_a_users_folder_before_loading_the_model_and_reruns_into_its_own(tmp_path,
                                                                                                 monkeypatch):
    import interp.models
    import interp.viz

    monkeypatch.setattr(interp.viz, "use_notebook_renderer", lambda: None)
    mine = tmp_path / "mine"
    (mine / "figures").mkdir(parents=True)
    (mine / "figures" / "fig1.html").write_text("my figure")
    loaded = []
    monkeypatch.setattr(interp.models, "load", lambda *a, **k: loaded.append(a) or "model")
    with pytest.raises(ForeignFilesError, match="output_dir '.*mine' already holds files"):
        interp.notebook_setup("tiny-medgemma", output_dir=mine)
    assert loaded == [] and (mine / "figures" / "fig1.html").read_text() == "my figure"
    out = tmp_path / "exports" / "notebooks"
    for _ in range(2):  # a notebook run twice into its default output_dir
        model, rec = interp.notebook_setup("tiny-medgemma", output_dir=out)
        rec.metric("n", 1)
    assert model == "model" and json.loads((out / "metrics.json").read_text()) == {"n": 1}


# ---- 4. pickled model weights are never loaded ---------------------------------------------------------
class _Evil:
    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (open, (self.flag, "w"))


def _model_folder(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from interp.models import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)
    folder = tmp_path / "model"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_model_folder_with_only_pickled_weights_is_refused_naming_the_file(tmp_path, monkeypatch):
    from interp import models

    folder = _model_folder(tmp_path)
    (folder / "model.safetensors").unlink()
    flag = tmp_path / "PWNED"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(str(flag))))
    with pytest.raises(InterpError, match=r"only pickled PyTorch weights \('pytorch_model.bin'\).*safetensors"):
        interp.load(str(folder), device="cpu")
    monkeypatch.setattr(models, "_check_model_folder", lambda path: None)  # transformers itself must not unpickle
    with pytest.raises(InterpError, match="could not read the weights"):
        interp.load(str(folder), device="cpu")
    assert not flag.exists()


def test_an_unpickling_error_from_transformers_is_an_interp_error(tmp_path, monkeypatch):
    import transformers

    folder = _model_folder(tmp_path)

    def refuse(cls, *a, **k):
        assert k.get("use_safetensors") is True  # a local folder is read as safetensors only
        raise pickle.UnpicklingError("Weights only load failed")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(refuse))
    with pytest.raises(InterpError, match="could not read the weights.*UnpicklingError"):
        interp.load(str(folder), device="cpu")


# ---- 5. a file that is not an image ------------------------------------------------------------------------
@pytest.fixture
def bad_images(tmp_path):
    from PIL import Image

    good = tmp_path / "ok.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")).save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.png").write_text("not an image")
    return tmp_path / "trunc.png", tmp_path / "text.png"


def test_capture_and_inputs_name_an_image_file_that_is_not_an_image(tiny_medgemma, bad_images):
    for path in bad_images:
        msg = rf"image file '{re.escape(str(path))}' cannot be read as an image.*Pass a PNG or JPEG"
        with pytest.raises(InterpError, match=msg):
            interp.capture(tiny_medgemma, [{"question": "Is there?", "image": str(path)}], layers=[1],
                           progress=False)
        with pytest.raises(InterpError, match=msg):
            tiny_medgemma.inputs("Is there?", image=str(path))
        with pytest.raises(InterpError, match=msg):
            tiny_medgemma.encode([interp.Prompt("Is there?", str(path))])


def test_open_image_keeps_pils_error_for_the_scorer(bad_images):
    """`interp.scoring` tells a file that changed during a call from one that never was an image by the error
    type `_open_image` raises; `open_image` is the user-facing one."""
    from interp.models import _open_image, open_image

    with pytest.raises(OSError):
        _open_image(str(bad_images[1]))
    with pytest.raises(InterpError, match="text.png' cannot be read as an image"):
        open_image(str(bad_images[1]))


# ---- 6 and 7. load_sae's arguments and Gemma Scope's config fields -------------------------------------
def _gemma_scope(root, name="layer_3_width_32", config=None):
    d_in, d_sae = 64, 32
    folder = root / "resid_post" / name
    folder.mkdir(parents=True)
    save_file({"w_enc": torch.randn(d_in, d_sae), "w_dec": torch.randn(d_sae, d_in), "b_enc": torch.zeros(d_sae),
               "b_dec": torch.zeros(d_in), "threshold": torch.zeros(d_sae)}, str(folder / "params.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("layer, msg", [(-2, "layer=-2: negative"), (True, "layer=True: a bool"),
                                        (2.7, "layer=2.7 is of type float"), ("3", "layer='3' is of type str")])
def test_load_sae_refuses_a_layer_that_is_not_a_layer_index(tmp_path, layer, msg):
    folder = _gemma_scope(tmp_path, name="unnamed")
    with pytest.raises(InterpError, match=msg):
        load_sae(folder, device="cpu", layer=layer)


def test_check_sae_refuses_a_layer_the_model_does_not_have(tiny_medgemma, tmp_path):
    sae = load_sae(_gemma_scope(tmp_path), device="cpu")
    for layer, msg in ((9, "layer=9 is out of range: 'tiny-medgemma' has 6 decoder layers"), (True, "a bool"),
                       (-3, "negative")):
        with pytest.raises(InterpError, match=msg):
            check_sae(tiny_medgemma, sae, layer=layer)
    assert check_sae(tiny_medgemma, sae, layer=np.int64(3)).layer == 3


@pytest.mark.parametrize("config, msg", [({"width": "16k"}, r"'width' is '16k', not a number of features"),
                                         ({"hf_hook_point_in": 5}, r"'hf_hook_point_in' is 5, not text"),
                                         ({"model_name": ["x"]}, r"'model_name' is \['x'\], not text")])
def test_a_gemma_scope_config_field_of_the_wrong_type_is_named(tmp_path, config, msg):
    folder = _gemma_scope(tmp_path, config=config)
    with pytest.raises(SAEFileError, match=rf"config.json': {msg}.*download the folder"):
        load_sae(folder, device="cpu")


def test_a_gemma_scope_width_written_as_digits_still_loads(tmp_path):
    sae = load_sae(_gemma_scope(tmp_path, config={"width": "32"}), device="cpu")
    assert sae.cfg.d_sae == 32


def test_load_sae_names_a_device_or_dtype_it_cannot_use(tmp_path):
    folder = _gemma_scope(tmp_path)
    with pytest.raises(InterpError, match="device='gpu' is not a torch device"):
        load_sae(folder, device="gpu")
    with pytest.raises(InterpError, match="dtype='int8': SAE weights are floating point"):
        load_sae(folder, device="cpu", dtype="int8")
    with pytest.raises(InterpError, match="dtype='float31' is not a torch dtype"):
        load_sae(folder, device="cpu", dtype="float31")
    with pytest.raises(InterpError, match="release_or_path=None"):
        load_sae(None)


@pytest.mark.parametrize("text, msg", [("{bad", "cannot be read as JSON"), ("[]", "holds a JSON list"),
                                       ('{"n_prompts": "many"}', "'n_prompts' is 'many', not a count"),
                                       ('{"n_prompts": 1}', "says n_prompts=1, but the rows reach prompt 2"),
                                       ('{"positions": 3}', "'positions' is 3, not text")])
def test_a_damaged_interp_sae_lens_json_is_named(acts, tmp_path, text, msg):
    out = export_sae_lens(acts, tmp_path / "sl", layer=LAYER, context_size=1)
    (out / "interp_sae_lens.json").write_text(text)
    with pytest.raises(InterpError, match=rf"interp_sae_lens.json'?:? ?.*{msg}"):
        import_sae_lens(out)


# ---- 8. a path argument that is not a path -------------------------------------------------------------
@pytest.mark.parametrize("value, msg", [(None, "of type NoneType, not a path"), (5, "of type int, not a path"),
                                        (["a.csv"], r"of type list, not a path \(one path, not a list"),
                                        ("", "is an empty string"), (b"a.csv", "is bytes")])
def test_load_pairs_names_a_path_argument_that_is_not_a_path(value, msg):
    with pytest.raises(InterpError, match=rf"^path=?.* {msg}" if value != "" else msg):
        interp.data.load_pairs(value)


def test_export_and_export_sae_lens_name_a_path_argument_that_is_not_a_path(acts, tmp_path):
    with pytest.raises(InterpError, match="out=None is of type NoneType, not a path"):
        interp.export(None, notebooks=["01_capture"])
    with pytest.raises(InterpError, match="acts_or_folder=None is of type NoneType"):
        export_sae_lens(None, tmp_path / "o", layer=LAYER)
    with pytest.raises(InterpError, match="out_dir=None is of type NoneType"):
        export_sae_lens(acts, None, layer=LAYER)
    with pytest.raises(InterpError, match="folder=5 is of type int"):
        import_sae_lens(5)
    with pytest.raises(InterpError, match=r"parameters=\['a=1'\] is of type list; pass a dict"):
        interp.export(tmp_path / "e", parameters=["a=1"], notebooks=["01_capture"])
    with pytest.raises(InterpError, match="notebooks=5: pass a notebook name or a list"):
        interp.export(tmp_path / "e", notebooks=5)
    with pytest.raises(InterpError, match="'../notebooks/01_capture' is not a notebook name"):
        interp.export(tmp_path / "e", notebooks=["../notebooks/01_capture"])
    assert not (tmp_path / "e").exists() and not (tmp_path / "o").exists()


def test_export_takes_a_single_notebook_name(tmp_path, monkeypatch):
    import papermill

    ran = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda src, dst, **kw: ran.append(src) or shutil.copy(src, dst))
    result = interp.export(tmp_path / "out", notebooks="01_capture", parameters={"model_name": "tiny-medgemma"},
                           progress=False)
    assert [os.path.basename(p) for p in ran] == ["01_capture.ipynb"] and len(result.notebooks) == 1


# ---- 9. atomic writes --------------------------------------------------------------------------------------
def test_atomic_write_text_removes_its_temporary_file_when_the_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_text("old")

    def fail(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_io.os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_atomic_write_text_removes_its_temporary_file_when_the_write_fails(tmp_path):
    target = tmp_path / "summary.json"
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(target, "half \ud800 a surrogate")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_text_flushes_to_disk_before_the_rename(tmp_path, monkeypatch):
    order = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(_io.os, "fsync", lambda fd: order.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(_io.os, "replace", lambda a, b: order.append("replace") or real_replace(a, b))
    atomic_write_text(tmp_path / "a.json", "{}")
    assert order[:2] == ["fsync", "replace"] and (tmp_path / "a.json").read_text() == "{}"


def test_the_cli_writes_its_figure_page_atomically(tmp_path, monkeypatch):
    import plotly.graph_objects as go

    from interp import cli

    class Result:
        def to_dict(self):
            return {"r2": 0.9}

        def figure(self):
            return go.Figure(go.Bar(y=[1, 2]))

    cli._write(Result(), str(tmp_path / "out"), "transfer")
    page = tmp_path / "out" / "transfer.html"
    old = page.read_bytes()

    def half(self, file, **kw):
        open(file, "w").write("<html>half")  # noqa: SIM115
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(go.Figure, "write_html", half)
    with pytest.raises(OSError):
        cli._write(Result(), str(tmp_path / "out"), "transfer")
    assert page.read_bytes() == old
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [OUTPUT_MARKER, "plotly.min.js", "transfer.html",
                                                                    "transfer.json"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize("value", [None, 5, ["a"]])
def test_load_activations_names_a_folder_argument_that_is_not_a_path(value):
    with pytest.raises(interp.InterpError, match="folder=.* not a path"):
        interp.load_activations(value)
