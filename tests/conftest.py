"""Shared fixtures: tiny random models with the real module layouts, and the real Gemma 3 270M."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import interp

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_medgemma() -> interp.Model:
    return interp.load("tiny-medgemma")


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
