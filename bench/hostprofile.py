"""Where the launching thread's time goes in capture (diagnosis, not a benchmark).

    python bench/hostprofile.py --out DIR                 # bench/ragged.py's image corpus, default and caller order
    py-spy record -r 250 -f raw -o DIR/spy.txt -- python bench/hostprofile.py --out DIR --loops 6

Captures bench/ragged.py's image corpus (and its text corpus) at layer 17 and writes, per corpus and order:
the wall time of each call (CUDA-synchronised), and a cProfile of the main thread (top functions by own time
and by cumulative time), so that the host time of one forward can be split into transformers' code, interp's
code and torch's dispatch. ``--loops`` repeats the un-profiled calls (for a sampling profiler around it).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import medgemma_shape  # noqa: E402
from ragged import image_corpora  # noqa: E402

import interp  # noqa: E402
from interp import _imageworkers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--deep", action="store_true", help="CPU: 34 layers at narrow widths")
    ap.add_argument("--out", default="hostprofile")
    ap.add_argument("--loops", type=int, default=2)
    ap.add_argument("--corpora", default="images,text")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = medgemma_shape.build(smoke=args.smoke or args.deep, deep=args.deep)
    cuda = model.device.type == "cuda"
    if cuda:
        _imageworkers.pool(wait=True)
    small = args.smoke
    corpora = image_corpora(model, 24 if small else 128, 4, 20 if small else 40, 600, 56 if small else 768)
    corpora["text"] = medgemma_shape.prompts_of_lengths(model, medgemma_shape.ragged_lengths(
        96 if small else 512, 40, 1000))
    layer = 3 if args.smoke else 17
    caller = dict(sort=False, batch_size=16, batch_tokens=10**9)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def go(prompts, **kw):
        return interp.capture(model, prompts, layers=[layer], positions="all", progress=False, **kw)

    report = io.StringIO()
    for cname in args.corpora.split(","):
        prompts = corpora[cname]
        for oname, kw in (("default", {}), ("caller order", caller)):
            go(prompts, **kw)
            sync()
            times = []
            for _ in range(args.loops):
                t = time.perf_counter()
                go(prompts, **kw)
                sync()
                times.append(time.perf_counter() - t)
            prof = cProfile.Profile()
            sync()
            t = time.perf_counter()
            prof.enable()
            go(prompts, **kw)
            sync()
            prof.disable()
            wall = time.perf_counter() - t
            head = (f"=== {cname}, {oname}: wall {', '.join(f'{x * 1000:.0f}' for x in times)} ms; "
                    f"under cProfile {wall * 1000:.0f} ms")
            print(head, flush=True)
            report.write(head + "\n")
            for key in ("tottime", "cumulative"):
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats(key).print_stats(45)
                report.write(s.getvalue())
            prof.dump_stats(str(out / f"{cname}_{oname.replace(' ', '_')}.pstats"))
    (out / "hostprofile.txt").write_text(report.getvalue())


if __name__ == "__main__":
    main()
