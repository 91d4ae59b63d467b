"""interp: a mechanistic-interpretability workbench for medical vision-language models.

The loop, one stage per module: models -> capture -> saes -> features -> layers -> consistency -> lora,
with data (paraphrase pairs), viz, export (paper artefacts) and loop/cli (the whole run).
"""

from interp import data, layers, prompts, viz
from interp._errors import AdapterMismatchError, ForeignFilesError, InterpError
from interp.capture import ActivationChunk, Activations, capture, load_activations
from interp.consistency import ConsistencyComparison, ConsistencyReport, evaluate
from interp.data import ParaphraseGroup, ParaphrasePair, load_pairs
from interp.export import Recorder, export, notebook_setup
from interp.features import FeatureTable, ablate_feature, feature_card, register_features
from interp.interop import export_sae_lens, import_sae_lens
from interp.layers import LayerProfile, LayerSelection, find_layers, layer_profile
from interp.lora import (
                         AblationReport,
                         TrainResult,
                         ablate_layers,
                         adapter_report,
                         load_adapter,
                         merge,
                         train_lora,
)
from interp.models import Model, Prompt, load
from interp.saes import TransferReport, check_sae, load_sae, sae_for, train_sae, transfer_report

__version__ = "0.1.0"

# One line each: what a user reaches for.
__all__ = [
    "load",  # open MedGemma, any HF decoder, a .gguf file or a built-in model -> Model
    "Model",  # a loaded model: .hf, .tokenizer, .processor, .layer(i), .inputs(q, image), .answer_ids
    "Prompt",  # (question, image, context)
    "capture",  # residual-stream activations with hooks, cached in sae_cache/ -> Activations
    "Activations",
    "ActivationChunk",  # one shard's rows: what Activations.chunks() yields
    "load_activations",  # read a capture cache folder back
    "export_sae_lens",  # a capture as the dataset sae-lens' ActivationsStore / CacheActivationsRunner use
    "import_sae_lens",  # a sae-lens activation cache as Activations
    "load_sae",  # a Gemma Scope 2 / sae-lens SAE from the registry or a local folder
    "train_sae",  # train a JumpReLU or TopK SAE with sae-lens on captured activations
    "check_sae",  # does this SAE fit this model's layer?
    "sae_for",  # a published SAE checked against the model, or one trained here
    "transfer_report",  # R^2, CIs, test vs threshold, L0, dead features, CE/KL splice -> TransferReport
    "TransferReport",
    "ParaphrasePair",  # two phrasings of one yes/no question
    "ParaphraseGroup",  # several phrasings of one question
    "load_pairs",  # PSF-Med-style JSONL/CSV -> list[ParaphrasePair]
    "register_features",  # SAE features that change between formal and lay phrasing -> FeatureTable
    "FeatureTable",
    "feature_card",  # one feature: top prompts and tokens, activation by register
    "ablate_feature",  # causal check: zero or clamp a feature, measure margins and flips
    "layer_profile",  # per-layer evidence: "patching", "residual" or "sae" -> LayerProfile
    "LayerProfile",
    "find_layers",  # the best contiguous window of layers -> LayerSelection
    "LayerSelection",
    "evaluate",  # paraphrase consistency: flip rate, margin difference, accuracy -> ConsistencyReport
    "ConsistencyReport",
    "ConsistencyComparison",
    "train_lora",  # targeted LoRA with CE + symmetric-KL consistency loss -> TrainResult
    "TrainResult",
    "load_adapter",  # a PEFT adapter (ours or published) onto a Model
    "adapter_report",  # exactly which modules carry adapters
    "merge",  # merge into a bf16 base and verify the weight delta
    "ablate_layers",  # one adapter per layer range, evaluated side by side -> AblationReport
    "AblationReport",
    "Recorder",  # write figures, tables and metrics for a paper
    "export",  # execute the notebooks headless and export everything
    "notebook_setup",  # a notebook's first cell: seeds, renderer, Recorder, model
    "InterpError",  # every error the workbench raises for a bad input: it names the input and the fix
    "ForeignFilesError",  # an output folder holds files the workbench did not write (they are left alone)
    "AdapterMismatchError",  # an adapter's keys do not match the model's modules (names them)
    "data",
    "layers",
    "prompts",
    "viz",
]
