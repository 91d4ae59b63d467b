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
# # 04 · Which layers should the LoRA touch?
#
# **Method.** Three kinds of evidence, one score per decoder layer: *patching* (patch phrasing a's residual
# stream at the answer position into phrasing b's forward pass, layer by layer, and measure how much of the
# margin difference it carries), *residual* (how far apart the two phrasings' residual streams are, relative
# to the distance between different questions; needs no SAE) and, where SAEs exist, *sae*
# (register-sensitive feature mass). `find_layers` takes the contiguous window with the highest score.
# The study picked 15-19 of MedGemma's 34 layers; `to_depth` maps a window by relative depth (14-18 of
# LLaVA-Rad's 32). The evidence comes from the training side of a seeded split by question group
# (`interp.data.split`, the same split notebook 05 trains and evaluates on), so the held-out pairs never
# choose the layers they are later evaluated on.

# %% tags=["parameters"]
model_name = "gemma3-270m"
n_pairs = 40
eval_fraction = 0.3  # held out: never used to choose layers
width = 5
methods = ["residual", "patching"]
output_dir = "exports/notebooks"
device = None
seed = 0

# %%
import pandas as pd

import interp

model, rec = interp.notebook_setup(model_name, output_dir=output_dir, seed=seed, device=device)
pairs = interp.data.builtin("register")[:n_pairs]
train_pairs, eval_pairs = interp.data.split(pairs, eval_fraction, seed=seed)
rec.pairs("layers.selection", train_pairs)

# %%
profiles = {m: interp.layer_profile(model, train_pairs, method=m) for m in methods}
selections = {m: p.select(width) for m, p in profiles.items()}
for m, p in profiles.items():
    rec.figure(f"layer_profile_{m}", p.figure())
    rec.metric(f"layers.{m}.selected", list(selections[m].layers))
table = pd.DataFrame([{"method": m, "layers": f"{s.layers[0]}-{s.layers[-1]}", "peak": s.peak,
                       "relative depth": f"{s.relative_depth[0]:.0%}-{s.relative_depth[1]:.0%}"}
                      for m, s in selections.items()])
rec.table("layer_selection", table, caption="Layer windows chosen by each method")
table

# %%
profiles[methods[0]].figure()

# %% [markdown]
# The same window at another depth, and the adapter config it hands to training:

# %%
chosen = selections[methods[0]]
print(chosen, "->", interp.LayerSelection((15, 16, 17, 18, 19), 34).to_depth(32))
chosen.lora_config()
