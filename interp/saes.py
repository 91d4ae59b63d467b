"""Stage 3 of the loop: sparse autoencoders on the residual stream, loaded, trained and validated.

`load_sae()` opens a sae-lens registry SAE, a local Gemma Scope 2 folder (no hub access) or a folder sae-lens
saved; `train_sae()` trains one with sae-lens' own trainer on cached activations; `transfer_report()` measures
how well an SAE reconstructs a model's activations on text corpora (R^2, L0, dead features, CE-loss score, KL).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp._errors import InterpError
from interp._results import Result
from interp.capture import Activations, capture, layer_output, position_mask
from interp.models import Model, Prompt, _as_prompt, as_dtype, check_device, exclusive, layer_arg

if TYPE_CHECKING:  # sae-lens takes ~10 s to import: only functions that need it import it
    from sae_lens import SAE

R2_FORMULA = "1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)"
R2_NAME = (f"explained variance R^2 = {R2_FORMULA} over tokens, accumulated in float64 "
           "(sae-lens' current explained_variance)")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
# sae-lens SAEs trained through HookedProxyLM or AutoModel-based runners name the Hugging Face module they read
# (`model.language_model.layers.17`, `model.layers.17.output`, `...layers.17.hook_resid_post`): the decoder
# layer is the number after `layers.`, the site is what follows it (nothing, `output`: the layer's output)
_HF_HOOK_RE = re.compile(r"^(?P<prefix>(?:[A-Za-z_]\w*\.)*?)layers\.(?P<layer>\d+)(?:\.(?P<site>.+))?$")
_HF_SITES = {
    None: "hook_resid_post", "output": "hook_resid_post", "hook_resid_post": "hook_resid_post",
    "input": "hook_resid_pre", "hook_resid_pre": "hook_resid_pre",
    "post_feedforward_layernorm.output": "hook_mlp_out", "mlp": "hook_mlp_out", "mlp.output": "hook_mlp_out",
    "hook_mlp_out": "hook_mlp_out", "self_attn.o_proj.input": "attn.hook_z", "attn.hook_z": "attn.hook_z",
}

# Gemma Scope 2's config.json names the Hugging Face module it reads (`hf_hook_point_in`); these are the
# same site mappings as sae-lens' gemma_3 loader, from the HF module path to the TransformerLens hook.
_GEMMA_SCOPE_SITES = (
    (re.compile(r"layers\.(\d+)\.output$"), "blocks.{}.hook_resid_post"),
    (re.compile(r"layers\.(\d+)\.post_feedforward_layernorm\.output$"), "blocks.{}.hook_mlp_out"),
    (re.compile(r"layers\.(\d+)\.self_attn\.o_proj\.input$"), "blocks.{}.attn.hook_z"),
)
_GEMMA_SCOPE_KEYS = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")


class SAEFileError(InterpError):
    """An SAE file on disk that cannot be used: corrupt, truncated, or disagreeing with its config."""


def _refetch_hint(path: Path) -> str:
    return (f"download the folder '{path.parent.name}/{path.name}' again (e.g. `hf download <repo> --include "
            f"'{path.parent.name}/{path.name}/*'`), or re-save it with sae.save_model(folder) from a copy that loads")


# ---- loading ------------------------------------------------------------------------------------
def _dtype_name(dtype: Any) -> str | None:
    """sae-lens takes dtypes by name; an SAE's weights are floating point."""
    if dtype is None:
        return None
    dt = as_dtype(dtype)
    if not dt.is_floating_point:
        raise InterpError(f"dtype={dtype!r}: SAE weights are floating point; use 'float32', 'bfloat16' or "
                          "'float16' (or leave dtype unset)")
    return str(dt).removeprefix("torch.")


def _default_device(device: Any) -> str:
    """The device (by name, as sae-lens takes it) ``device`` names; an `InterpError` for one this machine lacks."""
    return str(check_device(device))


def load_sae(release_or_path: str | os.PathLike, sae_id: str | None = None, *, device: Any = None,
             dtype: Any = None, layer: int | None = None) -> SAE:
    """Load an SAE: a sae-lens release + id, a hub repo id + folder, a local Gemma Scope 2 folder, or a folder
    sae-lens saved.

    A release or repo is read from a local copy when there is one (`sae_home()`, then the Hugging Face cache),
    else from the hub with the loader sae-lens uses for that release (Gemma Scope 2: its ``gemma_3`` loader,
    which reads ``config.json``); with no hub reachable (or ``HF_HUB_OFFLINE=1``) it fails at once, saying
    what to download and where to put it. Hooks named by Hugging Face module paths (``model.layers.17``,
    ``model.language_model.layers.17.output``, as HookedProxyLM-trained SAEs have) become block hooks
    (``blocks.17.hook_resid_post``). ``layer`` declares the decoder layer when the files do not name it
    (the hook is then ``blocks.{layer}.<site>``); when they do and it differs, that is an error, not a
    silent relabel. Local folders never touch the hub.
    """
    if not isinstance(release_or_path, (str, os.PathLike)):
        raise InterpError(f"release_or_path={release_or_path!r} is of type {type(release_or_path).__name__}; pass a "
                          "sae-lens release name (with sae_id) or an SAE folder's path")
    src = os.fspath(release_or_path)
    if layer is not None:
        layer = layer_arg(layer)
    dev, dt = _default_device(device), _dtype_name(dtype)
    path = Path(src).expanduser()
    if path.is_file() and path.name in ("params.safetensors", "config.json", "cfg.json", "sae_weights.safetensors"):
        path = path.parent  # a file of the folder was passed: read the folder
    if path.exists() or src.startswith((".", "/", "~")) or (os.sep in src and sae_id is None):
        if not path.is_dir():
            raise InterpError(f"SAE folder not found: '{src}'. Pass a folder with params.safetensors + "
                              "config.json (Gemma Scope) or cfg.json + sae_weights.safetensors (sae-lens), "
                              "or a sae-lens release name and an sae_id.")
        sae = _load_folder(path, dev, dt, layer)
    else:
        sae = _load_registry(src, sae_id, dev, dt or "float32")
    _map_hf_hook(sae, src)
    if layer is not None:
        hook = sae.cfg.metadata.hook_name
        m = _HOOK_RE.match(hook) if hook else None
        if m and int(m.group(1)) != int(layer):
            raise InterpError(f"the SAE in '{src}' reads {hook} (layer {m.group(1)}) but layer={layer} was asked "
                              f"for; pass layer={m.group(1)} or load the SAE trained for layer {layer}")
        _set_layer(sae, int(layer))
    return sae.eval()


def _load_folder(path: Path, device: str, dtype: str | None, layer: int | None) -> SAE:
    from sae_lens import SAE
    from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

    if (path / SAE_CFG_FILENAME).is_file() and (path / SAE_WEIGHTS_FILENAME).is_file():
        from safetensors import SafetensorError

        cfg_file, weights = path / SAE_CFG_FILENAME, path / SAE_WEIGHTS_FILENAME
        try:
            json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SAEFileError(f"'{cfg_file}' is not valid JSON ({e}): {_refetch_hint(path)}") from e
        try:
            return SAE.load_from_disk(path, device=device, dtype=dtype)
        except SafetensorError as e:
            raise SAEFileError(f"'{weights}' is corrupt or truncated ({e}): {_refetch_hint(path)}") from e
        except RuntimeError as e:
            if "size mismatch" not in str(e) and "Missing key" not in str(e) and "Unexpected key" not in str(e):
                raise
            first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln or "key" in ln), str(e))
            raise SAEFileError(f"'{cfg_file}' and '{weights}' disagree ({first}): the config is not the one these "
                               f"weights were saved with; {_refetch_hint(path)}") from e
        except (KeyError, ValueError, TypeError) as e:
            raise SAEFileError(f"could not read the sae-lens folder '{path}' ({type(e).__name__}: {e}); check "
                               f"'{cfg_file.name}' against sae-lens' config fields or {_refetch_hint(path)}") from e
    if (path / "params.safetensors").is_file():
        loader = partial(_gemma_scope_disk_loader, layer=layer)
        sae = SAE.load_from_disk(path, device=device, dtype=dtype, converter=loader)
        sae.cfg.metadata.source_path = str(path)  # sae-lens keeps only its own metadata keys
        return sae
    found = sorted(p.name for p in path.iterdir())[:12]
    hint = " (params.npz is Gemma Scope 1 for Gemma 2: not supported)" if "params.npz" in found else ""
    raise InterpError(f"'{path}' is not an SAE folder{hint}: found {found}. Expected params.safetensors + "
                      f"config.json (Gemma Scope 2) or {SAE_CFG_FILENAME} + {SAE_WEIGHTS_FILENAME} (sae-lens).")


