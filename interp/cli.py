"""Command line: ``interp demo`` runs the loop on the embedded Gemma 3 270M; one subcommand per stage.

Every subcommand is a thin shell over a library function; ``interp <cmd> --help`` lists its options with
their defaults. Every value is checked before a model is loaded, and every mistake is one line on stderr
(exit code 2), never a traceback. Stage commands that choose something (features, find-layers, train) use
the training side of the seeded split that `interp.data.split` makes, and ``evaluate`` the held-out side, so
chaining them never evaluates on pairs that chose layers, features or weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from interp._errors import InterpError

console = Console()


# ---- values -------------------------------------------------------------------------------------
def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} must be >= {lo}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


def _number(lo: float, hi: float | None = None, *, low_open: bool = True, high_open: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = value <= lo if low_open else value < lo
        too_high = hi is not None and (value >= hi if high_open else value > hi)
        if not math.isfinite(value) or too_low or too_high:
            span = f"{'(' if low_open else '['}{lo:g}, {'inf)' if hi is None else f'{hi:g}' + (')' if high_open else ']')}"
            raise argparse.ArgumentTypeError(f"{text} must be a finite number in {span}")
        return value

    return parse


def _layers_arg(text: str) -> list[int] | str:
    """'17', '15-19', '3,5,9' or 'all' (checked against the model's depth once it is loaded)."""
    from interp.loop import parse_layers

    try:
        return parse_layers(text)
    except InterpError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a layer list; use '17', '15-19', '3,5,9' or 'all' "
                                         "(layers are numbered from 0)") from None


def _mapping(items: list[str] | None) -> dict[str, str] | None:
    out = {}
    for item in items or []:
        ours, sep, theirs = item.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise InterpError(f"--mapping {item!r}: write our_field=their_column, e.g. question_a=original")
        out[ours.strip()] = theirs.strip()
    return out or None


