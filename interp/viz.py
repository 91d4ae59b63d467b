"""Shared plotting conventions: one plotly template for every figure, and notebook rendering setup."""

from __future__ import annotations

TEMPLATE = "plotly_white"
FORMAL, LAY = "#1f77b4", "#ff7f0e"  # colours of the two registers, used consistently across figures


def use_notebook_renderer() -> None:
    """Render figures for JupyterLab (plotly mimetype) and for exported HTML (inline plotly.js) at once."""
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype+notebook"
    pio.templates.default = TEMPLATE
