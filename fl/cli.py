"""``python -m fl run|compare|plot|demo``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import CONFIG_DIR

# The offline comparison of ``python -m fl demo`` (and ``make demo``): one
# base config, one override list per method.
DEMO_VARIANTS = [
    ("fedavg", ["method.name=fedavg"]),
    ("flocora-r8", ["method.name=flocora", "method.rank=8", "method.alpha=16"]),
    ("flocora-r8-4bit", ["method.name=flocora", "method.rank=8", "method.alpha=16", "method.bits=4"]),
    (
        "flasc-r8-d0.1",
        ["method.name=flasc", "method.rank=8", "method.alpha=16", "method.ul_density=0.1", "method.dl_density=0.1"],
    ),
]


def _run(args) -> int:
    from .loop import resume_dir, run_file

    if args.resume:
        # `run --resume DIR [train.rounds=N]`: a config argument is read as an override
        over = ([args.config] if args.config else []) + args.overrides
        summary, out = resume_dir(args.resume, over, progress=not args.quiet)
    elif args.config is None:
        raise ValueError("run: give a config file (or --resume RUN_DIR)")
    else:
        summary, out = run_file(args.config, args.overrides, args.out, progress=not args.quiet)
    print(
        f"{summary['name']}: final acc {summary['final_acc']:.4f}, "
        f"{(summary['bytes_up_total'] + summary['bytes_down_total']) / 1e6:.2f} MB -> {out}"
    )
    return 0


def _compare(args) -> int:
    from .report import compare_table, load_run, seeds_table

    summaries = [load_run(d)[0] for d in args.runs]
    table = seeds_table(summaries) if args.seeds else compare_table(summaries)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return 0


def _plot(args) -> int:
    from .report import load_run, plot_runs

    for p in plot_runs([load_run(d) for d in args.runs], args.output):
        print(p)
    return 0


def _demo(args) -> int:
    from .loop import run_file
    from .report import compare_table

    summaries = []
    for name, over in DEMO_VARIANTS:
        over = over + [f"name=demo-{name}"] + args.overrides
        summary, _ = run_file(args.config, over, args.out, progress=not args.quiet)
        summaries.append(summary)
    print(compare_table(summaries))
    return 0


def _sweep(args) -> int:
    """Run every ``[[variant]]`` of a sweep file on its base config (for each
    of the sweep's ``seeds``), then write the tables, summaries and plots to
    ``--results``. A frontier sweep (``seeds`` given) keeps every run in
    ``<results>/runs/<variant>-s<seed>/`` and is resumable: finished runs are
    skipped, interrupted ones continue from their last completed round."""
    import json

    from .config import load_config, load_sweep
    from .loop import CHECKPOINT, resume_dir, run
    from .report import compare_table, frontier_report, load_run, plot_runs

    sweep_path = Path(args.sweep)
    # every run's config is validated here, before the first run starts
    sweep, base, all_jobs = load_sweep(sweep_path, args.overrides)
    results = Path(args.results or sweep.get("results", "docs/results") + "/" + sweep_path.stem)
    results.mkdir(parents=True, exist_ok=True)
    seeds = sweep.get("seeds")
    shard, n_shards = (int(x) for x in args.shard.split("/")) if args.shard else (0, 1)
    jobs = [(v, sd, over) for v, sd, over in all_jobs if not args.only or v["name"] in args.only]
    dirs = []
    for j, (v, sd, over) in enumerate(jobs):
        if seeds is None:  # a plain sweep: fresh runs under --out, as before
            summary, out = _run_fresh(base, over, args)
            slim = {k: val for k, val in summary.items() if k != "config"}
            slim["overrides"] = over
            (results / f"{v['name']}.json").write_text(json.dumps(slim, indent=2))
        else:
            out = results / "runs" / f"{v['name']}-s{sd}"
            if j % n_shards != shard:
                continue
            cfg = load_config(base, over)
            if (out / CHECKPOINT).is_file() or (out / "summary.json").is_file():
                summary, _ = resume_dir(out, [f"train.rounds={cfg['train']['rounds']}"], progress=not args.quiet)
            else:
                summary = run(cfg, out, progress=not args.quiet)
        dirs.append(out)
        print(
            f"{out.name}: final acc {summary['final_acc']:.4f}, last-10 mean "
            f"{summary.get('acc_last10_mean') or float('nan'):.4f}, ratio {summary['ratio_vs_fedavg'] or 0:.1f}x",
            flush=True,
        )
    if seeds is not None:
        if n_shards == 1:
            for p in frontier_report(results):
                print(p)
        return 0
    runs = [load_run(d) for d in dirs]
    table = compare_table([s for s, _ in runs])
    (results / "table.md").write_text(table + "\n")
    plot_runs(runs, results)
    print(table)
    return 0


def _run_fresh(base, over, args):
    from .loop import run_file

    return run_file(base, over, args.out, progress=not args.quiet)


def _frontier(args) -> int:
    from .report import frontier_report

    for p in frontier_report(Path(args.results), reference=args.reference):
        print(p)
    return 0


def _sizes(args) -> int:
    from .sizes import sizes_table

    print(sizes_table(args.arch, args.ranks, args.bits, args.classes))
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m fl", description="Minimal FL loop on flocora_codec")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one experiment from a TOML config")
    r.add_argument("config", nargs="?")
    r.add_argument("overrides", nargs="*", help="section.key=value")
    r.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run from its last completed round (only train.rounds may change)",
    )
    r.add_argument("--out", default="runs", help="runs folder (default: runs)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_run)
    c = sub.add_parser("compare", help="markdown table of finished runs")
    c.add_argument("runs", nargs="+")
    c.add_argument("-o", "--output", help="also write the table to this file")
    c.add_argument("--seeds", action="store_true", help="one row per run name, one column per seed")
    c.set_defaults(func=_compare)
    g = sub.add_parser("plot", help="accuracy vs round and vs cumulative MB (PNG)")
    g.add_argument("runs", nargs="+")
    g.add_argument("-o", "--output", required=True, help="folder for the PNGs")
    g.set_defaults(func=_plot)
    d = sub.add_parser("demo", help="small offline comparison: FedAvg, FLoCoRA, 4-bit FLoCoRA, FLASC")
    d.add_argument("overrides", nargs="*", help="section.key=value applied to every variant")
    d.add_argument("--config", default=str(CONFIG_DIR / "offline_mnist.toml"))
    d.add_argument("--out", default="runs")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=_demo)
    w = sub.add_parser("sweep", help="run the variants of a sweep TOML; table, summaries, plots to docs/results")
    w.add_argument("sweep")
    w.add_argument("overrides", nargs="*", help="section.key=value applied to every variant")
    w.add_argument("--only", nargs="*", help="run only these variant names")
    w.add_argument("--results", help="folder for summaries, table.md and PNGs")
    w.add_argument("--out", default="runs")
    w.add_argument("--shard", help="I/N: run only every N-th job starting at I (two processes on two cores)")
    w.add_argument("-q", "--quiet", action="store_true")
    w.set_defaults(func=_sweep)
    f = sub.add_parser("frontier", help="table and plots of a seeded sweep's runs (accuracy at convergence vs bytes)")
    f.add_argument("results", help="the sweep's results folder (holds runs/<variant>-s<seed>/)")
    f.add_argument("--reference", default="fedavg", help="variant the ratios and accuracy gaps refer to")
    f.set_defaults(func=_frontier)
    z = sub.add_parser("sizes", help="real message bytes vs FLoCoRA's formula, no training")
    z.add_argument("--arch", nargs="*", default=["resnet8", "resnet18"])
    z.add_argument("--ranks", nargs="*", type=int, default=[8, 16, 32, 64, 128])
    z.add_argument("--bits", nargs="*", type=int, default=[8, 4, 2])
    z.add_argument("--classes", type=int, default=10)
    z.set_defaults(func=_sizes)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        # bad config or missing data: one clear line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
