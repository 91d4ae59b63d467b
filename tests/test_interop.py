"""sae-lens interop: an exported capture is read by sae-lens' own ActivationsStore and round-trips back."""

from __future__ import annotations

import datasets
import pytest
import torch
from sae_lens.training.activations_store import ActivationsStore

import interp
from interp._errors import ForeignFilesError, InterpError
from interp.interop import export_sae_lens, import_sae_lens

PROMPTS = ["Is there a right pleural effusion?", "heart looks big?", "Any pneumothorax on the left side?",
           "Is the endotracheal tube in a good position?"]
HOOK = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def acts(tiny_medgemma):
    return interp.capture(tiny_medgemma, PROMPTS, layers=[2], positions="all", progress=False)


def _store(path, ctx, d_in, batch=1):
    """An ActivationsStore on a cached-activations path, as `ActivationsStore.from_cache_activations` builds one."""
    return ActivationsStore(model=None, dataset=None, streaming=False, hook_name=HOOK, hook_head_index=None,
                            context_size=ctx, d_in=d_in, n_batches_in_buffer=2, total_training_tokens=10_000,
                            store_batch_size_prompts=batch, train_batch_size_tokens=ctx, prepend_bos=False,
                            normalize_activations="none", device=torch.device("cpu"), dtype="float32",
                            cached_activations_path=str(path))


def test_sae_lens_activations_store_reads_the_export_bit_for_bit(acts, tmp_path):
    ctx = 5
    with pytest.warns(UserWarning, match="dropped"):
        out = export_sae_lens(acts, tmp_path / "cache", layer=2, context_size=ctx)
    kept = len(acts) // ctx * ctx
    ds = datasets.load_from_disk(str(out))
    # what CacheActivationsRunner.__init__ declares as features
    assert ds.features[HOOK] == datasets.Array2D(shape=(ctx, acts.d_model), dtype="float32")
    assert ds.features["token_ids"] == datasets.Sequence(datasets.Value("int32"), length=ctx)
    assert len(ds) == kept // ctx
    store = _store(out, ctx, acts.d_model)
    got_acts, got_tok = [], []
    while True:
        try:
            a, t = store.get_raw_llm_batch(raise_on_epoch_end=True)
        except StopIteration:
            break
        got_acts.append(a)
        got_tok.append(t)
    rows, tokens = torch.cat(got_acts), torch.cat(got_tok)
    # load_cached_activation_dataset's set_format(dtype=store dtype) casts token_ids to float32 too
    assert rows.dtype == torch.float32 and tokens.dtype == torch.float32
    assert torch.equal(rows, acts[2][:kept])  # bit for bit
    assert torch.equal(tokens.long(), acts.token_id[:kept])


def test_round_trip_through_import_sae_lens_equals_the_capture(acts, tmp_path):
    out = export_sae_lens(acts, tmp_path / "cache", layer=2, context_size=len(acts))  # one sequence, no rows lost
    back = import_sae_lens(out)
    assert back.layers == [2] and back.n_prompts == acts.n_prompts and back.positions == acts.positions
    assert back.model_name == acts.model_name
    assert torch.equal(back[2], acts[2]) and back[2].dtype == acts[2].dtype
    for name in ("prompt_index", "position", "token_id"):
        assert torch.equal(getattr(back, name), getattr(acts, name)), name
        assert getattr(back, name).dtype == getattr(acts, name).dtype


def test_export_reads_a_capture_folder_and_replaces_its_own_export(tiny_medgemma, tmp_path):
    cached = interp.capture(tiny_medgemma, ["a b c", "d e f"], layers=[2], positions="all",
                            cache=tmp_path / "capture", progress=False)
    assert cached.path is not None
    n = len(cached) // 2
    out = export_sae_lens(cached.path, tmp_path / "cache", layer=2)  # equal prompt lengths: one sequence each
    assert datasets.load_from_disk(str(out)).features[HOOK].shape == (n, cached.d_model)
    export_sae_lens(cached, out, layer=2, context_size=1)  # our own folder: replaced
    assert len(datasets.load_from_disk(str(out))) == len(cached)
    assert torch.equal(import_sae_lens(out)[2], cached[2])


def test_import_of_a_plain_sae_lens_cache_treats_each_sequence_as_a_prompt(tmp_path):
    feats = datasets.Features({HOOK: datasets.Array2D(shape=(3, 4), dtype="float32"),
                               "token_ids": datasets.Sequence(datasets.Value("int32"), length=3)})
    x = torch.randn(2, 3, 4)
    datasets.Dataset.from_dict({HOOK: x.numpy(), "token_ids": torch.arange(6, dtype=torch.int32).reshape(2, 3)
                                .numpy()}, features=feats).save_to_disk(str(tmp_path / "theirs"))
    back = import_sae_lens(tmp_path / "theirs")
    assert torch.equal(back[2], x.reshape(6, 4))
    assert back.prompt_index.tolist() == [0, 0, 0, 1, 1, 1] and back.position.tolist() == [0, 1, 2, 0, 1, 2]
    assert back.token_id.tolist() == list(range(6)) and back.n_prompts == 2


def test_errors_name_the_input_and_the_fix(acts, tmp_path):
    with pytest.raises(InterpError, match=r"layer 5 is not in the capture.*captured layers are \[2\]"):
        export_sae_lens(acts, tmp_path / "a", layer=5, context_size=4)
    with pytest.raises(InterpError, match="pass context_size=N"):
        export_sae_lens(acts, tmp_path / "b", layer=2)  # ragged prompts
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ForeignFilesError, match="notes.txt"):
        export_sae_lens(acts, foreign, layer=2, context_size=4)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(InterpError, match="not a sae-lens activation cache"):
        import_sae_lens(foreign)
    out = export_sae_lens(acts, tmp_path / "c", layer=2, context_size=len(acts))
    with pytest.raises(InterpError, match="hook_name 'blocks.9.hook_resid_post' is not a column"):
        import_sae_lens(out, hook_name="blocks.9.hook_resid_post")


def test_a_lazy_capture_exports_shard_by_shard_to_the_same_dataset(tiny_medgemma, acts, tmp_path):
    """A capture over its memory budget is exported without being read whole, packing across shard ends."""
    lazy = interp.capture(tiny_medgemma, PROMPTS, layers=[2], positions="all", progress=False, cache=tmp_path / "c",
                          shard_size=1, lazy=True)
    assert lazy.lazy
    with pytest.warns(UserWarning, match="dropped"):
        a = datasets.load_from_disk(str(export_sae_lens(lazy, tmp_path / "lazy", layer=2, context_size=7)))
    with pytest.warns(UserWarning, match="dropped"):
        b = datasets.load_from_disk(str(export_sae_lens(acts, tmp_path / "eager", layer=2, context_size=7)))
    assert len(a) == len(b) == len(acts) // 7
    for col in (HOOK, "token_ids", "prompt_index", "position"):
        ta, tb = (torch.from_numpy(d.with_format("numpy")[col][:]) for d in (a, b))
        # shard_size=1 batches each prompt alone: values equal to float tolerance, metadata exactly
        torch.testing.assert_close(ta, tb) if col == HOOK else torch.testing.assert_close(ta, tb, rtol=0, atol=0)
