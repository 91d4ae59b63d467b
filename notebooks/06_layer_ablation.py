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
# # 06 · Layer-range ablation
#
# **Method.** The study found that adapters on early layers reduced margin differences more than adapters
# on the mechanistically selected middle layers. We train one adapter per layer range in `ranges` (by
# default early 0-4, middle 7-11 and late 13-17 of Gemma 3 270M's 18 layers; add the window `find_layers`
# selects, or `"all"`, to compare with those too) from the same base with identical data, seed and settings,
# evaluate each on the same held-out pairs, and compare each against the untrained baseline with the study's
# statistics.

# %% tags=["parameters"]
model_name = "gemma3-270m"
ranges = {"early": [0, 1, 2, 3, 4], "middle": [7, 8, 9, 10, 11], "late": [13, 14, 15, 16, 17]}
n_pairs = 48
eval_fraction = 0.3
r = 8
alpha = 32
lr = 1e-3
epochs = 1
grad_accum = 4
output_dir = "exports/notebooks"
device = None
seed = 0

# %%
import interp

model, rec = interp.notebook_setup(model_name, output_dir=output_dir, seed=seed, device=device)
pairs = interp.data.builtin("register")[:n_pairs]
train_pairs, eval_pairs = interp.data.split(pairs, eval_fraction, seed=seed)

# %%
ablation = interp.ablate_layers(model, train_pairs, ranges, eval_pairs=eval_pairs, seed=seed, r=r, alpha=alpha,
                                lr=lr, epochs=epochs, grad_accum=grad_accum, output_dir=f"{output_dir}/ablation")
rec.table("ablation", ablation.table, caption="Layer-range ablation: one adapter per range")
ablation

# %%
rec.figure("ablation", ablation.figure())  # the report above already shows it
