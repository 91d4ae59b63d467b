"""The GPU equivalence suite: every fast path against its plain reference, at MedGemma-4B shape in bf16.

Skipped without a CUDA device (CI has none). On the lent H200:

    PYTHONPATH=/tmp/site:$PWD python3 -m pytest tests/gpu -q     # never with CUDA_LAUNCH_BLOCKING set

Each test records its largest differences through the ``record`` fixture; the session writes them, with
the date, GPU and versions, to ``$OUT/gpu_equivalence.json`` (or ``gpu_results/``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS: dict[str, dict] = {}
# INTERP_GPU_SUITE_ON_CPU=1 runs the same suite on the CPU at toy shapes (to check the suite itself
# before spending GPU time); =deep at MedGemma's depth (34 layers) but narrow widths, to see how bf16
# rounding grows with depth. Either proves nothing about the GPU.
ON_CPU = os.environ.get("INTERP_GPU_SUITE_ON_CPU") in ("1", "deep")
DEEP = os.environ.get("INTERP_GPU_SUITE_ON_CPU") == "deep"
DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if ON_CPU else None)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (the GPU equivalence suite)")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="no CUDA device: the GPU equivalence suite runs on the lent GPU machine")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.gpu)
            if DEVICE is None:
                item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS or DEVICE is None:
        return
    import peft
    import transformers

    out = Path(os.environ.get("OUT") or ROOT / "gpu_results")
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (toy shapes: checks the suite only)"
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": gpu,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "peft": peft.__version__, "python": sys.version.split()[0]},
           "cuda_launch_blocking": os.environ.get("CUDA_LAUNCH_BLOCKING"), "cases": RESULTS}
    name = f"gpu_equivalence-{transformers.__version__}.json"
    (out / name).write_text(json.dumps(doc, indent=1, default=str))


@pytest.fixture(scope="session", autouse=True)
def _no_launch_blocking():
    if os.environ.get("CUDA_LAUNCH_BLOCKING", "0") not in ("", "0"):
        pytest.exit("CUDA_LAUNCH_BLOCKING is set: it hides stream races; unset it to run the GPU suite", 2)


@pytest.fixture(scope="session")
def record():
    def put(case: str, **values):
        RESULTS[case] = values
        print(f"{case}: " + ", ".join(f"{k}={v}" for k, v in values.items() if not isinstance(v, (list, dict))))

    return put


@pytest.fixture(scope="session")
def medgemma():
    """MedGemma-4B-shaped Gemma3ForConditionalGeneration (random weights), bf16, SDPA, on the GPU."""
    sys.path.insert(0, str(ROOT / "bench"))
    import medgemma_shape

    if DEVICE == "cpu":
        return medgemma_shape.build(smoke=True, deep=DEEP, device="cpu", dtype=torch.float32)
    return medgemma_shape.build(device="cuda", dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def bf16_and_fp32(medgemma):
    """The session's model in bf16 and in float32 (the same weights): float32 is the truth that bf16 paths are
    judged against. On the GPU the session's model is the bf16 one; on the CPU the float32 one."""
    import copy
    import dataclasses

    other = copy.deepcopy(medgemma.hf).to(torch.bfloat16 if medgemma.dtype == torch.float32 else torch.float32)
    other = dataclasses.replace(medgemma, hf=other)
    return (other, medgemma) if medgemma.dtype == torch.float32 else (medgemma, other)


@pytest.fixture(scope="session")
def ragged_prompts(medgemma) -> list[str]:
    """160 prompts of 40-900 tokens in an order nobody sorted (as a new user's corpus would be)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import medgemma_shape

    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 120, size=40) if DEVICE == "cpu" else rng.integers(40, 901, size=160)
    out = []
    for k, n in enumerate(lengths):
        out += medgemma_shape.long_prompts(medgemma, 1, int(n), seed=k)
    return out


@pytest.fixture(scope="session")
def cxr_images(tmp_path_factory) -> list[str]:
    """24 synthetic 768-px 'chest X-rays' (PNG files) with different content."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("cxr")
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:768, 0:768]
    paths = []
    for k in range(6 if DEVICE == "cpu" else 24):
        cx, cy = rng.integers(150, 620, size=2)
        img = 40 + 0.15 * yy + 90 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rng.uniform(20, 80) ** 2))
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype("uint8")
        path = folder / f"cxr_{k:02d}.png"
        Image.fromarray(np.stack([img] * 3, -1)).save(path)
        paths.append(str(path))
    return paths
