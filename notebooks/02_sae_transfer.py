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
# # 02 · Do the SAEs transfer?
#
# **Method.** An SAE trained on the base model's activations is only useful on MedGemma if it still
# reconstructs MedGemma's residual stream. We splice nothing yet: we capture layer `layer` on clinical
# text and on everyday text and report the explained variance (sae-lens' formula, float64), a bootstrap
# 95% CI over prompts, a one-sided test against the threshold, L0 and dead features; then we splice the
# reconstruction into the forward pass and report the CE-loss score and KL. BOS and other special tokens
# are excluded. With `sae_release=None` we train a small TopK SAE on general text first, so transfer
# to medical text is a real out-of-distribution test.

# %% tags=["parameters"]
model_name = "gemma3-270m"
sae_release = None  # a sae-lens release ("gemma-scope-2-4b-it-res") or a local SAE folder; None: train one
sae_id = None  # e.g. "layer_17_width_16k_l0_medium"
layer = 9
n_prompts = 60  # prompts per corpus
d_sae = 2048
sae_steps = 400
threshold = 0.95
output_dir = "exports/notebooks"
device = None
seed = 0

# %%
import interp

model, rec = interp.notebook_setup(model_name, output_dir=output_dir, seed=seed, device=device)
medical, general = interp.prompts.medical(), interp.prompts.general()

# %%
# a trained-here SAE sees the first n_prompts general prompts; transfer is tested on the next ones
sae = interp.sae_for(model, sae_release, sae_id, layer=layer, train_prompts=general[:n_prompts], d_sae=d_sae,
                     steps=sae_steps, seed=seed)
test_general = general[n_prompts:2 * n_prompts] if sae_release is None else general[:n_prompts]

# %%
report = interp.transfer_report(model, sae, {"medical": medical[:n_prompts], "general": test_general},
                                layer=layer, threshold=threshold, seed=seed)
report

# %%
rec.table("transfer", report.table(), caption="SAE transfer: explained variance by corpus")
for c in report.corpora:
    rec.metrics_from(f"transfer.{c.name}", {"r2": c.r2, "r2_prompt_mean": c.r2_prompt_mean,
                                            "p_bootstrap": c.p_bootstrap, "l0": c.l0, "ce_score": c.ce_score})
rec.metric("transfer.passed", report.passed)
rec.figure("transfer_r2", report.figure())  # the report above already shows it
