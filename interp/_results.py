"""Shared base for result objects: frozen dataclasses that print well and turn into JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


def jsonable(value: Any) -> Any:
    """Turn tensors, arrays, dataframes, paths and dataclasses into JSON-ready Python values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict() if hasattr(value, "to_dict") else {
            f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "to_dict") and hasattr(value, "columns"):  # pandas DataFrame
        return [jsonable(r) for r in value.to_dict(orient="records")]
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().tolist()
    elif hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy array or scalar
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


class Result:
    """Mixin for frozen result dataclasses: ``to_dict()`` (JSON-ready) and ``to_json(path)``."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if not f.name.startswith("_")}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            from interp._io import atomic_write_text

            atomic_write_text(path, text)
        return text
