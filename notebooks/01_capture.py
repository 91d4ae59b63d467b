# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Residual-stream capture
#
# **Method.** We load the model and record the residual stream after each decoder layer
# (TransformerLens' `blocks.{L}.hook_resid_post`) at the last prompt token, for clinical questions and
# report sentences (`interp.prompts.medical()`) and for everyday text (`interp.prompts.general()`).
# Forward hooks keep only the requested positions and stop the pass after the last requested layer;
# activations are cached as safetensors shards under `sae_cache/`, so re-running this cell is free.

# %% tags=["parameters"]
model_name = "gemma3-270m"  # hub id, local folder, .gguf or built-in ("tiny-medgemma", ...)
layers = "all"  # "all", or a list of decoder layers
n_prompts = 40  # prompts per corpus
output_dir = "exports/notebooks"  # figures, tables and metrics land here
device = None
seed = 0

# %%
import interp

model, rec = interp.notebook_setup(model_name, output_dir=output_dir, seed=seed, device=device)
model

# %%
medical, general = interp.prompts.medical()[:n_prompts], interp.prompts.general()[:n_prompts]
acts = interp.capture(model, medical + general, layers=layers, positions="last", cache=True)
acts

# %% [markdown]
# **Result.** Mean residual-stream norm per layer, and how far apart the medical and general means are.

# %%
groups = {"medical": range(len(medical)), "general": range(len(medical), len(medical) + len(general))}
table = acts.summary(groups)
rec.table("capture_norms", table, caption="Residual-stream norm by layer and corpus")
fig = acts.figure(groups)
rec.figure("capture_norms", fig)
rec.metric("capture.n_rows", len(acts))
rec.metric("capture.layers", acts.layers)
fig
