"""interp: a mechanistic-interpretability workbench for medical vision-language models."""

from interp import prompts, viz
from interp._errors import InterpError
from interp.capture import Activations, capture, load_activations
from interp.models import Model, Prompt, load

__all__ = ["Activations", "InterpError", "Model", "Prompt", "capture", "load", "load_activations", "prompts", "viz"]
__version__ = "0.1.0"