def _gemma_scope_config(path: Path, raw: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                        layer: int | None) -> dict[str, Any]:
    """sae-lens config dict for a Gemma Scope 2 folder, as sae-lens' gemma_3 loader builds it from the hub."""
    if raw.get("architecture", "jump_relu") != "jump_relu":
        raise InterpError(f"'{path / 'config.json'}' has architecture={raw.get('architecture')!r}; Gemma Scope "
                          "2 SAEs are 'jump_relu'")
    cfg_file = path / "config.json"
    hook_example = "model.layers.17.output"
    for key, example in (("hf_hook_point_in", hook_example), ("hf_hook_point_out", hook_example), ("type", "sae"),
                         ("model_name", "gemma-v3-270m-pt")):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise SAEFileError(f"'{cfg_file}': {key!r} is {raw[key]!r}, not text (Gemma Scope 2 writes e.g. "
                               f"{example!r}); {_refetch_hint(path)}")
    hook_in, hook_out = raw.get("hf_hook_point_in"), raw.get("hf_hook_point_out")
    if raw.get("type") == "transcoder" or (hook_out and hook_in and hook_out != hook_in) \
            or "affine_skip_connection" in shapes:
        raise InterpError(f"'{path}' holds a transcoder (reads {hook_in}, writes {hook_out}); load_sae reads "
                          "SAEs. Use an SAE folder such as resid_post/layer_17_width_16k_l0_medium.")
    site = None
    if hook_in:
        for pattern, template in _GEMMA_SCOPE_SITES:
            m = pattern.search(hook_in)
            if m:
                site, file_layer = template, int(m.group(1))
                break
        else:
            raise InterpError(f"'{path / 'config.json'}': hf_hook_point_in={hook_in!r} is not a residual, MLP "
                              "or attention output site this workbench knows")
    else:  # no config.json (or no hook in it): the folder names say it, as on the hub
        m = re.search(r"layer_(\d+)", path.name)
        file_layer = int(m.group(1)) if m else None
        parent = path.parent.name
        site = ("blocks.{}.hook_mlp_out" if parent.startswith("mlp_out") else
                "blocks.{}.attn.hook_z" if parent.startswith("attn_out") else "blocks.{}.hook_resid_post")
    if layer is None and file_layer is None:
        raise InterpError(f"cannot tell which layer the SAE in '{path}' reads: config.json has no "
                          "hf_hook_point_in and the folder is not named layer_<L>_...; pass layer=<L>")
    if layer is not None and file_layer is not None and int(layer) != file_layer:
        raise InterpError(f"the SAE in '{path}' reads layer {file_layer} but layer={layer} was asked for; pass "
                          f"layer={file_layer} or load the SAE trained for layer {layer}")
    hook_name = site.format(layer if layer is not None else file_layer)

    d_in, d_sae = shapes["w_enc"]
    width = raw.get("width")
    if width is not None:
        if isinstance(width, str) and width.strip().isdigit():
            width = int(width)
        if isinstance(width, bool) or not isinstance(width, int):
            raise SAEFileError(f"'{cfg_file}': 'width' is {width!r}, not a number of features (Gemma Scope 2 "
                               f"writes e.g. 16384); {_refetch_hint(path)}")
    if width is not None and width != d_sae:
        raise SAEFileError(f"'{path}': config.json says width={width} but w_enc in params.safetensors has {d_sae} "
                           f"columns: the config belongs to another SAE; {_refetch_hint(path)}")
    model_name = str(raw.get("model_name") or "unknown")
    if model_name != "unknown" and not model_name.startswith("google/"):
        model_name = "google/" + model_name
    model_name = model_name.replace("-v3", "-3")
    if "270m" in model_name:
        model_name = model_name.replace("-pt", "")  # the hub's 270M base model has no -pt suffix
    return {
        "architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
        "model_name": model_name, "hook_name": hook_name, "hook_head_index": None,
        "finetuning_scaling_factor": False, "sae_lens_training_version": None, "prepend_bos": True,
        "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
        "hf_hook_name": hook_in,
    }


