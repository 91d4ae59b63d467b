"""One call at a time per model: a second thread's call waits, with a warning, until the first has let go.

Without this, capture's hooks caught the other thread's forward passes: that call stopped at this one's last layer
("layers [1] ... were never called") or had the other call's rows copied into its buffers.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

import interp
from interp import models as models_mod
from interp.data import ParaphrasePair
from interp.scoring import margins

PROMPTS = [f"Is there an effusion on film {i}? " * (1 + i % 4) for i in range(12)]
KW = dict(layers=[1], positions="all", progress=False)


class Held:
    """Thread A's capture, stopped inside its first forward (a hook on layer 0 waits) until the block ends."""

    def __init__(self, model: interp.Model, fail: bool = False):
        self.model, self.fail = model, fail
        self.inside, self.go = threading.Event(), threading.Event()
        self.result = self.error = None
        self.handle = model.layer(0).register_forward_hook(self._wait)
        self.thread = threading.Thread(target=self._run)

    def _wait(self, *_):
        if threading.current_thread() is self.thread and not self.inside.is_set():
            self.inside.set()
            assert self.go.wait(60)
            if self.fail:
                raise RuntimeError("planted failure inside the forward")

    def _run(self):
        try:
            self.result = interp.capture(self.model, PROMPTS, **KW)
        except Exception as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def waiting(self) -> int:
        held = models_mod._BUSY.get(models_mod._busy_key(self.model))
        return held[3] if held is not None else 0

    def __enter__(self):
        self.thread.start()
        assert self.inside.wait(60), "thread A never reached its forward pass"
        return self

    def __exit__(self, *exc):
        self.go.set()
        self.thread.join(60)
        self.handle.remove()


class Call(threading.Thread):
    """Thread B: one call, its result or error and the warnings it raised."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.result, self.error, self.warned = fn, None, None, []

    def run(self):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                self.result = self.fn()
            except Exception as e:  # noqa: BLE001 - handed to the test
                self.error = e
        self.warned = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]


def _wait_until(cond, what: str):
    done = threading.Event()
    for _ in range(6000):
        if cond():
            return
        done.wait(0.01)
    raise AssertionError(f"never: {what}")


def test_a_second_thread_waits_for_the_first_and_both_get_their_own_rows(tiny_medgemma):
    model = tiny_medgemma
    alone = interp.capture(model, PROMPTS, **KW)
    alone_b = interp.capture(model, PROMPTS[3:7], **KW)
    pairs = [ParaphrasePair("p0", PROMPTS[0], PROMPTS[1], "yes")]
    want_margins = margins(model, PROMPTS[:2])
    want_report = interp.evaluate(model, pairs, progress=False)
    twin = interp.Model.wrap(model.hf, model.processor, name="twin")  # a second wrapper of the same modules
    with Held(model) as a:
        calls = [Call(lambda: interp.capture(model, PROMPTS[3:7], **KW)),
                 Call(lambda: margins(model, PROMPTS[:2])),
                 Call(lambda: interp.evaluate(model, pairs, progress=False)),
                 Call(lambda: interp.capture(twin, PROMPTS[3:7], **KW))]
        for c in calls:
            c.start()
        _wait_until(lambda: a.waiting() == len(calls), f"{len(calls)} calls waiting for thread A")
        assert all(c.is_alive() for c in calls) and a.thread.is_alive()
    for c in calls:
        c.join(120)
        assert not c.is_alive() and c.error is None, c.error
        assert len(c.warned) == 1 and "is running on" in c.warned[0] and "in another thread" in c.warned[0], c.warned
    assert "capture() waits: capture() is running on 'twin'" in calls[3].warned[0]
    assert a.error is None
    for k in ("prompt_index", "position", "token_id"):  # thread A's rows are those of its capture run alone
        assert torch.equal(getattr(a.result, k), getattr(alone, k))
    assert torch.equal(a.result[1], alone[1])
    for c in (calls[0], calls[3]):
        assert torch.equal(c.result.prompt_index, alone_b.prompt_index)
        assert torch.equal(c.result[1], alone_b[1])
    assert torch.equal(calls[1].result, want_margins)
    assert calls[2].result.flip_rate == want_report.flip_rate and calls[2].result.n == 1
    assert models_mod._busy_key(model) not in models_mod._BUSY  # free again


def test_the_model_is_free_again_after_a_failed_call(tiny_medgemma):
    model = tiny_medgemma
    with Held(model, fail=True) as a:
        b = Call(lambda: interp.capture(model, PROMPTS[:3], **KW))
        b.start()
        _wait_until(lambda: a.waiting() == 1, "thread B waiting for thread A")
    b.join(120)
    assert isinstance(a.error, RuntimeError) and "planted failure" in str(a.error)
    assert b.error is None and b.result[1].shape[0] == int(b.result.prompt_index.numel())
    assert models_mod._busy_key(model) not in models_mod._BUSY


def test_other_models_run_meanwhile_and_calls_nest_on_one_thread(tiny_medgemma, tiny_llava):
    want = interp.capture(tiny_llava, PROMPTS[:4], **KW)[1]
    with Held(tiny_medgemma) as a:
        other = Call(lambda: interp.capture(tiny_llava, PROMPTS[:4], **KW))
        other.start()
        other.join(120)  # finishes while thread A still holds its own model
        assert not other.is_alive() and a.thread.is_alive()
    assert other.error is None and other.warned == []
    assert torch.equal(other.result[1], want)
    # evaluate calls the scorer, which holds the model again on the same thread: no wait, no warning
    pairs = [ParaphrasePair("p0", PROMPTS[0], PROMPTS[1], "yes"), ParaphrasePair("p1", PROMPTS[2], PROMPTS[3], "no")]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        report = interp.evaluate(tiny_medgemma, pairs, progress=False)
    assert report.n == 2


@pytest.mark.parametrize("fn", ["capture", "evaluate", "layer_profile", "find_layers", "train_lora", "merge",
                                "ablate_layers", "transfer_report", "register_features", "feature_card",
                                "ablate_feature"])
def test_every_public_function_that_runs_a_forward_holds_the_model(fn):
    wrapper_code = models_mod.exclusive(len).__code__  # every function @exclusive wraps runs this code
    assert getattr(interp, fn).__code__ is wrapper_code, f"interp.{fn} does not hold the model"
