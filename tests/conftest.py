"""Shared fixtures: tiny random models with the real module layouts, and the real Gemma 3 270M."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import interp

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_medgemma() -> interp.Model:
    return interp.load("tiny-medgemma")


@pytest.fixture(scope="module")
def medgemma(tiny_medgemma) -> interp.Model:
    """tiny-medgemma with a random image projector (the built-in one is zero-initialised, so images don't count)."""
    model = copy.deepcopy(tiny_medgemma)
    with torch.no_grad():
        w = model.hf.model.multi_modal_projector.mm_input_projection_weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    return model


@pytest.fixture(scope="session")
def tiny_llava() -> interp.Model:
    return interp.load("tiny-llava")


@pytest.fixture(scope="session")
def gemma270m() -> interp.Model:
    """The real Gemma 3 270M (converted from the PyPI GGUF once, then cached; ~1 min the first time)."""
    return interp.load("gemma3-270m")


@pytest.fixture(scope="session")
def xray_images(tmp_path_factory) -> list[str]:
    """Three synthetic 'chest X-ray' PNGs on disk (grey gradients with blobs), as file paths."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for k in range(3):
        yy, xx = np.mgrid[0:96, 0:96]
        img = 60 + 0.8 * yy + 30 * np.exp(-((xx - 30 - 15 * k) ** 2 + (yy - 50) ** 2) / 200)
        img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype("uint8")
        path = folder / f"cxr_{k}.png"
        Image.fromarray(np.stack([img] * 3, -1)).save(path)
        paths.append(str(path))
    return paths


def planted_jumprelu_sae(d_in: int, layer: int, *, seed: int, threshold: float, avoid: list, feature: int | None = None,
                         reads=None, writes=None, feature_threshold: float = 0.0, d_sae: int = 32):
    """A random JumpReLU SAE (unit-norm tied features, zero biases) whose features are all orthogonal to the
    directions in ``avoid``, except ``feature``, which reads ``reads`` (above ``feature_threshold``) and
    decodes to ``writes``: a planted feature the tests know the answer for."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae,
                                        metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post")))
    w = torch.randn(d_in, d_sae, generator=torch.Generator().manual_seed(seed))
    if avoid:
        basis = torch.linalg.qr(torch.stack(list(avoid), 1)).Q  # [d_in, k]
        w -= basis @ (basis.T @ w)
    w /= w.norm(dim=0)
    with torch.no_grad():
        sae.W_enc.copy_(w)
        sae.W_dec.copy_(w.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(threshold)
        if feature is not None:
            sae.W_enc[:, feature] = reads
            sae.W_dec[feature] = writes
            sae.threshold[feature] = feature_threshold
    return sae