def _lines(path: str | None, default: str) -> list[str]:
    if path is None:
        from interp import prompts

        return getattr(prompts, default)()
    file = Path(path).expanduser()
    if not file.is_file():
        raise InterpError(f"--prompts '{path}': no such file; give a text file with one prompt per line")
    try:
        lines = [ln for ln in file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as e:
        raise InterpError(f"--prompts '{path}' is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if not lines:
        raise InterpError(f"--prompts '{path}' has no non-empty lines")
    return lines


def _load(args: argparse.Namespace):
    """Check the model source, device and dtype (quick), then load the model."""
    import interp
    from interp.loop import check_device, check_model_source

    check_model_source(args.model, what=f"--model {args.model!r}")
    check_device(args.device, what="--device")
    if args.dtype is not None and not interp.models.as_dtype(args.dtype).is_floating_point:
        raise InterpError(f"--dtype {args.dtype}: models run in a floating-point dtype ('float32', 'bfloat16', "
                          "'float16')")
    return interp.load(args.model, device=args.device, dtype=args.dtype)


def _check_layers(layers: list[int] | str, model, flag: str) -> None:
    if layers != "all" and max(layers) >= model.n_layers:
        raise InterpError(f"{flag} reaches layer {max(layers)}, but {model.name} has layers 0-{model.n_layers - 1}")


def _check_out(out: str | None, *, ours: bool = True) -> None:
    """An unusable --out (a file, /proc, a folder of someone else's files) fails before any work."""
    if out:
        from interp.export import prepare_output, usable_folder

        if ours:
            prepare_output(out, create=False, what="--out")
        else:
            usable_folder(out, what="--out")


def _pairs(args: argparse.Namespace):
    """(pairs this command uses, the held-out side or None): the seeded split names which side is which."""
    from interp import data
    from interp.export import pairs_digest

    mapping = _mapping(args.mapping)
    if args.pairs in (None, "register"):
        pairs = data.builtin("register")
    else:
        if not Path(args.pairs).expanduser().is_file():
            raise InterpError(f"--pairs '{args.pairs}': no such file; give a JSONL/CSV file or 'register'")
        pairs = data.load_pairs(args.pairs, mapping=mapping, image_root=args.image_root)
    pairs = pairs[: args.limit] if args.limit else pairs
    if args.split == "all":
        console.print(f"pairs: all {len(pairs)} (no held-out side)")
        return pairs, None
    train, held = data.split(pairs, args.eval_fraction, seed=args.seed)
    chosen = train if args.split == "train" else held
    console.print(f"pairs: the {len(chosen)} {args.split} pairs of {len(pairs)} (split seed {args.seed}, eval "
                  f"fraction {args.eval_fraction}; ids sha256 {pairs_digest(chosen)['ids_sha256'][:12]})")
    return chosen, held


def _write(result, out: str | None, name: str) -> None:
    if not out:
        return
    from interp._io import atomic_write_text
    from interp._results import jsonable
    from interp.export import prepare_output, write_figure_html

    folder = prepare_output(out, what="--out")
    atomic_write_text(folder / f"{name}.json", json.dumps(jsonable(result.to_dict()), indent=1))
    if hasattr(result, "figure"):
        write_figure_html(result.figure(), folder / f"{name}.html")
    console.print(f"wrote [bold]{folder / name}.json[/bold]")


def _sae(args: argparse.Namespace, model):
    import interp

    if args.layer is not None and args.layer >= model.n_layers:
        raise InterpError(f"--layer {args.layer}, but {model.name} has layers 0-{model.n_layers - 1}")
    return interp.load_sae(args.sae, args.sae_id, device=model.device, layer=args.layer)


# ---- commands -----------------------------------------------------------------------------------
def cmd_capture(args: argparse.Namespace) -> None:
    import interp
    from interp.export import usable_folder

    if args.cache:
        usable_folder(args.cache, what="--cache")
    prompts = _lines(args.prompts, "medical")
    model = _load(args)
    _check_layers(args.layers, model, f"--layers {args.layers}")
    acts = interp.capture(model, prompts, layers=args.layers, positions=args.positions,
                          cache=args.cache or True, batch_size=args.batch_size, batch_tokens=args.batch_tokens,
                          max_memory=args.max_memory)
    table = Table(title=f"{model.name}: residual stream ({acts.positions} positions"
                        f"{', read shard by shard from the cache' if acts.lazy else ''})")
    for col in ("layer", "rows", "mean norm", "max |x|"):
        table.add_column(col, justify="right")
    sums = {layer: [0, 0.0, 0.0] for layer in acts.layers}  # rows, sum of norms, max |x|
    for chunk in acts.chunks():  # one shard at a time: a capture larger than memory is summarised too
        for layer, x in chunk.acts.items():
            x = x.float()
            s_ = sums[layer]
            s_[0] += x.shape[0]
            s_[1] += float(x.norm(dim=-1).sum())
            s_[2] = max(s_[2], float(x.abs().max())) if x.numel() else s_[2]
    for layer, (n, norm, top) in sums.items():
        table.add_row(str(layer), str(n), f"{norm / max(n, 1):.1f}", f"{top:.1f}")
    console.print(table)
    console.print(f"cache: [bold]{acts.path}[/bold]")


def cmd_demo(args: argparse.Namespace) -> None:
    from interp.demo import run_demo

    run_demo(out=Path(args.out), quick=args.quick, model_name=args.model)


def cmd_run(args: argparse.Namespace) -> None:
    from interp.loop import LoopConfig, run_loop

    config = LoopConfig.from_yaml(args.config)  # keys, types and ranges
    if args.out:
        config.output = args.out
    run_loop(config)  # checks model, SAE, data and output paths before any work


def cmd_transfer(args: argparse.Namespace) -> None:
    import interp

    _check_out(args.out)
    model = _load(args)
    sae = _sae(args, model)
    n = args.n_prompts
    report = interp.transfer_report(model, sae, {"medical": interp.prompts.medical()[:n],
                                                 "general": interp.prompts.general()[:n]},
                                    layer=args.layer, threshold=args.threshold)
    console.print(report)
    _write(report, args.out, "transfer")


def cmd_features(args: argparse.Namespace) -> None:
    import interp

    _check_out(args.out)
    pairs, _ = _pairs(args)
    model = _load(args)
    table = interp.register_features(model, _sae(args, model), pairs, layer=args.layer)
    console.print(table)
    console.print(table.top(args.top).to_string())
    _write(table, args.out, "features")


def cmd_find_layers(args: argparse.Namespace) -> None:
    import interp

    if args.method == "sae" and not args.sae:
        raise InterpError("--method sae needs --sae (a sae-lens release or a local SAE folder) and --layer")
    _check_out(args.out)
    pairs, _ = _pairs(args)
    model = _load(args)
    kw = {"saes": {args.layer: _sae(args, model)}} if args.method == "sae" else {}
    selection = interp.find_layers(model, pairs, width=args.width, method=args.method, **kw)
    console.print(selection)
    _write(selection, args.out, "layers")


def cmd_train(args: argparse.Namespace) -> None:
    import interp

    _check_out(args.out, ours=False)  # train_lora keeps its own runs (checkpoints/, adapter/) in --out
    pairs, held = _pairs(args)
    model = _load(args)
    _check_layers(args.layers, model, f"--layers {args.layers}")
    result = interp.train_lora(model, pairs, layers=args.layers, r=args.r, alpha=args.alpha, dropout=args.dropout,
                               lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                               grad_accum=args.grad_accum, kl_weight=args.kl_weight, ce_weight=args.ce_weight,
                               max_steps=args.max_steps, eval_pairs=held if held else 0.1, seed=args.seed,
                               output_dir=args.out)
    console.print(result)


def cmd_evaluate(args: argparse.Namespace) -> None:
    import interp

    _check_out(args.out)
    pairs, _ = _pairs(args)
    model = _load(args)
    if args.adapter:
        model = interp.load_adapter(model, args.adapter)
    report = interp.evaluate(model, pairs, batch_size=args.batch_size, fast=not args.naive)
    console.print(report)
    _write(report, args.out, "consistency")


def cmd_export(args: argparse.Namespace) -> None:
    import interp
    from interp.export import parse_parameter

    params = dict(parse_parameter(kv) for kv in (args.param or []))
    result = interp.export(args.out, parameters=params, notebooks=args.notebooks or None, seed=args.seed)
    console.print(result)


def lab_folder() -> Path:
    """Where `interp lab` opens: the repository's notebooks/ in a checkout; after a plain ``pip install``,
    ``./interp-notebooks``, with copies of the bundled notebooks that are not there yet (yours are kept)."""
    import shutil

    from interp.export import NOTEBOOKS

    source = NOTEBOOKS.resolve()
    if (source.parent / "pyproject.toml").is_file() and os.access(source, os.W_OK):
        return source
    target = Path.cwd() / "interp-notebooks"
    target.mkdir(exist_ok=True)
    copied = [shutil.copy2(f, target / f.name) for f in sorted(source.iterdir())
              if f.is_file() and not (target / f.name).exists()]
    if copied:
        console.print(f"copied {len(copied)} bundled notebook files to {target}")
    return target


def _stop_with_parent() -> None:
    """In the JupyterLab child (Linux): get SIGTERM when `interp lab` dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def cmd_lab(args: argparse.Namespace) -> None:
    """JupyterLab on the notebooks, every argument passed through as given; it stops when `interp lab` does."""
    import shutil
    import subprocess

    jupyter = shutil.which("jupyter")  # what `jupyter lab` typed in this shell would run
    cmd = [jupyter] if jupyter else [sys.executable, "-m", "jupyter"]
    child = subprocess.Popen([*cmd, "lab", str(lab_folder()), *args.extra],
                             preexec_fn=_stop_with_parent if sys.platform.startswith("linux") else None)

    def stop(signum: int, _frame: object) -> None:
        raise _Stopped(signum)

    handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM))}
    try:
        code = child.wait()
    except (KeyboardInterrupt, _Stopped) as e:
        code = 128 + (e.signum if isinstance(e, _Stopped) else signal.SIGINT)
        if child.poll() is None:  # JupyterLab shuts its kernels down on SIGTERM
            child.terminate()
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    raise SystemExit(code)


class _Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# ---- parser -------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are `InterpError`s, so that `main` prints them as one line."""

    def error(self, message: str):
        raise InterpError(f"{self.prog}: {message} (see '{self.prog} --help')")


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default; descriptions keep their line breaks."""


def _train_epilog() -> str:
    """Where `interp train`'s defaults (the study's, `LoraSection`) differ from what `interp demo` uses."""
    import dataclasses
    import textwrap

    from interp.loop import LoopConfig, LoraSection

    study, demo = LoraSection(), LoopConfig.demo().lora
    flag = {"train_pairs": "limit"}  # the demo caps training pairs; here --limit caps the pairs read
    diffs = [(flag.get(f.name, f.name).replace("_", "-"), getattr(demo, f.name), getattr(study, f.name))
             for f in dataclasses.fields(LoraSection) if getattr(demo, f.name) != getattr(study, f.name)]
    text = ("Defaults are the study's (MedGemma-4B, layers 15-19). They differ from what `interp demo` uses on "
            "the 270M: " + ", ".join(f"--{k} {d} (here {s if s is not None else 'all'})" for k, d, s in diffs) +
            ". For the demo's setting: interp train " + " ".join(f"--{k} {d}" for k, d, _ in diffs) + " ...")
    return textwrap.fill(text, 90, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    from interp.loop import LoraSection

    ap = _Parser(prog="interp", description=__doc__.splitlines()[0], formatter_class=_Help)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, fn, **kw) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_Help, **kw)
        p.set_defaults(fn=fn)
        return p

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="gemma3-270m", help="hub id, local folder, .gguf file or built-in name "
                       "(gemma3-270m, tiny-medgemma, tiny-llava)")
        p.add_argument("--device", default=None, help="'cpu', 'cuda', 'cuda:1', ... (None: cuda if available)")
        p.add_argument("--dtype", default=None, help="'float32', 'bfloat16', ... (None: bf16 on GPU, fp32 on CPU)")

    def pair_args(p: argparse.ArgumentParser, split: str) -> None:
        p.add_argument("--pairs", default="register", help="'register' (built-in) or a JSONL/CSV file")
        p.add_argument("--mapping", nargs="*", metavar="OURS=THEIRS",
                       help="column renames for the pairs file, e.g. question_a=original")
        p.add_argument("--image-root", default=None, help="folder that relative image paths are resolved against")
        p.add_argument("--limit", type=_int_at_least(1), default=None, help="use only the first N pairs (None: all)")
        p.add_argument("--split", default=split, choices=["train", "held-out", "all"],
                       help="which side of the seeded train/held-out split this command uses; selection and "
                       "training take 'train', evaluation 'held-out', so that no evaluated pair chose anything")
        p.add_argument("--eval-fraction", type=_number(0, 1), default=0.3,
                       help="share of question groups held out (same split in every command with this seed)")
        p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the split (and of training)")

    def sae_args(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--sae", required=required, default=None, help="sae-lens release or a local SAE folder")
        p.add_argument("--sae-id", default=None, help="id within a release, e.g. layer_17_width_16k_l0_medium")
        p.add_argument("--layer", type=_int_at_least(0), default=None,
                       help="decoder layer of the SAE (None: read from the SAE's hook name)")

    def out_arg(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--out", default=None, help=f"folder for {what} (None: print only)")

    p = command("demo", "the whole loop on the embedded Gemma 3 270M, ending in a report", cmd_demo)
    p.add_argument("--out", default="reports/demo", help="report folder (new, empty, or an earlier report)")
    p.add_argument("--quick", action="store_true", help="a reduced setting (CI)")
    p.add_argument("--model", default="gemma3-270m", help="model to run the demo on")

    p = command("run", "the whole loop from a YAML config (every setting checked before any work)", cmd_run)
    p.add_argument("config", help="a YAML file such as configs/demo.yaml")
    p.add_argument("--out", default=None, help="report folder, overriding the config's 'output' (None: keep it)")

    p = command("capture", "capture residual-stream activations into sae_cache/", cmd_capture)
    model_args(p)
    p.add_argument("--layers", type=_layers_arg, default="all", help="'17', '15-19', '3,5,9' or 'all'")
    p.add_argument("--positions", default="last", choices=["last", "all", "question"],
                   help="which token positions to keep")
    p.add_argument("--prompts", default=None, help="a UTF-8 text file, one prompt per line (None: bundled medical)")
    p.add_argument("--cache", default=None, help="cache root folder (None: sae_cache/)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=None,
                   help="at most this many prompts per forward (None: 64 on a GPU, 16 on the CPU)")
    p.add_argument("--batch-tokens", type=_int_at_least(1), default=None,
                   help="at most this many padded tokens per forward; prompts are batched by length "
                        "(None: 16384 on a GPU, 4096 on the CPU)")
    p.add_argument("--max-memory", default=None,
                   help="host memory the activations may take, e.g. '8GB'; a larger capture is read back shard "
                        "by shard from the cache (None: a quarter of this machine's memory)")

    p = command("transfer", "SAE transfer report: R^2 on medical and general text", cmd_transfer)
    model_args(p)
    sae_args(p)
    p.add_argument("--threshold", type=_number(0, 1), default=0.95, help="R^2 the SAE must exceed on every corpus")
    p.add_argument("--n-prompts", type=_int_at_least(1), default=100, help="prompts per corpus")
    out_arg(p, "transfer.json and transfer.html")

    p = command("features", "register-sensitive SAE features on the training pairs", cmd_features)
    model_args(p)
    sae_args(p)
    pair_args(p, "train")
    p.add_argument("--top", type=_int_at_least(1), default=20, help="rows of the table to print")
    out_arg(p, "features.json and features.html")

    p = command("find-layers", "pick the LoRA layer window from evidence on the training pairs", cmd_find_layers)
    model_args(p)
    pair_args(p, "train")
    p.add_argument("--method", default="patching", choices=["patching", "residual", "sae"],
                   help="evidence per layer")
    p.add_argument("--width", type=_int_at_least(1), default=5, help="number of contiguous layers to pick")
    sae_args(p, required=False)
    out_arg(p, "layers.json and layers.html")

    lora = LoraSection()
    p = command("train", "targeted LoRA with the CE + symmetric-KL consistency loss, on the training pairs",
                cmd_train, epilog=_train_epilog())
    model_args(p)
    pair_args(p, "train")
    p.add_argument("--layers", type=_layers_arg, required=True, help="'15-19', '3,5,9' or 'all'")
    p.add_argument("--r", type=_int_at_least(1), default=lora.r, help="adapter rank")
    p.add_argument("--alpha", type=_int_at_least(1), default=lora.alpha, help="LoRA alpha (scale = alpha / r)")
    p.add_argument("--dropout", type=_number(0, 1, low_open=False), default=lora.dropout, help="LoRA dropout, in [0, 1)")
    p.add_argument("--lr", type=_number(0), default=lora.lr, help="learning rate")
    p.add_argument("--epochs", type=_int_at_least(1), default=lora.epochs, help="passes over the training pairs")
    p.add_argument("--batch-size", type=_int_at_least(1), default=lora.batch_size, help="pairs per micro-batch")
    p.add_argument("--grad-accum", type=_int_at_least(1), default=lora.grad_accum,
                   help="micro-batches per optimiser step")
    p.add_argument("--kl-weight", type=_number(0, low_open=False), default=lora.kl_weight,
                   help="weight of the symmetric KL between phrasings")
    p.add_argument("--ce-weight", type=_number(0, low_open=False), default=lora.ce_weight,
                   help="weight of the cross-entropy on the first answer token")
    p.add_argument("--max-steps", type=_int_at_least(1), default=lora.max_steps,
                   help="stop after this many optimiser steps (None: all epochs)")
    p.add_argument("--out", default="lora_run", help="run folder (checkpoints/ and adapter/ inside)")

    p = command("evaluate", "paraphrase consistency on the held-out pairs: flip rate, margin difference, accuracy",
                cmd_evaluate)
    model_args(p)
    pair_args(p, "held-out")
    p.add_argument("--adapter", default=None, help="a PEFT adapter folder to evaluate on top of the model")
    p.add_argument("--batch-size", type=_int_at_least(1), default=None, help="prompts per forward (None: automatic)")
    p.add_argument("--naive", action="store_true", help="one forward per phrasing (the reference path)")
    out_arg(p, "consistency.json and consistency.html")

    p = command("export", "execute the notebooks and export figures, tables, metrics, manifest", cmd_export)
    p.add_argument("--out", default="exports/run", help="export folder (new, empty, or an earlier export)")
    p.add_argument("--notebooks", nargs="*", default=None, help="e.g. 01_capture 02_sae_transfer (None: all six)")
    p.add_argument("--param", nargs="*", metavar="NAME=VALUE",
                   help="notebook parameters, e.g. model_name=tiny-medgemma n_pairs=20 layers='[3, 9]'; each goes "
                   "to the notebooks that declare it; values are Python literals or bare words (read as text)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of every notebook")

    p = command("lab", "open JupyterLab on the notebooks (after a pip install: copies in ./interp-notebooks)",
                cmd_lab)
    p.add_argument("extra", nargs="*", metavar="JUPYTER_ARGS",
                   help="passed on to jupyter lab unchanged and in order, e.g. --port 8899 --no-browser")
    return ap


def _say(message: str) -> None:
    print("error: " + " ".join(str(message).split()), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        parser = build_parser()
        if argv[:1] == ["lab"] and argv[1:] not in (["-h"], ["--help"]):
            # everything after `lab` is JupyterLab's, in the order given (--port 8899 --no-browser ...)
            cmd_lab(argparse.Namespace(command="lab", extra=argv[1:]))
            return 0
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.fn(args)
    except InterpError as e:
        _say(str(e))
        return 2
    except OSError as e:  # disk full, permissions: the file and the reason, not a traceback
        _say(f"{e.strerror or e}{f': {e.filename!r}' if e.filename else ''}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
