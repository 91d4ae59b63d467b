"""The fast scorer takes each image's key once per call: files rewritten or removed while it runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from interp import InterpError, models, scoring
from interp.consistency import ConsistencyReport, answer_logits, evaluate
from interp.data import ParaphraseGroup, ParaphrasePair
from interp.models import Prompt

QUESTIONS = ("Is there a pleural effusion?", "Is there fluid around the lungs?", "Can an effusion be ruled out?",
             "Is the costophrenic angle blunted?")
POLARITY = (True, True, False, True)


@pytest.fixture
def images(xray_images, tmp_path) -> list[str]:
    """Copies of the session's X-rays that a test may rewrite or delete."""
    return [str(shutil.copy(p, tmp_path / Path(p).name)) for p in xray_images]


def image_pairs(images: list) -> list[ParaphrasePair]:
    """Four phrasings on each image (one with a report, one inverted); plus a text-only pair."""
    contexts = ("Findings: small left pleural effusion.", None, "Findings: lungs are clear.")
    groups = [ParaphraseGroup(f"g{k}", QUESTIONS, POLARITY, image=img, kind="lexical", context=contexts[k % 3])
              for k, img in enumerate(images)]
    pairs = [p for g in groups for p in g.pairs()]
    pairs.append(ParaphrasePair("t1", "Is the heart enlarged?", "Is my heart big?", answer="no",
                                context="Findings: normal heart size.", kind="register"))
    return pairs


def assert_same_margins(a: ConsistencyReport, b: ConsistencyReport, atol: float = 2e-5) -> None:
    assert list(a.table["id"]) == list(b.table["id"])
    np.testing.assert_allclose(a.table[["margin_a", "margin_b"]].to_numpy(),
                               b.table[["margin_a", "margin_b"]].to_numpy(), atol=atol, rtol=1e-4)


def counting_image_key(monkeypatch) -> list:
    """Patch the name the scorer calls; returns the list of images it was called with."""
    calls = []
    real = scoring.image_key
    monkeypatch.setattr(scoring, "image_key", lambda image: calls.append(image) or real(image))
    return calls


def test_image_key_is_taken_once_per_image_per_call(medgemma, images, monkeypatch):
    pairs = image_pairs(images)
    reference = evaluate(medgemma, pairs, n_boot=0, progress=False)
    calls = counting_image_key(monkeypatch)
    report = evaluate(medgemma, pairs, n_boot=0, progress=False)
    n_prompts = 2 * sum(p.image is not None for p in pairs)
    assert sorted(calls) == sorted(images)  # once per file, not once per phrasing (24) or per lookup
    assert len(calls) < n_prompts
    assert_same_margins(report, reference, atol=0)
    calls.clear()
    evaluate(medgemma, pairs, n_boot=0, progress=False)  # each call takes its own keys
    assert sorted(calls) == sorted(images)


def test_image_key_once_per_distinct_path_or_object(medgemma, images, monkeypatch):
    """The same object twice is one lookup, and so are a str and a Path naming one file."""
    from PIL import Image

    with Image.open(images[0]) as im:
        shown = im.convert("RGB")
    prompts = [Prompt(q, img, ctx) for img in (images[0], Path(images[0]), shown, images[1], shown)
               for q in QUESTIONS for ctx in (None, "Findings: clear.")]
    prompts.append(Prompt("Is the heart enlarged?"))
    reference = answer_logits(medgemma, prompts, fast=True)
    calls = counting_image_key(monkeypatch)
    fast = answer_logits(medgemma, prompts, fast=True)
    assert len(calls) == 3 and sum(c is shown for c in calls) == 1
    assert sorted(os.fspath(c) for c in calls if c is not shown) == sorted(images[:2])
    torch.testing.assert_close(fast, reference, atol=0, rtol=0)
    monkeypatch.undo()
    naive = answer_logits(medgemma, prompts, fast=False)
    np.testing.assert_allclose(fast.numpy(), naive.numpy(), atol=2e-5, rtol=1e-4)


def test_a_new_mtime_on_later_lookups_changes_nothing(medgemma, images, monkeypatch):
    """Every lookup after a file's first returns a newer version (as if rewritten between them): the scorer
    looks each file up once, so the margins are the stable run's (this was a KeyError inside the scorer)."""
    pairs = image_pairs(images)
    reference = evaluate(medgemma, pairs, n_boot=0, progress=False)
    real, seen = scoring.image_key, {}

    def drifting(image):
        key = real(image)
        if key is None:
            return None
        n = seen[key[1]] = seen.get(key[1], -1) + 1
        return (key[0], key[1], key[2] + n, key[3])

    monkeypatch.setattr(scoring, "image_key", drifting)
    assert_same_margins(evaluate(medgemma, pairs, n_boot=0, progress=False), reference, atol=0)
    assert set(seen.values()) == {0}


