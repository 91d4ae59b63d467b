"""Command line: ``interp demo`` runs the loop on the embedded Gemma 3 270M; one subcommand per stage.

Every subcommand is a thin shell over a library function; ``interp <cmd> --help`` lists its options.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()


def _layers(text: str) -> list[int] | str:
    """'17', '15-19', '3,5,9' or 'all'."""
    if text == "all":
        return "all"
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def _lines(path: str | None, default: str) -> list[str]:
    if path is None:
        from interp import prompts

        return getattr(prompts, default)()
    return [ln for ln in Path(path).read_text().splitlines() if ln.strip()]


def cmd_capture(args: argparse.Namespace) -> None:
    import interp

    model = interp.load(args.model, device=args.device, dtype=args.dtype)
    prompts = _lines(args.prompts, "medical")
    acts = interp.capture(model, prompts, layers=_layers(args.layers), positions=args.positions,
                          cache=args.cache or True, batch_size=args.batch_size)
    table = Table(title=f"{model.name}: residual stream ({acts.positions} positions)")
    for col in ("layer", "rows", "mean norm", "max |x|"):
        table.add_column(col, justify="right")
    for layer in acts.layers:
        x = acts[layer].float()
        table.add_row(str(layer), str(x.shape[0]), f"{x.norm(dim=-1).mean():.1f}", f"{x.abs().max():.1f}")
    console.print(table)
    console.print(f"cache: [bold]{acts.path}[/bold]")


def cmd_demo(args: argparse.Namespace) -> None:
    from interp.demo import run_demo

    run_demo(out=Path(args.out), quick=args.quick, model_name=args.model)


def cmd_run(args: argparse.Namespace) -> None:
    from interp.loop import LoopConfig, run_loop

    config = LoopConfig.from_yaml(args.config)
    if args.out:
        config.output = args.out
    run_loop(config)


def _pairs(args: argparse.Namespace):
    from interp import data

    if args.pairs in (None, "register"):
        pairs = data.builtin("register")
    else:
        mapping = dict(kv.split("=", 1) for kv in (args.mapping or []))
        pairs = data.load_pairs(args.pairs, mapping=mapping or None, image_root=args.image_root)
    return pairs[: args.limit] if args.limit else pairs


def _write(result, out: str | None, name: str) -> None:
    if not out:
        return
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    result.to_json(folder / f"{name}.json")
    if hasattr(result, "figure"):
        result.figure().write_html(str(folder / f"{name}.html"), include_plotlyjs="directory")
    console.print(f"wrote [bold]{folder / name}.json[/bold]")


def _sae(args: argparse.Namespace, model):
    import interp

    return interp.load_sae(args.sae, args.sae_id, device=model.device, layer=args.layer)


def cmd_transfer(args: argparse.Namespace) -> None:
    import interp

    model = interp.load(args.model, device=args.device, dtype=args.dtype)
    sae = _sae(args, model)
    n = args.n_prompts
    report = interp.transfer_report(model, sae, {"medical": interp.prompts.medical()[:n],
                                                 "general": interp.prompts.general()[:n]},
                                    layer=args.layer, threshold=args.threshold)
    console.print(report)
    _write(report, args.out, "transfer")


def cmd_features(args: argparse.Namespace) -> None:
    import interp

    model = interp.load(args.model, device=args.device, dtype=args.dtype)
    table = interp.register_features(model, _sae(args, model), _pairs(args), layer=args.layer)
    console.print(table)
    console.print(table.top(args.top).to_string())
    _write(table, args.out, "features")


def cmd_find_layers(args: argparse.Namespace) -> None:
    import interp

    model = interp.load(args.model, device=args.device, dtype=args.dtype)
    kw = {"saes": {args.layer: _sae(args, model)}} if args.method == "sae" else {}
    selection = interp.find_layers(model, _pairs(args), width=args.width, method=args.method, **kw)
    console.print(selection)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "layers.json").write_text(json.dumps(selection.to_dict(), indent=1))


def cmd_train(args: argparse.Namespace) -> None:
    import interp

    model = interp.load(args.model, device=args.device, dtype=args.dtype)
    layers = _layers(args.layers)
    result = interp.train_lora(model, _pairs(args), layers=layers, r=args.r, alpha=args.alpha, lr=args.lr,
                               epochs=args.epochs, grad_accum=args.grad_accum, kl_weight=args.kl_weight,
                               ce_weight=args.ce_weight, max_steps=args.max_steps, output_dir=args.out)
    console.print(result)


def cmd_evaluate(args: argparse.Namespace) -> None:
    import interp

    model = interp.load(args.model, device=args.device, dtype=args.dtype)
    if args.adapter:
        model = interp.load_adapter(model, args.adapter)
    report = interp.evaluate(model, _pairs(args), batch_size=args.batch_size, fast=not args.naive)
    console.print(report)
    _write(report, args.out, "consistency")


def cmd_export(args: argparse.Namespace) -> None:
    import interp

    params = {k: _json_or_text(v) for k, v in (kv.split("=", 1) for kv in (args.param or []))}
    result = interp.export(args.out, parameters=params, notebooks=args.notebooks or None, seed=args.seed)
    console.print(result)


def _json_or_text(value: str):
    """Notebook parameters from the command line: JSON where it parses (numbers, lists), else text."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def cmd_lab(args: argparse.Namespace) -> None:
    import subprocess

    from interp.export import NOTEBOOKS

    raise SystemExit(subprocess.call([sys.executable, "-m", "jupyter", "lab", str(NOTEBOOKS), *args.extra]))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="interp", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="gemma3-270m", help="hub id, folder, .gguf or built-in name")
        p.add_argument("--device", default=None)
        p.add_argument("--dtype", default=None)

    def pair_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--pairs", default="register", help="'register' (built-in) or a JSONL/CSV file")
        p.add_argument("--mapping", nargs="*", help="column renames, e.g. question_a=original")
        p.add_argument("--image-root", default=None)
        p.add_argument("--limit", type=int, default=None, help="use only the first N pairs")

    def sae_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--sae", required=True, help="sae-lens release or a local SAE folder")
        p.add_argument("--sae-id", default=None, help="e.g. layer_17_width_16k_l0_medium")
        p.add_argument("--layer", type=int, default=None)

    p = sub.add_parser("demo", help="the whole loop on the embedded Gemma 3 270M, ending in a report")
    p.add_argument("--out", default="reports/demo", help="report folder")
    p.add_argument("--quick", action="store_true", help="a reduced setting (CI)")
    p.add_argument("--model", default="gemma3-270m")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("run", help="the whole loop from a YAML config")
    p.add_argument("config")
    p.add_argument("--out", default=None, help="override the config's output folder")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("capture", help="capture residual-stream activations into sae_cache/")
    model_args(p)
    p.add_argument("--layers", default="all", help="'17', '15-19', '3,5,9' or 'all'")
    p.add_argument("--positions", default="last", choices=["last", "all", "question"])
    p.add_argument("--prompts", default=None, help="a text file, one prompt per line (default: bundled medical)")
    p.add_argument("--cache", default=None, help="cache root folder (default sae_cache/)")
    p.add_argument("--batch-size", type=int, default=None)
    p.set_defaults(fn=cmd_capture)

    p = sub.add_parser("transfer", help="SAE transfer report: R^2 on medical and general text")
    model_args(p)
    sae_args(p)
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--n-prompts", type=int, default=100)
    p.add_argument("--out", default=None)
    p.set_defaults(fn=cmd_transfer)

    p = sub.add_parser("features", help="register-sensitive SAE features on paraphrase pairs")
    model_args(p)
    sae_args(p)
    pair_args(p)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", default=None)
    p.set_defaults(fn=cmd_features)

    p = sub.add_parser("find-layers", help="pick the LoRA layer window from evidence")
    model_args(p)
    pair_args(p)
    p.add_argument("--method", default="patching", choices=["patching", "residual", "sae"])
    p.add_argument("--width", type=int, default=5)
    p.add_argument("--sae", default=None)
    p.add_argument("--sae-id", default=None)
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--out", default=None)
    p.set_defaults(fn=cmd_find_layers)

    p = sub.add_parser("train", help="targeted LoRA with the CE + symmetric-KL consistency loss")
    model_args(p)
    pair_args(p)
    p.add_argument("--layers", required=True, help="'15-19', '3,5,9' or 'all'")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--grad-accum", type=int, default=8)
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--out", default="lora_run")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("evaluate", help="paraphrase consistency: flip rate, margin difference, accuracy")
    model_args(p)
    pair_args(p)
    p.add_argument("--adapter", default=None, help="a PEFT adapter folder to evaluate on top of the model")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--naive", action="store_true", help="one forward per phrasing (the reference path)")
    p.add_argument("--out", default=None)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("export", help="execute the notebooks and export figures, tables, metrics, manifest")
    p.add_argument("--out", default="exports/run")
    p.add_argument("--notebooks", nargs="*", default=None, help="e.g. 01_capture 02_sae_transfer")
    p.add_argument("--param", nargs="*", help="notebook parameters, e.g. model_name=tiny-medgemma n_pairs=20")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("lab", help="open JupyterLab on the notebooks")
    p.add_argument("extra", nargs="*", help="options passed on to jupyter lab")
    p.set_defaults(fn=cmd_lab)
    return ap


def main(argv: list[str] | None = None) -> int:
    from interp._errors import InterpError

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "lab":  # everything else is JupyterLab's (e.g. --port 8889, --version)
        args.extra = unknown + args.extra
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        args.fn(args)
    except InterpError as e:
        console.print(f"[bold red]error:[/bold red] {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
