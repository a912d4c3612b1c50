"""Comparison tables (markdown) and plots (PNG) from run directories."""
from __future__ import annotations

import json
from pathlib import Path


def load_run(run_dir: str | Path) -> tuple[dict, list[dict]]:
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run: no summary.json")
    summary = json.loads(summary_path.read_text())
    rounds_path = run_dir / "rounds.jsonl"
    rounds = [json.loads(line) for line in rounds_path.read_text().splitlines() if line.strip()] \
        if rounds_path.is_file() else []
    return summary, rounds


def _pct(x):
    return "-" if x is None or x != x else f"{100 * x:.2f}"


def compare_table(summaries: list[dict]) -> str:
    """Method, final/last-3-mean/best accuracy, MB per round each way, total MB, ratio vs FedAvg.

    The ratio is FedAvg's bytes for the same messages (one raw whole-model
    message each, ``fedavg_message_bytes``) over this run's bytes, so runs
    with dropped clients or without a FedAvg run beside them still compare.
    """
    personal = any("final_acc_personal" in s for s in summaries)
    head = ["run", "method", "final acc %", "mean acc last 3 %", "best acc %"]
    if personal:
        head += ["final personal acc %"]
    head += ["MB/round up", "MB/round down", "total MB", "up msg bytes", "ratio vs FedAvg"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        total = (s["bytes_up_total"] + s["bytes_down_total"]) / 1e6
        ratio = s.get("ratio_vs_fedavg")
        cells = [s["name"], s["method"], _pct(s["final_acc"]), _pct(s.get("acc_last3_mean")), _pct(s["best_acc"])]
        if personal:
            cells.append(_pct(s.get("final_acc_personal")))
        cells += [f"{s['mb_up_per_round']:.3f}", f"{s['mb_down_per_round']:.3f}", f"{total:.2f}",
                  f"{s['up_message_bytes']:,.0f}", "-" if ratio is None else f"{ratio:.2f}x"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def seeds_table(summaries: list[dict]) -> str:
    """Runs of the same name (other seeds) side by side: mean accuracy of the
    last 3 rounds per seed and their mean, with the traffic of the first."""
    groups: dict[str, list[dict]] = {}
    for s in summaries:
        groups.setdefault(s["name"], []).append(s)
    seeds = sorted({s["config"]["seed"] if "config" in s else s.get("seed") for s in summaries}, key=str)
    head = ["run", "method"] + [f"last-3 acc % (seed {sd})" for sd in seeds] + \
        ["mean %", "total MB", "ratio vs FedAvg"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in groups.items():
        by_seed = {(r["config"]["seed"] if "config" in r else r.get("seed")): r for r in runs}
        accs = [by_seed[sd]["acc_last3_mean"] for sd in seeds if sd in by_seed]
        first = runs[0]
        ratio = first.get("ratio_vs_fedavg")
        rows.append("| " + " | ".join(
            [name, first["method"]] + [_pct(by_seed[sd]["acc_last3_mean"]) if sd in by_seed else "-" for sd in seeds]
            + [_pct(sum(accs) / len(accs)), f"{(first['bytes_up_total'] + first['bytes_down_total']) / 1e6:.2f}",
               "-" if ratio is None else f"{ratio:.2f}x"]) + " |")
    return "\n".join(rows)


def plot_runs(runs: list[tuple[dict, list[dict]]], out_dir: str | Path) -> list[Path]:
    """accuracy_vs_round.png and accuracy_vs_mb.png (cumulative MB, up + down)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fname, xlabel, xfun, logx in (
        ("accuracy_vs_round.png", "round", lambda r: r["round"], False),
        ("accuracy_vs_mb.png", "cumulative MB (up + down)", lambda r: (r["cum_bytes_up"] + r["cum_bytes_down"]) / 1e6, True),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for summary, rounds in runs:
            pts = [(xfun(r), r["acc"]) for r in rounds if "acc" in r]
            if logx:
                pts = [p for p in pts if p[0] > 0]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=summary["name"])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)
        paths.append(out_dir / fname)
    return paths