@pytest.mark.parametrize("split", [True, False], ids=["split-processor", "processor-call"])
def test_a_file_touched_during_the_call_gives_the_stable_margins(medgemma, images, monkeypatch, split):
    """The file's mtime changes (same bytes) once its key is taken and before it is read."""
    pairs = image_pairs(images)
    if not split:
        monkeypatch.setattr(scoring, "split_processor", lambda model: None)  # the processor's own call per prompt
    reference = evaluate(medgemma, pairs, n_boot=0, progress=False)
    real, before = scoring.image_key, [os.stat(p).st_mtime_ns for p in images]

    def touching(image):
        key = real(image)
        if key is None:
            return None
        os.utime(image, ns=(key[2] + 10**9, key[2] + 10**9))  # later lookups of this file see a new version
        return key

    monkeypatch.setattr(scoring, "image_key", touching)
    assert_same_margins(evaluate(medgemma, pairs, n_boot=0, progress=False), reference, atol=0)
    assert [os.stat(p).st_mtime_ns for p in images] == [t + 10**9 for t in before]  # each touched once


def vandalising_open(monkeypatch, target: str, how: str) -> None:
    """When ``target`` is first opened (after the scorer took its key), delete or corrupt it first."""
    real = models._open_image

    def open_image(image):
        if isinstance(image, (str, os.PathLike)) and os.path.abspath(image) == os.path.abspath(target):
            if how == "deleted" and os.path.exists(target):
                os.remove(target)
            elif how == "truncated":
                data = Path(target).read_bytes()
                if len(data) > 100:
                    Path(target).write_bytes(data[:len(data) // 2])
            elif how == "not an image":
                Path(target).write_bytes(b"not an image")
        return real(image)

    monkeypatch.setattr(models, "_open_image", open_image)  # split path (CheckedSplit.process_image)
    monkeypatch.setattr(scoring, "_open_image", open_image)  # processor's own call


@pytest.mark.parametrize("how", ["deleted", "truncated", "not an image"])
@pytest.mark.parametrize("split", [True, False], ids=["split-processor", "processor-call"])
def test_a_file_that_changes_or_vanishes_during_the_call_is_named(medgemma, images, monkeypatch, how, split):
    if not split:
        monkeypatch.setattr(scoring, "split_processor", lambda model: None)
    pairs = image_pairs(images)
    vandalising_open(monkeypatch, images[1], how)
    with pytest.raises(InterpError) as err:
        evaluate(medgemma, pairs, n_boot=0, progress=False)
    msg = str(err.value)
    assert os.path.abspath(images[1]) in msg
    assert "the file changed or vanished during this call; rerun once it is stable" in msg
    assert not isinstance(err.value, KeyError) and not isinstance(err.value.__cause__, KeyError)


def test_a_file_missing_from_the_start_keeps_its_not_found_error(medgemma, images, tmp_path):
    """A path that never existed is a typo, not a file changed during the call: the scorer keeps the plain
    error (`evaluate` names such files before it scores; `answer_logits` does not check first)."""
    prompts = [Prompt(q, img) for img in (images[0], str(tmp_path / "no_such.png")) for q in QUESTIONS]
    with pytest.raises(InterpError, match="image file not found: .*no_such.png") as err:
        answer_logits(medgemma, prompts, fast=True)
    assert "during this call" not in str(err.value)


def test_an_in_memory_image_that_cannot_be_read_is_named(medgemma, images):
    """A lazily opened PIL image whose file is gone before it is decoded: it cannot be read (an object in
    memory is what the caller holds, not a file that changed)."""
    from PIL import Image

    lazy = Image.open(images[2])  # header read, pixels not yet
    lazy.fp.close()
    lazy.fp = open(os.devnull, "rb")  # noqa: SIM115  # the bytes vanish under it
    with pytest.raises(InterpError, match=r"image <in-memory image> cannot be read as an image"):
        answer_logits(medgemma, [Prompt(q, lazy) for q in QUESTIONS], fast=True)
    lazy.close()


@pytest.mark.parametrize("split", [True, False], ids=["split-processor", "processor-call"])
def test_a_file_that_never_was_an_image_is_named_as_such_not_as_changed(medgemma, images, tmp_path, monkeypatch,
                                                                         split):
    if not split:
        monkeypatch.setattr(scoring, "split_processor", lambda model: None)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"never an image")
    prompts = [Prompt(q, img) for img in (images[0], bad) for q in QUESTIONS]
    with pytest.raises(InterpError, match=r"image '.*bad.png' cannot be read as an image") as err:
        answer_logits(medgemma, prompts, fast=True)
    assert "changed or vanished" not in str(err.value)


def test_lookup_under_a_missing_key_names_the_image():
    key = models.image_key(__file__)
    with pytest.raises(InterpError, match=f"image '{__file__}'.*no longer under the name.*rerun once"):
        scoring._found({}, key)
    with pytest.raises(InterpError, match="<in-memory image>"):
        scoring._found({}, ("object", 1))


def test_fast_and_plain_margins_agree_on_image_pairs(medgemma, images):
    pairs = image_pairs([images[0], images[1], images[2], images[0]])  # a file in two groups
    fast = evaluate(medgemma, pairs, n_boot=0, progress=False)
    assert "KV cache" in fast.method
    assert_same_margins(fast, evaluate(medgemma, pairs, fast=False, n_boot=0, progress=False))
    assert np.ptp(fast.table[fast.table["id"].str.endswith("#1")]["margin_a"].to_numpy()[:3]) > 1e-3
