"""``interp demo``: the whole loop on the embedded Gemma 3 270M (see `interp.loop`), ending in a report.

As in every run of the loop, features and layers are chosen on the training pairs only and consistency is
measured on the held-out pairs; the report names both sets (count and ids hash).
"""

from __future__ import annotations

from pathlib import Path

from interp.loop import LoopConfig, LoopReport, run_loop


def run_demo(out: Path = Path("reports/demo"), *, quick: bool = False, model_name: str = "gemma3-270m") -> LoopReport:
    """Run the loop on ``model_name`` with the demo settings (``quick``: a reduced setting for CI); every
    setting, the model name and ``out`` are checked before any work starts."""
    config = LoopConfig.demo(quick=quick)
    config.output = str(out)
    config.model.source = model_name
    return run_loop(config)
