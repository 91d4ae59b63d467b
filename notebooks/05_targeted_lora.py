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
# # 05 · Targeted LoRA and paraphrase consistency
#
# **Method.** We measure consistency on held-out pairs (flip rate: the yes/no decision changes between
# phrasings after polarity correction; mean |margin difference|, margin = logit(yes) - logit(no) at the first
# answer token; accuracy against gold answers), train rank-`r` LoRA adapters on the chosen layers only with
# cross-entropy on the first answer token plus the symmetric KL between the two phrasings' answer
# distributions, and measure again. Before/after differences are tested with the study's two-proportion
# z-test and with paired tests (McNemar on flips, Wilcoxon on margin differences). The layers are chosen,
# and the adapter trained, on the training side of a seeded split by question group; the held-out side is
# used only for the measurements.

# %% tags=["parameters"]
model_name = "gemma3-270m"
layers = "auto"  # "auto" picks them with find_layers, or give a list of layer numbers
n_pairs = 60
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
rec.pairs("lora.selection", train_pairs)
rec.pairs("consistency.evaluation", eval_pairs)
selection = interp.find_layers(model, train_pairs, method="residual") if layers == "auto" else layers
selection

# %%
before = interp.evaluate(model, eval_pairs, seed=seed)
before

# %%
result = interp.train_lora(model, train_pairs, layers=selection, r=r, alpha=alpha, lr=lr, epochs=epochs,
                           grad_accum=grad_accum, eval_pairs=eval_pairs, seed=seed,
                           output_dir=f"{output_dir}/adapter", resume=False)
rec.figure("lora_history", result.figure())
rec.table("lora_history", result.table, caption="Targeted LoRA: per-epoch history")
result

# %%
after = interp.evaluate(interp.load_adapter(model, result.adapter_path), eval_pairs, seed=seed)
comparison = before.compare(after)
rec.table("consistency", comparison.table, caption="Paraphrase consistency before and after targeted LoRA")
for name, rep in (("before", before), ("after", after)):
    rec.metrics_from(f"consistency.{name}", {"flip_rate": rep.flip_rate, "mean_margin_diff": rep.mean_margin_diff,
                                             "accuracy": rep.accuracy})
# paired tests first (the same held-out pairs before and after); the study's unpaired z-test is kept, labelled
rec.metrics_from("consistency.compare", {"p_flip": comparison.p_flip, "flip_test": comparison.flip_test,
                                         "p_accuracy_paired": comparison.p_accuracy_paired,
                                         "p_wilcoxon": comparison.p_wilcoxon, "p_z_unpaired": comparison.p_z,
                                         "relative_margin_diff_delta": comparison.relative_margin_diff_delta,
                                         "mean_abs_margin_relative": comparison.mean_abs_margin_relative})
rec.figure("consistency_compare", comparison.figure())
comparison

# %%
fig = after.figure()
rec.figure("consistency_after", fig)
fig
