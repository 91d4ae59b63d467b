"""``interp demo``: the whole loop on the embedded Gemma 3 270M (see `interp.loop`), ending in a report."""

from __future__ import annotations

from pathlib import Path

from interp.loop import LoopConfig, LoopReport, run_loop


def run_demo(out: Path = Path("reports/demo"), *, quick: bool = False, model_name: str = "gemma3-270m") -> LoopReport:
    """Run the loop on ``model_name`` with the demo settings (``quick``: a reduced setting for CI)."""
    config = LoopConfig.demo(quick=quick)
    config.output = str(out)
    config.model.source = model_name
    return run_loop(config)
