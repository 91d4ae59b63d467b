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
# # 03 · Register-sensitive features
#
# **Method.** Each built-in pair asks one clinical question in a formal register (a) and a lay register (b).
# We encode both phrasings with the SAE at layer `layer`, pool feature activations over the question tokens
# (and at the last token), and test every feature for a paired difference (Wilcoxon signed-rank), with
# Benjamini-Hochberg control of the false discovery rate. The study's "feature 3818" at layer 17 of
# MedGemma is such a feature. Features are chosen on the training side of a seeded split by question group
# (`interp.data.split`); we then open a card for the strongest one and check it causally on the held-out
# pairs, which took no part in choosing it: zeroing it inside the forward pass, how much do the yes/no
# margins and the flip rate move?

# %% tags=["parameters"]
model_name = "gemma3-270m"
sae_release = None  # None: train a small SAE here (as in notebook 02)
sae_id = None
layer = 9
n_pairs = 80
eval_fraction = 0.3  # held out: never used to choose features
d_sae = 2048
sae_steps = 400
output_dir = "exports/notebooks"
device = None
seed = 0

# %%
import interp

model, rec = interp.notebook_setup(model_name, output_dir=output_dir, seed=seed, device=device)
pairs = interp.data.builtin("register")[:n_pairs]
train_pairs, eval_pairs = interp.data.split(pairs, eval_fraction, seed=seed)
rec.pairs("features.selection", train_pairs)
sae = interp.sae_for(model, sae_release, sae_id, layer=layer, d_sae=d_sae, steps=sae_steps, seed=seed)

# %%
features = interp.register_features(model, sae, train_pairs, layer=layer)
features

# %%
top = features.top(15)
rec.table("register_features", top, caption=f"Register-sensitive SAE features at layer {layer}")
rec.metric("features.n_significant", len(features.significant()))
fig = features.figure()
rec.figure("register_features", fig)
fig

# %%
best = int(top.iloc[0]["feature"])
card = interp.feature_card(model, sae, best, train_pairs, layer=layer)
rec.figure("feature_card", card.figure())
card

# %%
ablation = interp.ablate_feature(model, sae, eval_pairs, feature=best, layer=layer, mode="zero")
rec.pairs("feature_ablation.evaluation", eval_pairs)
rec.metrics_from("feature_ablation", {
    "feature": best, "layer": layer, "mode": "zero", "n_pairs": ablation.n_pairs,
    "margin_diff_change": ablation.margin_diff_change, "p_margin_diff": ablation.p_margin_diff,
    "flip_rate_change": ablation.flip_rate_change, "p_flip": ablation.p_flip, "p_random": ablation.p_random})
for key in ("margin_diff_change_ci", "flip_rate_change_ci"):  # 95% intervals
    rec.metric(f"feature_ablation.{key}", list(getattr(ablation, key)))
rec.metric("feature_ablation.tests", ablation.tests)  # the test or interval behind each number
rec.figure("feature_ablation", ablation.figure())
ablation
