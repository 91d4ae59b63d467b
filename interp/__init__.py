"""interp: a mechanistic-interpretability workbench for medical vision-language models."""

from interp._errors import InterpError
from interp.models import Model, Prompt, load

__all__ = ["InterpError", "Model", "Prompt", "load"]
__version__ = "0.1.0"