def _gemma_scope_disk_loader(path: str | Path, device: str, cfg_overrides: dict[str, Any] | None = None,
                             *, layer: int | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A sae-lens ``PretrainedSaeDiskLoader`` for a local Gemma Scope 2 folder (no hub access)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    raw: dict[str, Any] = {}
    if (path / "config.json").is_file():
        try:
            raw = json.loads((path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SAEFileError(f"'{path / 'config.json'}' is not valid JSON ({e}): {_refetch_hint(path)}") from e
        if not isinstance(raw, dict):
            raise SAEFileError(f"'{path / 'config.json'}' holds a {type(raw).__name__}, not a JSON object of SAE "
                               f"settings: {_refetch_hint(path)}")
    params = path / "params.safetensors"
    try:
        with safe_open(str(params), framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise SAEFileError(f"'{params}' is corrupt or truncated ({e}): {_refetch_hint(path)}") from e
    missing = [k for k in _GEMMA_SCOPE_KEYS if k not in shapes]
    if missing:
        what = (" Without 'threshold' it is not a JumpReLU SAE; Gemma Scope 2 files always have one."
                if "threshold" in missing else "")
        raise SAEFileError(f"'{params}' lacks {missing} (has {sorted(shapes)}).{what} {_refetch_hint(path)}")
    if len(shapes["w_enc"]) != 2:
        raise InterpError(f"'{params}': w_enc has shape {shapes['w_enc']}; expected [d_in, d_sae]")
    d_in, d_sae = shapes["w_enc"]
    want = {"w_enc": (d_in, d_sae), "w_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
            "threshold": (d_sae,)}
    bad = [f"{k} {shapes[k]} (expected {v})" for k, v in want.items() if shapes[k] != v]
    if bad:
        raise SAEFileError(f"'{params}' has inconsistent shapes: {', '.join(bad)} for d_in={d_in}, d_sae={d_sae}; "
                           f"{_refetch_hint(path)}")
    cfg = _gemma_scope_config(path, raw, shapes, layer)
    cfg["device"] = device
    if cfg_overrides:
        cfg.update(cfg_overrides)
    dtype = getattr(torch, cfg["dtype"])
    try:
        with safe_open(str(params), framework="pt", device="cpu") as f:  # w_enc -> W_enc, as sae-lens names it
            state = {k.replace("w_", "W_", 1): f.get_tensor(k).to(device, dtype) for k in _GEMMA_SCOPE_KEYS}
    except (SafetensorError, OSError) as e:
        raise SAEFileError(f"'{params}' is corrupt or truncated ({e}): {_refetch_hint(path)}") from e
    return cfg, state


def sae_home() -> Path:
    """Where local copies of published SAEs are looked for first: ``$INTERP_HOME/saes`` (or ~/.cache/interp/saes),
    laid out as ``<release or hub repo id>/<folder>``, e.g. ``gemma-scope-2-270m-pt-res/layer_9_width_16k_l0_medium``
    or ``google/gemma-scope-2-270m-pt/resid_post/layer_9_width_16k_l0_medium``."""
    from interp.models import cache_home

    return cache_home() / "saes"


def _published(release: str, sae_id: str | None) -> tuple[str, str, str | None]:
    """(hub repo id, folder in it, sae-lens loader name) of a registry release + id, or of a hub repo id + folder
    (a registry id such as ``layer_9_width_16k_l0_medium`` is mapped to its folder for a registered repo)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()  # the registry ships with sae-lens: no hub needed here
    if release in directory:
        ids = list(directory[release].saes_map)
        if sae_id is None or sae_id not in ids:
            close = difflib.get_close_matches(str(sae_id), ids, n=4, cutoff=0.3) if sae_id else ids[:4]
            what = "sae_id is missing for" if sae_id is None else f"sae_id {sae_id!r} is not in"
            raise InterpError(f"{what} release {release!r}; for example {close} ({len(ids)} ids in all)")
        info = directory[release]
        return info.repo_id, info.saes_map[sae_id], info.conversion_func
    if "/" in release and sae_id:  # a hub repo id, as sae-lens allows
        registered = [info for info in directory.values() if info.repo_id == release]
        folder = next((info.saes_map[sae_id] for info in registered if sae_id in info.saes_map), sae_id)
        loader = next((info.conversion_func for info in registered if info.conversion_func), None)
        if loader is None and "gemma-scope-2" in release:
            loader = "gemma_3"  # Gemma Scope 2 folders ship config.json + params.safetensors, not cfg.json
        return release, folder.strip("/"), loader
    close = difflib.get_close_matches(release, list(directory), n=3, cutoff=0.5)
    raise InterpError(f"unknown SAE release {release!r} (and no such folder). "
                      f"{'Did you mean ' + ', '.join(map(repr, close)) + '? ' if close else ''}"
                      "Releases are listed in sae-lens' pretrained_saes.yaml, e.g. 'gemma-scope-2-4b-it-res'; "
                      "a hub repo id needs the folder as sae_id, e.g. ('google/gemma-scope-2-270m-pt', "
                      "'resid_post/layer_9_width_16k_l0_medium').")


def _is_sae_folder(path: Path) -> bool:
    return (path / "params.safetensors").is_file() or ((path / "cfg.json").is_file()
                                                        and (path / "sae_weights.safetensors").is_file())


def local_sae_copy(release: str, sae_id: str | None) -> Path | None:
    """The folder of a published SAE (registry release + id, or hub repo id + folder) already on this machine,
    under `sae_home()` or in the Hugging Face cache; None when there is none. Reads no weights, no network."""
    repo, folder, _ = _published(release, sae_id)
    leaf = folder.rsplit("/", 1)[-1]
    home = sae_home()
    for root in dict.fromkeys([home / release, home / repo, home / repo.rsplit("/", 1)[-1]]):
        for cand in (root / folder, root / leaf, root / str(sae_id)):
            if _is_sae_folder(cand):
                return cand
    from huggingface_hub import try_to_load_from_cache

    for name in ("params.safetensors", "cfg.json"):
        try:
            hit = try_to_load_from_cache(repo, f"{folder}/{name}")
        except Exception:  # a malformed cache entry is no copy
            continue
        if isinstance(hit, str) and _is_sae_folder(Path(hit).parent):
            return Path(hit).parent
    return None


def hub_unreachable(timeout: float = 2.0) -> str | None:
    """Why the Hugging Face hub cannot be reached from here (``HF_HUB_OFFLINE`` set, or no TCP connection to the
    endpoint, or to the HTTPS proxy, within ``timeout`` s), or None when it answers. Takes at most ``timeout`` s,
    where a hub download would spend ~26 s on retries before failing."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    if flag in ("1", "true", "yes", "on") or constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy if proxy else constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    what = f"{'the HTTPS proxy ' if proxy else ''}{host}:{port}"
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{what} is not reachable ({e})")

    thread = threading.Thread(target=probe, daemon=True)  # name resolution ignores socket timeouts
    thread.start()
    thread.join(timeout)
    return result[0] if result else f"{what} did not answer within {timeout:g} s"


def _fetch_hint(repo: str, folder: str, release: str) -> str:
    leaf = folder.rsplit("/", 1)[-1]
    return (f"Download the folder '{folder}' of '{repo}' on a machine with access, e.g. `hf download {repo} "
            f"--include '{folder}/*'`, and pass its local path: load_sae('<download>/{folder}'), or put it at "
            f"'{sae_home() / release / leaf}' where load_sae and the demo look first")


def _load_registry(release: str, sae_id: str | None, device: str, dtype: str) -> SAE:
    from sae_lens import SAE

    repo, folder, loader = _published(release, sae_id)
    local = local_sae_copy(release, sae_id)
    if local is not None:  # a copy on disk (ours or the HF cache) never touches the network
        sae = _load_folder(local, device, dtype, None)
    else:
        why = hub_unreachable()
        if why is not None:
            raise InterpError(f"could not fetch {release}/{sae_id}: no hub is reachable from here ({why}) and no "
                              f"local copy was found under '{sae_home()}' or in the Hugging Face cache. "
                              + _fetch_hint(repo, folder, release))
        converter = None
        if loader == "gemma_3":  # what sae-lens uses for its Gemma Scope 2 releases (config.json, not cfg.json)
            from sae_lens.loading.pretrained_sae_loaders import gemma_3_sae_huggingface_loader as converter
        hub_id = sae_id if release in _registry() else folder
        try:
            sae = SAE.from_pretrained(release, hub_id, device=device, dtype=dtype, converter=converter)
        except OSError as e:  # requests' and huggingface_hub's network errors are all OSErrors
            raise InterpError(f"could not fetch {release}/{sae_id} from the Hugging Face hub ({type(e).__name__}): "
                              f"no hub is reachable from here. {_fetch_hint(repo, folder, release)}") from e
    sae.cfg.metadata.release, sae.cfg.metadata.sae_id = release, sae_id
    sae.cfg.metadata.source_path = str(local) if local is not None else f"hf://{repo}/{folder}"
    return sae


def _registry() -> dict[str, Any]:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def _block_hook(hook: str | None, *, where: str = "the SAE") -> str | None:
    """A TransformerLens block hook for ``hook``: unchanged when it is one (or empty), else mapped from a Hugging
    Face module path (``model.language_model.layers.17`` -> ``blocks.17.hook_resid_post``)."""
    if not hook or _HOOK_RE.match(hook):
        return hook
    m = _HF_HOOK_RE.match(hook)
    if m is None:
        return hook  # check_sae says what it is not
    prefix, layer, site = m.group("prefix"), int(m.group("layer")), m.group("site")
    if any(part in prefix for part in ("vision", "visual", "image", "siglip", "mm_projector")):
        raise InterpError(f"{where} reads {hook!r}, a layer of the vision tower; the workbench splices SAEs on "
                          "the language decoder's residual stream (e.g. model.language_model.layers.<L>)")
    if site not in _HF_SITES:
        raise InterpError(f"{where} reads {hook!r}: decoder layer {layer}, but the site {site!r} is not one this "
                          f"workbench maps (nothing or 'output' for the residual stream after the layer, "
                          f"{', '.join(repr(k) for k in _HF_SITES if k)})")
    return f"blocks.{layer}.{_HF_SITES[site]}"


def _map_hf_hook(sae: SAE, src: str) -> None:
    """Rename an SAE's Hugging Face module hook to its block hook; the original is kept as ``hf_hook_name``."""
    hook = sae.cfg.metadata.hook_name
    mapped = _block_hook(hook, where=f"the SAE in '{src}'")
    if mapped != hook:
        if not sae.cfg.metadata.hf_hook_name:
            sae.cfg.metadata.hf_hook_name = hook
        sae.cfg.metadata.hook_name = mapped


def _set_layer(sae: SAE, layer: int) -> None:
    hook = sae.cfg.metadata.hook_name
    m = _HOOK_RE.match(hook) if hook else None
    sae.cfg.metadata.hook_name = f"blocks.{layer}.{m.group(2)}" if m else f"blocks.{layer}.hook_resid_post"


class SAESite(NamedTuple):
    """Where an SAE plugs into a model: the decoder layer whose output it reads."""

    layer: int
    hook_name: str  # TransformerLens name, e.g. blocks.17.hook_resid_post
    module_path: str  # the decoder layer in the Hugging Face model, e.g. model.language_model.layers.17


def check_sae(model: Model, sae: SAE, layer: int | None = None) -> SAESite:
    """Map the SAE's hook (``blocks.L.hook_resid_post``) onto ``model``'s decoder layer; clear error on mismatch."""
    if layer is not None:
        layer = layer_arg(layer, n_layers=model.n_layers, model=f"'{model.name}'")
    hook = _block_hook(sae.cfg.metadata.hook_name)
    m = _HOOK_RE.match(hook) if hook else None
    if hook and not m:
        raise InterpError(f"SAE hook {hook!r} is neither a TransformerLens block hook (blocks.<L>.hook_resid_post) "
                          "nor a decoder-layer module path (model.language_model.layers.<L>, model.layers.<L>)")
    if m and m.group(2) != "hook_resid_post":
        raise InterpError(f"the SAE reads {hook!r}; the workbench splices residual-stream SAEs "
                          f"(blocks.<L>.hook_resid_post, Gemma Scope's resid_post folders)")
    if m is None and layer is None:
        raise InterpError("the SAE does not say which layer it reads (cfg.metadata.hook_name is empty); "
                          "pass layer=<L>")
    sae_layer = int(m.group(1)) if m else None
    if layer is not None and sae_layer is not None and int(layer) != sae_layer:
        raise InterpError(f"the SAE reads {hook} (layer {sae_layer}) but layer={layer} was asked for; pass "
                          f"layer={sae_layer} or load the SAE trained for layer {layer}")
    want = sae_layer if layer is None else int(layer)
    if int(sae.cfg.d_in) != model.d_model:
        where = f"layer {want} of '{model.name}'" if 0 <= want < model.n_layers else f"'{model.name}'"
        raise InterpError(f"SAE d_in={sae.cfg.d_in} but {where} has d_model={model.d_model}: the SAE was "
                          "trained on another model")
    use = model.check_layers([want])[0]
    if getattr(sae.cfg, "reshape_activations", "none") != "none":
        raise InterpError(f"the SAE reshapes its input ({sae.cfg.reshape_activations}); residual SAEs do not")
    return SAESite(use, f"blocks.{use}.hook_resid_post", f"{model.layers_path}.{use}")


# ---- training -----------------------------------------------------------------------------------
def _row_batches(rows: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless shuffled batches of exactly ``batch_size`` rows (sae-lens counts samples per batch)."""
    gen = torch.Generator().manual_seed(seed)
    n = rows.shape[0]
    while True:
        perm = torch.randperm(n, generator=gen).to(rows.device)
        for i in range(0, n - batch_size + 1, batch_size):
            yield rows[perm[i:i + batch_size]]


def train_sae(activations: Activations | Tensor, *, layer: int | None = None, d_sae: int,
              architecture: Literal["jumprelu", "topk"] = "jumprelu", k: int | None = None,
              l0_coefficient: float | None = None,
              sparsity_loss: Literal["tanh", "step", "quadratic"] = "tanh", target_l0: float | None = None,
              lr: float = 1e-3, steps: int | None = None, epochs: float | None = None, batch_size: int = 256,
              seed: int = 0, device: Any = None, model_name: str | None = None,
              stream: bool | None = None, shards_in_memory: int = 4, progress: bool = True) -> SAE:
    """Train a JumpReLU or TopK SAE with sae-lens' own trainer on cached activations (``[n, d_model]`` rows).

    Inputs are scaled to mean norm sqrt(d_in) during training (sae-lens' ``expected_average_only_in``)
    and the scale is folded into the weights, so the returned SAE reads raw activations. JumpReLU uses
    sae-lens' ``tanh`` sparsity loss by default: the ``step`` (L0) loss barely moves the thresholds in
    the few hundred steps a CPU run affords. Default: 1000 steps. Seeded; bitwise repeatable on CPU.

    ``stream``: None (default) streams iff ``activations`` is a lazy capture (``capture(..., lazy=True)``,
    larger than host memory): one pass over its shards gives the row count, the exact input scale and the
    data mean, then the trainer reads shuffled batches from ``activations.batches`` a few shards at a time.
    ``True`` streams an in-memory `Activations` the same way; ``False`` materialises the rows.
    ``shards_in_memory``: shards mixed in one shuffle buffer while streaming; each batch draws from that many
    shards only, so with few large shards more of them train closer to a global shuffle (and hold more memory).
    """
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    streamed = _wants_stream(activations, stream)
    if streamed:  # nothing is read yet: the cheap checks below come before a pass over the shards
        layer, exclude = _training_layer(activations, layer)
        rows, d_in = None, int(activations.d_model)
    else:
        rows, layer, exclude = _training_rows(activations, layer)
        d_in = rows.shape[1]
    model_name = model_name or (activations.model_name if isinstance(activations, Activations) else None)
    if d_sae < 1 or batch_size < 1 or lr <= 0:
        raise InterpError(f"d_sae={d_sae}, batch_size={batch_size}, lr={lr}: all must be positive")
    if steps is not None and epochs is not None:
        raise InterpError("pass steps= or epochs=, not both")
    if steps is not None and int(steps) < 1:
        raise InterpError(f"steps={steps}: train for at least one step")
    dev = _default_device(device)

    metadata = SAEMetadata(model_name=model_name, hook_name=f"blocks.{layer}.hook_resid_post",
                           hook_head_index=None, prepend_bos=True, exclude_special_tokens=exclude)
    common = dict(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu",
                  normalize_activations="expected_average_only_in", metadata=metadata)
    if architecture == "jumprelu":
        if k is not None:
            raise InterpError("k= is for architecture='topk'; JumpReLU sparsity is set by l0_coefficient")
        if sparsity_loss not in ("tanh", "step", "quadratic"):
            raise InterpError(f"sparsity_loss={sparsity_loss!r}: use 'tanh', 'step' or 'quadratic'")
        if (sparsity_loss == "quadratic") != (target_l0 is not None):
            raise InterpError("target_l0= goes with sparsity_loss='quadratic' (Gemma Scope 2's loss), and only there")
        default_coef = {"tanh": 0.1, "step": 1.0, "quadratic": 1.0}[sparsity_loss]
        coef = default_coef if l0_coefficient is None else l0_coefficient
        cfg = JumpReLUTrainingSAEConfig(**common, l0_coefficient=coef, jumprelu_sparsity_loss_mode=sparsity_loss,
                                        target_l0=target_l0)
        make = JumpReLUTrainingSAE
    elif architecture == "topk":
        if l0_coefficient is not None or target_l0 is not None:
            raise InterpError("a TopK SAE's sparsity is k=; l0_coefficient/target_l0 are for JumpReLU")
        k = min(32, d_sae) if k is None else int(k)
        if not 1 <= k <= d_sae:
            raise InterpError(f"k={k} must be between 1 and d_sae={d_sae}")
        cfg = TopKTrainingSAEConfig(**common, k=k)
        make = TopKTrainingSAE
    else:
        raise InterpError(f"architecture={architecture!r}: use 'jumprelu' or 'topk'")

    # Exact (not sampled) input scale; b_dec starts at the data mean so the encoder sees centred inputs
    # (Gemma's residual stream has a mean far larger than its spread).
    if streamed:
        n, norm_sum, x_sum = _streamed_moments(activations, layer, dev, progress=progress)
        data = None
    else:
        data = rows.to(dev, torch.float32)
        n = data.shape[0]
    if n < 16:
        raise InterpError(f"only {n} activation rows: capture more prompts (positions='all') to train an SAE")
    batch_size = min(batch_size, n)
    if epochs is not None:
        steps = math.ceil(epochs * n / batch_size)
    steps = 1000 if steps is None else int(steps)
    if steps < 1:
        raise InterpError(f"steps={steps}: train for at least one step")
    if streamed:
        scale = math.sqrt(d_in) / (norm_sum / n)
        mean = x_sum / n
        source = activations.batches(layer, batch_size, shuffle=True, seed=seed, repeat=True,
                                     shards_in_memory=shards_in_memory)
        provider = (batch.to(dev, torch.float32) for batch in source)  # [batch_size, d_in] each
    else:
        source = None
        scale = math.sqrt(d_in) / float(data.norm(dim=-1).double().mean())
        mean = data.sum(0, dtype=torch.float64) / n
        provider = _row_batches(data, batch_size, seed)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        training_sae = make(cfg)
    with torch.no_grad():
        training_sae.b_dec.copy_((mean * scale).float().cpu())
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size, train_batch_size_samples=batch_size, lr=lr, lr_end=lr,
        lr_scheduler_name="constant", lr_decay_steps=steps // 5, device=dev,
        logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg=trainer_cfg, sae=training_sae, data_provider=provider)
    trainer.activation_scaler.scaling_factor = scale
    # SAETrainer.fit() with its public seams (step, maybe_reset_sparsity, set_final_sae_metadata), so the
    # progress bar follows `progress=`.
    trainer.sae.to(dev)
    bar = tqdm(total=steps, desc=f"train SAE {architecture} d_sae={d_sae} L{layer}", unit="step",
               disable=not progress, leave=False)
    last: dict[str, float] = {}
    try:
        while trainer.n_training_samples < trainer_cfg.total_training_samples:
            trainer.maybe_reset_sparsity()
            out = trainer.step(next(trainer.data_provider))
            trainer.n_training_steps += 1
            if trainer.n_training_steps % 50 == 0 or trainer.n_training_steps == steps:
                last = {name: float(v.detach()) for name, v in out.losses.items()}
                bar.set_postfix({k_: f"{v:.3g}" for k_, v in last.items()})
            bar.update(1)
    finally:
        bar.close()
        if source is not None:
            source.close()  # stops the shard reader of a lazy capture now, not when collected
    trainer.sae.fold_activation_norm_scaling_factor(scale)
    trainer.activation_scaler.scaling_factor = None
    trainer.set_final_sae_metadata()

    inference_cfg = training_sae.cfg.get_inference_sae_cfg_dict()
    inference_cfg["device"] = dev
    inference_cfg["metadata"].update(interp_training={
        "rows": n, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
        "sparsity_loss": sparsity_loss if architecture == "jumprelu" else None,
        "l0_coefficient": getattr(cfg, "l0_coefficient", None), "k": getattr(cfg, "k", None),
        "final_losses": last, "input_scale": scale, "streamed": streamed,
        "shards_in_memory": shards_in_memory if streamed else None,
        "activations_path": str(activations.path) if streamed and activations.path else None})
    sae = SAE.from_dict(inference_cfg)
    state = training_sae.state_dict()
    training_sae.process_state_dict_for_saving_inference(state)
    sae.process_state_dict_for_loading(state)
    sae.load_state_dict({k_: v.float() for k_, v in state.items()})
    return sae.to(dev).eval()


def _wants_stream(activations: Any, stream: bool | None) -> bool:
    """Whether `train_sae` reads ``activations`` through ``.batches`` (shards streamed) or as one tensor."""
    lazy = bool(getattr(activations, "lazy", False))
    if stream is None:
        return lazy
    if not isinstance(stream, bool):
        raise InterpError(f"stream={stream!r}: pass True, False or None (None streams a lazy capture only)")
    if stream and not isinstance(activations, Activations):
        raise InterpError(f"stream=True needs an interp.Activations (its .batches streams shards); got a "
                          f"{type(activations).__name__}, which is already in memory: leave stream=None")
    return stream


def _training_layer(activations: Activations | Tensor, layer: int | None) -> tuple[int, bool]:
    """The layer to train on (checked; picked when the capture holds one) and whether special tokens were left out."""
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0):
        raise InterpError(f"layer={layer!r}: pass the decoder layer the activations come from as a whole number "
                          ">= 0 (the SAE records it as blocks.<layer>.hook_resid_post)")
    if isinstance(activations, Activations):
        layers = activations.layers
        if layer is None:
            if len(layers) != 1:
                raise InterpError(f"the activations hold layers {layers}: pass layer= to pick one")
            layer = layers[0]
        if int(layer) not in layers:
            raise InterpError(f"layer {layer} was not captured; captured layers are {layers}")
        return int(layer), "special" in activations.meta.get("exclude", [])
    if isinstance(activations, Tensor):
        if layer is None:
            raise InterpError("pass layer=<L> with a bare tensor: the SAE records blocks.<L>.hook_resid_post")
        return int(layer), False
    raise InterpError(f"activations must be interp.Activations or a [n, d_model] tensor, got "
                      f"{type(activations).__name__}")


def _nonfinite_error(layer: int) -> InterpError:
    return InterpError(f"the layer-{layer} activations contain NaN or inf; recapture them (a float16 "
                       "overflow is the usual cause: use float32 or bfloat16)")


def _training_rows(activations: Activations | Tensor, layer: int | None) -> tuple[Tensor, int, bool]:
    layer, exclude = _training_layer(activations, layer)
    rows = activations[layer] if isinstance(activations, Activations) else activations
    if rows.ndim != 2:
        raise InterpError(f"activations have shape {tuple(rows.shape)}; expected [n_rows, d_model]")
    if not torch.isfinite(rows).all():
        raise _nonfinite_error(layer)
    return rows, layer, exclude


@torch.no_grad()
def _streamed_moments(activations: Activations, layer: int, device: Any, *,
                      progress: bool = False) -> tuple[int, float, Tensor]:
    """One pass over the shards of ``layer``: (rows, summed row norms, summed rows ``[d_in]`` float64), computed
    in float32 on ``device`` as the in-memory path does, then summed in float64; one shard in memory at a time."""
    n, d_in = 0, int(activations.d_model)
    norm_sum = torch.zeros((), dtype=torch.float64, device=device)
    x_sum = torch.zeros(d_in, dtype=torch.float64, device=device)
    shards = tqdm(activations.chunks([layer]), desc=f"scan L{layer} shards (scale, mean)", unit="shard",
                  disable=not progress, leave=False)
    for chunk in shards:
        rows = chunk.acts[layer]  # [rows, d_model]
        if rows.ndim != 2 or rows.shape[1] != d_in:
            raise InterpError(f"a shard of the layer-{layer} activations has shape {tuple(rows.shape)}; expected "
                              f"[n_rows, {d_in}]: recapture them")
        if rows.shape[0] == 0:
            continue
        if not torch.isfinite(rows).all():
            raise _nonfinite_error(layer)
        x = rows.to(device, torch.float32)
        norm_sum += x.norm(dim=-1).double().sum()
        x_sum += x.sum(0, dtype=torch.float64)
        n += x.shape[0]
    return n, float(norm_sum), x_sum


# ---- transfer report ----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Stats:
    """Per-prompt sufficient statistics of a reconstruction, in float64."""

    n: np.ndarray  # [n_prompts] tokens
    sum_x: np.ndarray  # [n_prompts, d_in]
    sq_norm: np.ndarray  # [n_prompts] sum ||x||^2
    sq_resid: np.ndarray  # [n_prompts] sum ||x - x_hat||^2
    cos: float  # summed cosine(x, x_hat) over tokens
    l0_sum: float  # summed active-feature counts over tokens
    fired: np.ndarray  # [d_sae] bool: fired at least once
    cos_prompt: np.ndarray | None = None  # [n_prompts] summed cosine per prompt
    l0_prompt: np.ndarray | None = None  # [n_prompts] summed active-feature counts per prompt
    fired_prompt: Tensor | None = None  # [n_prompts, d_sae] bool: fired on this prompt (on the SAE's device)


def _r2(n: np.ndarray, sum_x: np.ndarray, sq_norm: np.ndarray, sq_resid: np.ndarray) -> np.ndarray:
    """The R^2 formula on (stacked) sufficient statistics; NaN where the variance is zero."""
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_x = sum_x / n[..., None]
        var = sq_norm / n - np.einsum("...d,...d->...", mean_x, mean_x)
        out = 1.0 - (sq_resid / n) / var
    return np.where((n > 0) & (var > 0), out, np.nan)


def _recon_stats(sae: SAE, rows: Tensor, prompt_index: Tensor, n_prompts: int, *,
                 chunk: int = 4096, what: str = "") -> _Stats:
    """Stream ``rows`` through the SAE and accumulate per-prompt statistics in float64 on the SAE's device."""
    parts = ((rows[s:s + chunk], prompt_index[s:s + chunk]) for s in range(0, rows.shape[0], chunk))
    return _accumulate_recon(sae, parts, n_prompts, rows.shape[1], what=what)


def _recon_stats_streamed(sae: SAE, acts: Activations, layer: int, n_prompts: int, *, chunk: int = 4096,
                          what: str = "") -> _Stats:
    """`_recon_stats` over a capture's shards (``acts.chunks``): one shard in memory at a time, never all rows."""
    def parts() -> Iterator[tuple[Tensor, Tensor]]:
        for part in acts.chunks([layer]):
            rows = part.acts[layer]  # [rows, d_model]
            for s in range(0, rows.shape[0], chunk):
                yield rows[s:s + chunk], part.prompt_index[s:s + chunk]

    return _accumulate_recon(sae, parts(), n_prompts, int(acts.d_model), what=what)


@torch.no_grad()
def _accumulate_recon(sae: SAE, parts: Iterable[tuple[Tensor, Tensor]], n_prompts: int, d_in: int, *,
                      what: str = "") -> _Stats:
    """Per-prompt sums over ``(rows [r, d_in], prompt index [r])`` parts, in float64 on the SAE's device."""
    dev = sae.W_dec.device
    n = torch.zeros(n_prompts, dtype=torch.float64, device=dev)
    sum_x = torch.zeros(n_prompts, d_in, dtype=torch.float64, device=dev)
    sq_norm = torch.zeros_like(n)
    sq_resid = torch.zeros_like(n)
    cos = torch.zeros_like(n)
    l0 = torch.zeros_like(n)
    fired = torch.zeros(n_prompts, sae.cfg.d_sae, dtype=torch.bool, device=dev)
    for rows, index in parts:
        if rows.shape[0] == 0:
            continue
        x = rows.to(dev)
        idx = index.to(dev)
        if not torch.isfinite(x).all():
            bad = int(idx[~torch.isfinite(x).all(-1)][0])
            raise InterpError(f"{what}activations of prompt {bad} contain NaN or inf: the model's forward pass "
                              "overflowed (float16?); load the model in float32 or bfloat16")
        feats = sae.encode(x.to(sae.W_dec.dtype))
        x_hat = sae.decode(feats)
        if not torch.isfinite(x_hat).all():
            raise InterpError(f"{what}the SAE's reconstruction contains NaN or inf: check the SAE's weights")
        xd, x_hat_d = x.double(), x_hat.double()
        n.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
        sum_x.index_add_(0, idx, xd)
        sq_norm.index_add_(0, idx, xd.pow(2).sum(-1))
        sq_resid.index_add_(0, idx, (xd - x_hat_d).pow(2).sum(-1))
        cos.index_add_(0, idx, torch.nn.functional.cosine_similarity(xd, x_hat_d, dim=-1))
        active = feats != 0
        l0.index_add_(0, idx, active.sum(-1).double())
        for i in torch.unique(idx).tolist():  # rows come grouped by prompt: a few prompts per chunk
            fired[i] |= active[idx == i].any(0)
    cos_p, l0_p = cos.cpu().numpy(), l0.cpu().numpy()
    return _Stats(n.cpu().numpy(), sum_x.cpu().numpy(), sq_norm.cpu().numpy(), sq_resid.cpu().numpy(),
                  float(cos_p.sum()), float(l0_p.sum()), fired.any(0).cpu().numpy(), cos_p, l0_p, fired)


def _boot_counts(k: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, k]`` multiplicities of a prompt bootstrap (resampling ``k`` prompts with replacement)."""
    return np.random.default_rng(seed).multinomial(k, np.full(k, 1.0 / k), size=n_boot).astype(np.float64)


def _bootstrap(stats: _Stats, n_boot: int, seed: int) -> np.ndarray:
    """Pooled R^2 of ``n_boot`` resamples of the prompts (with replacement)."""
    keep = stats.n > 0
    n, sum_x = stats.n[keep], stats.sum_x[keep]
    counts = _boot_counts(len(n), n_boot, seed)
    tokens = counts @ n
    # ||sum of the resampled sum_x||^2 through the prompts' Gram matrix: [n_boot, k] work instead of d_in
    sq_mean = np.einsum("bi,ij,bj->b", counts, sum_x @ sum_x.T, counts) / tokens**2
    with np.errstate(divide="ignore", invalid="ignore"):
        var = counts @ stats.sq_norm[keep] / tokens - sq_mean
        out = 1.0 - (counts @ stats.sq_resid[keep] / tokens) / var
    return np.where(var > 0, out, np.nan)


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (float(lo), float(hi))


def _bootstrap_others(stats: _Stats, losses: dict[str, np.ndarray] | None, n_boot: int, seed: int,
                      alpha: float) -> dict[str, tuple[float, float]]:
    """Percentile intervals of L0, dead fraction, cosine, CE score and KL over the same prompt resamples as R^2."""
    keep = stats.n > 0
    counts = _boot_counts(int(keep.sum()), n_boot, seed)
    tokens = counts @ stats.n[keep]
    out = {"l0": _percentile_ci(counts @ stats.l0_prompt[keep] / tokens, alpha),
           "cosine": _percentile_ci(counts @ stats.cos_prompt[keep] / tokens, alpha)}
    fired = stats.fired_prompt[torch.as_tensor(keep, device=stats.fired_prompt.device)].float()  # [k, d_sae]
    picked = torch.as_tensor(counts > 0, dtype=torch.float32, device=fired.device)  # [n_boot, k]
    alive = torch.zeros(n_boot, dtype=torch.float64, device=fired.device)
    for s in range(0, fired.shape[1], 65536):  # bounded memory: [n_boot, 65536] at a time
        alive += ((picked @ fired[:, s:s + 65536]) > 0).sum(1).double()
    out["dead_fraction"] = _percentile_ci(1.0 - alive.cpu().numpy() / fired.shape[1], alpha)
    if losses is not None:
        sums = {k: counts @ v[keep] for k, v in losses.items()}
        with np.errstate(divide="ignore", invalid="ignore"):
            out["ce_score"] = _percentile_ci((sums["ce_zero"] - sums["ce_sae"]) / (sums["ce_zero"] - sums["ce_orig"]),
                                             alpha)
            out["kl"] = _percentile_ci(sums["kl_sae"] / sums["tokens"], alpha)
    return out


def _replace_output(out: Any, resid: Tensor) -> Any:
    return (resid, *out[1:]) if isinstance(out, tuple) else resid


def _scored_mask(model: Model, batch: Any, tokens: str, exclude: Sequence[str]) -> tuple[Tensor, Tensor]:
    """(positions scored ``[batch, pos]``, positions whose next-token prediction is scored): with
    ``tokens="text"`` the corpus text only, predicting corpus text; with ``"all"`` every kept token, predicting
    whatever comes next."""
    if tokens == "text":
        sel = position_mask(model, batch, "question", ())
        nxt = torch.zeros_like(sel)
        nxt[:, :-1] = sel[:, 1:]
        return sel, sel & nxt
    sel = position_mask(model, batch, "all", exclude)
    pos = torch.arange(sel.shape[1])
    return sel, sel & (pos[None, :] + 1 < batch.lengths[:, None])


@torch.no_grad()
def _splice_losses(model: Model, sae: SAE, layer: int, items: list[Prompt], exclude: Sequence[str],
                   batch_size: int, bar: tqdm, tokens: str = "all") -> dict[str, np.ndarray]:
    """Per-prompt summed next-token CE (original, SAE-spliced, zero-ablated), KL(original || spliced / ablated)
    and prediction counts, each ``[n_prompts]`` float64.

    The SAE's reconstruction (or zeros) replaces layer ``layer``'s output at the scored positions; losses
    are taken at the scored prediction positions (`_scored_mask`), sae-lens' convention with ignored tokens.
    """
    keys = ("ce_orig", "ce_sae", "ce_zero", "kl_sae", "kl_zero", "tokens")
    acc = torch.zeros(len(items), len(keys), dtype=torch.float64, device=model.device)  # on device: no syncs
    order = sorted(range(len(items)), key=lambda i: len(items[i].question) + len(items[i].context or ""))
    mode: dict[str, Any] = {"kind": None, "sel": None}

    def hook(_module, _inputs, output):
        if mode["kind"] is None:
            return None
        resid = layer_output(output)  # [batch, pos, d_model]
        sel = mode["sel"]
        new = resid.clone()
        if mode["kind"] == "zero":
            new[sel] = 0
        else:
            x = resid[sel]
            new[sel] = sae.decode(sae.encode(x.to(sae.W_dec.device, sae.W_dec.dtype))).to(resid.device, resid.dtype)
        return _replace_output(output, new)

    handle = model.layers[layer].register_forward_hook(hook)
    try:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            batch = model.encode([items[i] for i in idx])
            sel, pred = _scored_mask(model, batch, tokens, exclude)
            if pred.any():
                ids = batch.input_ids
                target = ids[:, 1:][pred[:, :-1].to(ids.device)]
                owner = torch.tensor(idx)[:, None].expand_as(pred)[pred].to(model.device)  # prompt of each row
                mode.update(kind=None, sel=sel.to(model.device))
                logits = {"orig": _pred_logits(model, batch, pred)}  # [n_pred, vocab] each
                for kind in ("sae", "zero"):
                    mode["kind"] = kind
                    logits[kind] = _pred_logits(model, batch, pred)
                acc[:, 5].index_add_(0, owner, torch.ones_like(owner, dtype=torch.float64))
                for c in range(0, len(target), 256):  # bounded memory: rows x 262k vocab in float32
                    tgt, who = target[c:c + 256, None], owner[c:c + 256]
                    logp = torch.log_softmax(logits["orig"][c:c + 256].float(), dim=-1)
                    acc[:, 0].index_add_(0, who, -logp.gather(1, tgt)[:, 0].double())
                    for j, kind in ((1, "sae"), (2, "zero")):
                        logq = torch.log_softmax(logits[kind][c:c + 256].float(), dim=-1)
                        acc[:, j].index_add_(0, who, -logq.gather(1, tgt)[:, 0].double())
                        kl = torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="none")
                        acc[:, j + 2].index_add_(0, who, kl.sum(-1).double())
                del logits
            bar.update(len(idx))
    finally:
        handle.remove()
    per = acc.cpu().numpy()
    return {k: per[:, j] for j, k in enumerate(keys)}


def _pred_logits(model: Model, batch: Any, pred: Tensor) -> Tensor:
    """Logits ``[n_pred, vocab]`` at the prediction positions (Gemma's soft-capping already applied)."""
    logits = model.hf(**batch.inputs, use_cache=False).logits  # [batch, pos, vocab]
    return logits[pred.to(logits.device)]


ESTIMANDS = {
    "r2": (f"pooled R^2 = {R2_FORMULA} over all scored tokens of the corpus: 1 - SSE/SST with SST around the "
           "per-dimension corpus mean (sae-lens' explained variance), float64"),
    "r2_prompt_mean": ("mean over prompts of each prompt's own R^2 (the same formula on that prompt's tokens, SST "
                       "around the prompt's own mean; prompts with >= 2 tokens): a different estimand, usually lower"),
    "l0": "mean number of active SAE features per scored token (features/token)",
    "dead_fraction": "fraction of the d_sae features that fire on no scored token of the corpus",
    "cosine": "mean cosine similarity of x and x_hat per scored token (unitless)",
    "ce_score": ("(CE_zero - CE_sae) / (CE_zero - CE_orig), CE = summed next-token cross-entropy at the scored "
                 "prediction positions; 1 = splicing the SAE in loses nothing, 0 = as bad as zeroing the layer"),
    "kl": "mean KL(original || SAE spliced) of the next-token distribution, nats per predicted token",
    "kl_zero": "mean KL(original || layer output zeroed at the scored positions), nats per predicted token",
    "ce_orig": "mean next-token cross-entropy, model untouched, nats per predicted token",
}


@dataclass(frozen=True)
class CorpusTransfer(Result):
    """How well the SAE reconstructs one corpus's activations, and what splicing it in costs the model.

    Every interval is 95% (1 - alpha): the percentile bootstrap over prompts (the same resamples for every
    quantity) except ``r2_prompt_mean_ci`` (Student t over prompts). Definitions in ``ESTIMANDS``.
    """

    name: str
    n_prompts: int
    n_tokens: int  # activation rows scored (see the report's token_mask)
    r2: float  # pooled over tokens: 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2), float64
    r2_ci: tuple[float, float]  # 95% percentile bootstrap over prompts
    r2_prompt_mean: float  # mean of the per-prompt R^2 (prompts with >= 2 tokens)
    r2_prompt: tuple[float, ...]  # the same formula on each prompt's own tokens (NaN if < 2 tokens)
    p_bootstrap: float  # one-sided: share of bootstrap pooled R^2 <= threshold, (1 + #) / (1 + n_boot)
    p_ttest: float  # one-sided t-test that the mean per-prompt R^2 > threshold
    threshold: float
    alpha: float
    l0: float  # mean active features per scored token
    dead_fraction: float  # features that never fire on this corpus
    cosine: float  # mean cosine similarity of x and x_hat
    ce_orig: float = math.nan  # mean next-token CE at the scored prediction positions, model untouched (nats)
    ce_sae: float = math.nan  # ... with the SAE's reconstruction spliced in
    ce_zero: float = math.nan  # ... with the layer output zeroed at the same positions
    ce_score: float = math.nan  # (ce_zero - ce_sae) / (ce_zero - ce_orig); 1 = no loss from the SAE
    kl: float = math.nan  # mean KL(original || spliced) per predicted token, nats
    kl_zero: float = math.nan  # mean KL(original || zero-ablated)
    n_predicted: int = 0  # next-token predictions the CE/KL average over
    r2_prompt_mean_ci: tuple[float, float] = (math.nan, math.nan)  # Student t 95% over prompts
    l0_ci: tuple[float, float] = (math.nan, math.nan)
    dead_fraction_ci: tuple[float, float] = (math.nan, math.nan)
    cosine_ci: tuple[float, float] = (math.nan, math.nan)
    ce_score_ci: tuple[float, float] = (math.nan, math.nan)
    kl_ci: tuple[float, float] = (math.nan, math.nan)
    n_template_tokens: int = 0  # non-special tokens left out because they belong to the prompt template
    n_boot: int = 0

    @property
    def passed_pooled(self) -> bool:
        """The lower end of the pooled R^2's 95% bootstrap interval is above the threshold."""
        return bool(math.isfinite(self.r2_ci[0]) and self.r2_ci[0] > self.threshold)

    @property
    def passed_prompt_mean(self) -> bool:
        """The lower end of the mean per-prompt R^2's 95% t interval is above the threshold."""
        lo = self.r2_prompt_mean_ci[0]
        return bool(math.isfinite(lo) and lo > self.threshold)

    @property
    def passed(self) -> bool:
        """Both estimands clear the threshold with their 95% lower bounds (each a one-sided test at alpha/2)."""
        return self.passed_pooled and self.passed_prompt_mean

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "passed": self.passed, "passed_pooled": self.passed_pooled,
                "passed_prompt_mean": self.passed_prompt_mean}

    def __repr__(self) -> str:
        return (f"CorpusTransfer({self.name!r}: pooled R^2={self.r2:.4f} [{self.r2_ci[0]:.4f}, {self.r2_ci[1]:.4f}], "
                f"mean per-prompt R^2 {self.r2_prompt_mean:.4f} [{self.r2_prompt_mean_ci[0]:.4f}, "
                f"{self.r2_prompt_mean_ci[1]:.4f}], n={self.n_prompts} prompts / {self.n_tokens} tokens, "
                f"L0={self.l0:.1f} features/token, dead={self.dead_fraction:.1%}, CE score={self.ce_score:.3f}, "
                f"KL={self.kl:.4f} nats/token, {'PASS' if self.passed else 'FAIL'})")


def _fmt_p(p: float, n_boot: int | None = None) -> str:
    """A p-value for print; a bootstrap p at its floor 1/(B+1) says so instead of claiming more precision."""
    if not math.isfinite(p):
        return "n/a"
    if n_boot is not None and p <= 1.0 / (n_boot + 1) + 1e-12:
        return f"<= 1/{n_boot + 1} (floor)"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _fmt_ci(ci: tuple[float, float], fmt: str) -> str:
    return f"[{format(ci[0], fmt)}, {format(ci[1], fmt)}]" if all(map(math.isfinite, ci)) else "[n/a]"


@dataclass(frozen=True)
class TransferReport(Result):
    """Per-corpus reconstruction quality of an SAE on a model's activations; ``.passed`` is the verdict."""

    model: str
    sae: str
    layer: int
    hook_name: str
    module_path: str
    threshold: float
    alpha: float
    corpora: tuple[CorpusTransfer, ...]
    r2_formula: str = R2_NAME
    token_mask: str = ""
    test: str = ""
    n_boot: int = 1000
    seed: int = 0
    tokens: str = "text"  # "text": corpus text only; "all": every non-special token, template included
    estimands: dict[str, str] = field(default_factory=lambda: dict(ESTIMANDS))
    tests: dict[str, str] = field(default_factory=dict)  # the test or interval behind each reported number

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.corpora)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.corpora]

    def __getitem__(self, name: str) -> CorpusTransfer:
        for c in self.corpora:
            if c.name == name:
                return c
        raise KeyError(f"no corpus {name!r}; the report has {self.names}")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "passed": self.passed}

    def table(self) -> Any:
        """One row per corpus as a pandas DataFrame (per-prompt values left out)."""
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in c.to_dict().items() if k != "r2_prompt"} for c in self.corpora])

    def figure(self) -> Any:
        """Per-prompt R^2 by corpus (box + points), pooled R^2 with its 95% CI, and the threshold line."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for c in self.corpora:
            vals = [v for v in c.r2_prompt if math.isfinite(v)]
            fig.add_trace(go.Box(y=vals, name=c.name, boxpoints="all", jitter=0.4, pointpos=0,
                                 marker=dict(size=4, opacity=0.6), line=dict(width=1),
                                 hovertemplate="per-prompt R^2 %{y:.4f}<extra>" + c.name + "</extra>",
                                 showlegend=False))
        fig.add_trace(go.Scatter(
            x=self.names, y=[c.r2 for c in self.corpora], mode="markers", name="pooled R^2 (95% CI)",
            marker=dict(symbol="diamond", size=12, color="black"),
            error_y=dict(type="data", symmetric=False, array=[c.r2_ci[1] - c.r2 for c in self.corpora],
                         arrayminus=[c.r2 - c.r2_ci[0] for c in self.corpora])))
        fig.add_hline(y=self.threshold, line_dash="dash", line_color="firebrick",
                      annotation_text=f"threshold {self.threshold:g}", annotation_position="bottom right")
        import textwrap

        verdict = "passed" if self.passed else "did not pass"
        # the subtitle wrapped to the figure's width: SAE, formula and token mask each on their own lines
        sub = "<br>".join(line for part in (f"SAE: {self.sae}", f"R^2 = {R2_FORMULA}", self.token_mask) if part
                          for line in textwrap.wrap(str(part), 110))
        n_lines = sub.count("<br>") + 1
        fig.update_layout(
            title=dict(text=f"SAE transfer to '{self.model}' at {self.hook_name}: {verdict}",
                       subtitle=dict(text=sub, font=dict(size=12)), yref="container", y=1, yanchor="top",
                       pad=dict(t=14)),
            margin=dict(t=80 + 16 * n_lines), height=500 + 16 * n_lines, width=900,
            yaxis_title="R^2 (explained variance)", xaxis_title="corpus", template="plotly_white",
            legend=dict(orientation="h", y=-0.18))
        return fig

    def __repr__(self) -> str:
        n_pass = sum(c.passed for c in self.corpora)
        level = f"{1 - self.alpha:.0%}"
        head = (f"TransferReport: {self.sae}\n  on '{self.model}' layer {self.layer} ({self.module_path}) - "
                f"{'PASSED' if self.passed else 'NOT PASSED'} ({n_pass}/{len(self.corpora)} corpora whose {level} "
                f"lower bounds of pooled and of mean per-prompt R^2 are both > {self.threshold:g})\n"
                f"  pooled R^2 = {R2_FORMULA} over all scored tokens (SST around the per-dimension mean; sae-lens' "
                f"explained variance, float64); per-prompt: the same formula within each prompt, then averaged\n"
                f"  tokens: {self.token_mask}\n  tests: {self.test}\n"
                f"  intervals: {level}, percentile bootstrap over prompts ({self.n_boot} resamples, seed {self.seed}) "
                f"except per-prompt mean (Student t); units: L0 features/token, CE and KL nats per predicted token\n")
        cols = ("corpus", "prompts", "tokens", "template", "pooled R^2", f"{level} CI", "p(boot)", "per-prompt R^2",
                f"{level} CI", "p(t)", "L0 [CI]", "dead [CI]", "CE score [CI]", "KL [CI]", "")
        rows = [cols]
        for c in self.corpora:
            rows.append((c.name, str(c.n_prompts), str(c.n_tokens), str(c.n_template_tokens), f"{c.r2:.4f}",
                         _fmt_ci(c.r2_ci, ".4f"), _fmt_p(c.p_bootstrap, self.n_boot), f"{c.r2_prompt_mean:.4f}",
                         _fmt_ci(c.r2_prompt_mean_ci, ".4f"), _fmt_p(c.p_ttest),
                         f"{c.l0:.1f} {_fmt_ci(c.l0_ci, '.1f')}",
                         f"{c.dead_fraction:.1%} {_fmt_ci(c.dead_fraction_ci, '.1%')}",
                         f"{c.ce_score:.3f} {_fmt_ci(c.ce_score_ci, '.3f')}", f"{c.kl:.4f} {_fmt_ci(c.kl_ci, '.4f')}",
                         "pass" if c.passed else "FAIL"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        lines = ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        return head + "\n".join(lines)


def _template_counts(model: Model, items: list[Prompt], batch_size: int) -> tuple[int, int]:
    """(corpus-text tokens, all non-special non-image tokens) of the formatted prompts: tokenisation only."""
    text = total = 0
    for b in range(0, len(items), max(batch_size, 32)):
        batch = model.encode(items[b:b + max(batch_size, 32)], device="cpu")
        real = ~batch.pad_mask.cpu() & ~batch.special_mask & ~batch.image_mask
        text += int(batch.question_mask.sum())
        total += int(real.sum())
    return text, total


def _capture_streaming(**kw: Any) -> dict[str, Any]:
    """The streaming options a caller set, for `capture` (unset ones keep capture's defaults)."""
    return {k: v for k, v in kw.items() if v is not None}


@exclusive
def transfer_report(model: Model, sae: SAE, corpora: Mapping[str, Sequence[Prompt | str]] | Sequence[Prompt | str],
                    *, layer: int | None = None, threshold: float = 0.95, alpha: float = 0.05,
                    tokens: Literal["text", "all"] = "text", exclude_special: bool = True, n_boot: int = 1000,
                    seed: int = 0, ce: bool = True, batch_size: int | None = None, cache: Any = None,
                    max_memory: int | str | None = None, lazy: bool | None = None, shard_size: int | None = None,
                    progress: bool = True) -> TransferReport:
    """Does ``sae`` reconstruct ``model``'s layer activations on each corpus? R^2, CI, tests, L0, CE and KL.

    ``corpora``: ``{"medical": [...], "general": [...]}`` (prompts or strings). ``layer`` defaults to the
    SAE's own. ``tokens="text"`` (default) scores the corpus text only: the prompt template the model wraps
    around it ("Question:", "Answer (yes or no):", chat turn text) and special tokens are left out, and
    CE/KL score text predicting text; ``tokens="all"`` scores every real token, template included (BOS and
    special tokens still excluded unless ``exclude_special=False``). A corpus passes when the 95% lower
    bounds of pooled and of mean per-prompt R^2 are above ``threshold``. ``ce=False`` skips the three full
    forward passes that the CE-loss score and KL need. ``cache``, ``max_memory``, ``lazy`` and ``shard_size`` are
    passed to `capture`: a lazy capture (one larger than ``max_memory``, or ``lazy=True``) is scored shard by
    shard, with the same numbers as in memory.
    """
    site = check_sae(model, sae, layer)
    if not 0 < threshold < 1 or not 0 < alpha < 1:
        raise InterpError(f"threshold={threshold} and alpha={alpha} must lie strictly between 0 and 1")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise InterpError(f"n_boot={n_boot!r}: use at least 1 bootstrap resample (1000 is the default)")
    if tokens not in ("text", "all"):
        raise InterpError(f"tokens={tokens!r}: use 'text' (the corpus text, template tokens left out) or 'all'")
    if isinstance(corpora, Mapping):
        named = dict(corpora)
    elif isinstance(corpora, Sequence) and not isinstance(corpora, str):
        named = {"corpus": corpora}
    else:
        raise InterpError(f"corpora must be a dict of name -> prompts, got {type(corpora).__name__}")
    if not named:
        raise InterpError("corpora is empty: pass e.g. {'medical': interp.prompts.medical()}")
    items_by_name: dict[str, list[Prompt]] = {}
    for name, prompts in named.items():
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise InterpError(f"corpus {name!r} must be a list of prompts, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise InterpError(f"corpus {name!r} is empty: give it at least two prompts")
        items_by_name[name] = [_as_prompt(p) for p in prompts]
    exclude = ("special", "image") if exclude_special or tokens == "text" else ()
    if batch_size is None:
        batch_size = 16 if model.device.type == "cuda" else 8
    sae.eval()
    streaming = _capture_streaming(max_memory=max_memory, lazy=lazy, shard_size=shard_size)

    results = []
    for name, items in items_by_name.items():
        positions = "question" if tokens == "text" else "all"
        acts = capture(model, items, layers=[site.layer], positions=positions,
                       exclude=exclude if positions == "all" else (), batch_size=batch_size, cache=cache,
                       progress=progress, **streaming)
        if len(acts) == 0:
            raise InterpError(f"corpus {name!r} has no tokens left after excluding special and template tokens")
        if getattr(acts, "lazy", False):
            stats = _recon_stats_streamed(sae, acts, site.layer, len(items), what=f"corpus {name!r}: ")
        else:
            stats = _recon_stats(sae, acts[site.layer], acts.prompt_index, len(items), what=f"corpus {name!r}: ")
        losses = None
        if ce:
            with tqdm(total=len(items), desc=f"splice SAE ({name})", unit="prompt", disable=not progress,
                      leave=False) as bar:
                losses = _splice_losses(model, sae, site.layer, items, exclude, batch_size, bar, tokens)
        n_text, n_total = _template_counts(model, items, batch_size)
        template = n_total - n_text if tokens == "text" else 0
        results.append(_corpus_result(name, stats, losses, threshold, alpha, n_boot, seed, n_template=template))

    if tokens == "text":
        mask = ("corpus text only: tokens overlapping each prompt's own text (as positions='question'); the prompt "
                "template around it ('Question:', 'Answer (yes or no):', chat turn text), BOS, special and image "
                "tokens excluded (tokens='text'); CE/KL at text tokens predicting the next text token; padding "
                "never counted")
    elif exclude_special:
        mask = ("all real tokens including the prompt template (tokens='all'); BOS, turn markers, other special "
                "tokens and image tokens excluded; padding never counted")
    else:
        mask = "all real tokens, template, BOS and special tokens included (tokens='all', exclude_special=False)"
    level = f"{1 - alpha:.0%}"
    test = (f"pooled R^2: {level} percentile bootstrap CI over prompts and one-sided bootstrap p = "
            f"(1 + #{{R^2* <= {threshold:g}}}) / (1 + {n_boot}) (floor 1/{n_boot + 1}); mean per-prompt R^2: "
            f"Student t {level} CI and one-sided one-sample t-test against {threshold:g}; a corpus passes when "
            f"the lower ends of both {level} intervals exceed {threshold:g} (a one-sided test at {alpha / 2:g} each)")
    if ce:
        test += ("; CE/KL: SAE reconstruction spliced into the layer output at the scored positions, "
                 "zero-ablation at the same positions, next-token loss at the scored prediction positions")
    tests = {"r2_ci": f"{level} percentile bootstrap over prompts ({n_boot} resamples, seed {seed})",
             "p_bootstrap": f"one-sided bootstrap: (1 + #{{R^2* <= threshold}}) / (1 + {n_boot}), floor 1/{n_boot + 1}",
             "r2_prompt_mean_ci": f"Student t {level} interval of the mean per-prompt R^2 (scipy t.interval)",
             "p_ttest": "one-sided one-sample t-test of the per-prompt R^2 against the threshold (scipy ttest_1samp)",
             "l0_ci, cosine_ci, ce_score_ci, kl_ci": f"{level} percentile bootstrap over the same prompt resamples "
                                                     "(ratios of resampled sums)",
             "dead_fraction_ci": (f"{level} percentile bootstrap over the same prompt resamples; a resample holds "
                                  "about 63% distinct prompts, so this interval leans high"),
             "passed": f"both {level} lower bounds (pooled and mean per-prompt R^2) > threshold"}
    meta = sae.cfg.metadata
    desc = (f"{sae.cfg.architecture()} SAE {sae.cfg.d_in}->{sae.cfg.d_sae} ({meta.hook_name or site.hook_name}"
            f"{', ' + meta.model_name if meta.model_name else ''})")
    return TransferReport(model=model.name, sae=desc, layer=site.layer, hook_name=site.hook_name,
                          module_path=site.module_path, threshold=threshold, alpha=alpha,
                          corpora=tuple(results), token_mask=mask, test=test, n_boot=n_boot, seed=seed,
                          tokens=tokens, tests=tests)


def _corpus_result(name: str, stats: _Stats, losses: dict[str, Any] | None, threshold: float, alpha: float,
                   n_boot: int, seed: int, *, n_template: int = 0) -> CorpusTransfer:
    from scipy import stats as st

    n_tok = float(stats.n.sum())
    r2 = float(_r2(stats.n.sum(), stats.sum_x.sum(0), stats.sq_norm.sum(), stats.sq_resid.sum()))
    per_prompt = _r2(stats.n, stats.sum_x, stats.sq_norm, stats.sq_resid)
    per_prompt = np.where(stats.n >= 2, per_prompt, np.nan)
    finite = per_prompt[np.isfinite(per_prompt)]
    boot = _bootstrap(stats, n_boot, seed)
    boot = boot[np.isfinite(boot)]
    if len(boot) and (stats.n > 0).sum() >= 2:
        ci = _percentile_ci(boot, alpha)
        p_boot = float((1 + np.sum(boot <= threshold)) / (1 + len(boot)))
    else:
        ci, p_boot = (math.nan, math.nan), math.nan
    t_ci: tuple[float, float] = (math.nan, math.nan)
    if len(finite) >= 2 and np.ptp(finite) > 0:
        p_t = float(st.ttest_1samp(finite, threshold, alternative="greater").pvalue)
        lo, hi = st.t.interval(1 - alpha, len(finite) - 1, loc=finite.mean(), scale=st.sem(finite))
        t_ci = (float(lo), float(hi))
    elif len(finite) >= 2:  # identical values: the t statistic is infinite or undefined
        p_t = 0.0 if finite[0] > threshold else 1.0
        t_ci = (float(finite[0]), float(finite[0]))
    else:
        p_t = math.nan
    legacy = losses is not None and not isinstance(losses.get("tokens"), np.ndarray)  # summed floats (old callers)
    sums = None if losses is None else {k: float(np.sum(v)) for k, v in losses.items()}
    cis = (_bootstrap_others(stats, None if legacy else losses, n_boot, seed, alpha)
           if stats.l0_prompt is not None and (stats.n > 0).sum() >= 2 else {})
    extra: dict[str, Any] = {}
    if sums is not None and sums["tokens"] > 0:
        t = sums["tokens"]
        ce_orig, ce_sae, ce_zero = sums["ce_orig"] / t, sums["ce_sae"] / t, sums["ce_zero"] / t
        denom = ce_zero - ce_orig
        extra = dict(ce_orig=ce_orig, ce_sae=ce_sae, ce_zero=ce_zero,
                     ce_score=(ce_zero - ce_sae) / denom if denom != 0 else math.nan,
                     kl=sums["kl_sae"] / t, kl_zero=sums["kl_zero"] / t, n_predicted=int(t),
                     ce_score_ci=cis.get("ce_score", (math.nan, math.nan)), kl_ci=cis.get("kl", (math.nan, math.nan)))
    return CorpusTransfer(
        name=name, n_prompts=len(stats.n), n_tokens=int(n_tok), r2=r2, r2_ci=ci,
        r2_prompt_mean=float(finite.mean()) if len(finite) else math.nan,
        r2_prompt=tuple(float(v) for v in per_prompt), p_bootstrap=p_boot, p_ttest=p_t, threshold=threshold,
        alpha=alpha, l0=stats.l0_sum / n_tok, dead_fraction=float(1.0 - stats.fired.mean()),
        cosine=stats.cos / n_tok, r2_prompt_mean_ci=t_ci, l0_ci=cis.get("l0", (math.nan, math.nan)),
        dead_fraction_ci=cis.get("dead_fraction", (math.nan, math.nan)),
        cosine_ci=cis.get("cosine", (math.nan, math.nan)), n_template_tokens=int(n_template), n_boot=n_boot, **extra)


__all__ = ["CorpusTransfer", "SAEFileError", "SAESite", "TransferReport", "check_sae", "load_sae", "train_sae",
           "transfer_report", "R2_FORMULA"]


def sae_for(model: Model, release: str | os.PathLike | None = None, sae_id: str | None = None, *, layer: int,
            train_prompts: Sequence[Prompt | str] | None = None, d_sae: int = 2048, k: int = 32, steps: int = 600,
            seed: int = 0, cache: Any = True, max_memory: int | str | None = None, lazy: bool | None = None,
            progress: bool = True) -> SAE:
    """A published SAE (``release``: a sae-lens release, a hub repo id + folder, or a local folder) checked
    against ``model``, or, with ``release=None``, a TopK SAE trained here on ``train_prompts`` (default: the
    general corpus; every token but special ones). ``sae.cfg.metadata.interp_source`` says which, in words.
    ``cache``, ``max_memory`` and ``lazy`` go to `capture`; a lazy capture is trained on by streaming its shards."""
    from interp import prompts

    if release is not None:
        sae = load_sae(release, sae_id, device=model.device, layer=layer)
        meta = sae.cfg.metadata
        name = f"{meta.release}/{meta.sae_id}" if meta.release else str(release)
        where = meta.source_path or str(release)
        meta.interp_source = f"published: {name} ({where})" if where != name else f"published: {name}"
    else:
        text = list(train_prompts) if train_prompts is not None else prompts.general()
        acts = capture(model, text, layers=[layer], positions="all", exclude=("special", "image"), cache=cache,
                       progress=progress, **_capture_streaming(max_memory=max_memory, lazy=lazy))
        sae = train_sae(acts, layer=layer, d_sae=d_sae, architecture="topk", k=k, steps=steps, seed=seed,
                        device=model.device, model_name=model.name, progress=progress)
        how = ", streamed from its shards" if sae.cfg.metadata.interp_training["streamed"] else ""
        sae.cfg.metadata.interp_source = (f"trained here: TopK d_sae={d_sae}, k={k}, {steps} steps on "
                                          f"{len(text)} prompts ({len(acts)} tokens{how})")
    check_sae(model, sae, layer)
    return sae
