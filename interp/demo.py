"""``interp demo``: the whole loop on the embedded Gemma 3 270M (see `interp.loop`), ending in a report.

As in every run of the loop, features and layers are chosen on the training pairs only and consistency is
measured on the held-out pairs; the report names both sets (count and ids hash). The SAE is the published
Gemma Scope 2 one for the 270M when it is on this machine or the hub answers, else one trained here.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from interp.loop import LoopConfig, LoopReport, run_loop

# The demo's settings (configs/demo.yaml holds the same, as a file to edit and pass to `interp run`).
DEMO: dict = {
    "model": {"source": "gemma3-270m"},
    # 120 pairs, 30% held out (36) for the before/after evaluation only
    "data": {"pairs": "register", "limit": 120, "eval_fraction": 0.3},
    # layer 9: the 270M's middle, and one of the four layers Gemma Scope 2 publishes SAEs for (5, 9, 12, 15).
    # An SAE trained here sees 100 general prompts (~2.5k tokens; the other 20 are held out for the transfer
    # test). That is few tokens for an SAE: 2048 features memorised them (R^2 0.75 on unseen general text in a
    # check on the training prompts alone), 1024 with k=64 (Gemma Scope 2's medium L0 is ~60) less so (0.80).
    "sae": {"layer": 9, "d_sae": 1024, "k": 64, "steps": 600, "train_prompts": 100},
    "transfer": {"threshold": 0.95, "n_prompts": 40},
    "layers": {"method": "residual", "width": 5},
    # every training pair, two epochs, at a step size that moves the margins without a collapse to one answer
    "lora": {"r": 8, "alpha": 16, "lr": 5.0e-4, "epochs": 2, "grad_accum": 4, "train_pairs": None},
    "output": "reports/demo",
    "seed": 0,
}
# --quick (CI): the same loop, shrunk so that it runs in about a minute
QUICK: dict = {"data": {"limit": 48}, "sae": {"steps": 150, "train_prompts": 40, "d_sae": 512, "k": 32},
               "transfer": {"n_prompts": 24, "n_boot": 200},
               "lora": {"epochs": 1, "train_pairs": 16, "alpha": 32, "lr": 1.0e-3}}

# the published SAE the demo prefers: Gemma Scope 2, residual stream, 16k features, medium L0 (~60)
GEMMA_SCOPE_RELEASE = "gemma-scope-2-270m-pt-res"
GEMMA_SCOPE_LAYERS = (5, 9, 12, 15)


def demo_config(quick: bool = False) -> LoopConfig:
    """The demo's `LoopConfig` (``quick``: the reduced CI setting); checked, nothing loaded."""
    data = {section: dict(values) if isinstance(values, dict) else values for section, values in DEMO.items()}
    if quick:
        for section, values in QUICK.items():
            data[section].update(values)
    return LoopConfig.from_dict(data, where="the demo settings")


def choose_sae(config: LoopConfig, model_name: str = "gemma3-270m") -> str:
    """Point ``config.sae`` at the published Gemma Scope 2 SAE for the 270M when there is a local copy (see
    `interp.saes.sae_home`, or the Hugging Face cache) or the hub answers; else leave it to be trained.
    Returns a sentence saying which SAE the run uses and why."""
    from interp.saes import hub_unreachable, local_sae_copy, sae_home

    layer = config.sae.layer
    if config.sae.release is not None:
        return f"SAE: {config.sae.release}{'/' + config.sae.sae_id if config.sae.sae_id else ''} (as configured)"
    trained = (f"SAE: a TopK SAE trained here (d_sae={config.sae.d_sae}, k={config.sae.k}, {config.sae.steps} "
               f"steps on {config.sae.train_prompts} general prompts)")
    if model_name != "gemma3-270m" or layer not in GEMMA_SCOPE_LAYERS:
        return f"{trained}: Gemma Scope 2 has no SAE for layer {layer} of '{model_name}'"
    sae_id = f"layer_{layer}_width_16k_l0_medium"
    local = local_sae_copy(GEMMA_SCOPE_RELEASE, sae_id)
    if local is not None:
        config.sae.release, config.sae.sae_id = str(local), None
        return f"SAE: the published Gemma Scope 2 {GEMMA_SCOPE_RELEASE}/{sae_id}, read from '{local}'"
    why = hub_unreachable()
    if why is None:
        config.sae.release, config.sae.sae_id = GEMMA_SCOPE_RELEASE, sae_id
        return f"SAE: the published Gemma Scope 2 {GEMMA_SCOPE_RELEASE}/{sae_id}, from the Hugging Face hub"
    return (f"{trained}, because the published {GEMMA_SCOPE_RELEASE}/{sae_id} is neither under "
            f"'{sae_home()}' nor in the Hugging Face cache and the hub is unreachable ({why})")


def run_demo(out: Path = Path("reports/demo"), *, quick: bool = False, model_name: str = "gemma3-270m") -> LoopReport:
    """Run the loop on ``model_name`` with the demo settings (``quick``: a reduced setting for CI); every
    setting, the model name and ``out`` are checked before any work starts."""
    config = demo_config(quick=quick)
    config.output = str(out)
    config.model.source = model_name
    Console().print(f"[bold]{choose_sae(config, model_name)}[/bold]")
    return run_loop(config)
