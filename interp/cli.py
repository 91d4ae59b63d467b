"""Command line: ``interp demo`` runs the loop on the embedded Gemma 3 270M; one subcommand per stage.

Every subcommand is a thin shell over a library function; ``interp <cmd> --help`` lists its options.
"""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="interp", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="gemma3-270m", help="hub id, folder, .gguf or built-in name")
        p.add_argument("--device", default=None)
        p.add_argument("--dtype", default=None)

    p = sub.add_parser("demo", help="the whole loop on the embedded Gemma 3 270M, ending in a report")
    p.add_argument("--out", default="reports/demo", help="report folder")
    p.add_argument("--quick", action="store_true", help="a reduced setting (CI)")
    p.add_argument("--model", default="gemma3-270m")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("capture", help="capture residual-stream activations into sae_cache/")
    model_args(p)
    p.add_argument("--layers", default="all", help="'17', '15-19', '3,5,9' or 'all'")
    p.add_argument("--positions", default="last", choices=["last", "all", "question"])
    p.add_argument("--prompts", default=None, help="a text file, one prompt per line (default: bundled medical)")
    p.add_argument("--cache", default=None, help="cache root folder (default sae_cache/)")
    p.add_argument("--batch-size", type=int, default=None)
    p.set_defaults(fn=cmd_capture)
    return ap


def main(argv: list[str] | None = None) -> int:
    from interp._errors import InterpError

    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except InterpError as e:
        console.print(f"[bold red]error:[/bold red] {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
