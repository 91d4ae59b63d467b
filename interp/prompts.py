"""The bundled text corpora used to check SAE transfer: clinical questions and report sentences, and
everyday text. Both were written for this project (120 prompts each) and ship in ``interp/resources``.
"""

from __future__ import annotations

from pathlib import Path

_RESOURCES = Path(__file__).parent / "resources"


def _lines(name: str) -> list[str]:
    return [line.strip() for line in (_RESOURCES / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def medical() -> list[str]:
    """Clinical questions and radiology-report sentences (chest X-ray themed), one prompt per item."""
    return _lines("prompts_medical.txt")


def general() -> list[str]:
    """Everyday, non-medical questions and sentences (cooking, travel, history, news), one per item."""
    return _lines("prompts_general.txt")


def corpora() -> dict[str, list[str]]:
    """Both corpora as ``{"medical": [...], "general": [...]}``, the shape `transfer_report` takes."""
    return {"medical": medical(), "general": general()}
