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
    rounds = (
        [json.loads(line) for line in rounds_path.read_text().splitlines() if line.strip()]
        if rounds_path.is_file()
        else []
    )
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
        cells += [
            f"{s['mb_up_per_round']:.3f}",
            f"{s['mb_down_per_round']:.3f}",
            f"{total:.2f}",
            f"{s['up_message_bytes']:,.0f}",
            "-" if ratio is None else f"{ratio:.2f}x",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def seeds_table(summaries: list[dict]) -> str:
    """Runs of the same name (other seeds) side by side: mean accuracy of the
    last 3 rounds per seed and their mean, with the traffic of the first."""
    groups: dict[str, list[dict]] = {}
    for s in summaries:
        groups.setdefault(s["name"], []).append(s)
    seeds = sorted({s["config"]["seed"] if "config" in s else s.get("seed") for s in summaries}, key=str)
    head = ["run", "method"] + [f"last-3 acc % (seed {sd})" for sd in seeds] + ["mean %", "total MB", "ratio vs FedAvg"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in groups.items():
        by_seed = {(r["config"]["seed"] if "config" in r else r.get("seed")): r for r in runs}
        accs = [by_seed[sd]["acc_last3_mean"] for sd in seeds if sd in by_seed]
        first = runs[0]
        ratio = first.get("ratio_vs_fedavg")
        rows.append(
            "| "
            + " | ".join(
                [name, first["method"]]
                + [_pct(by_seed[sd]["acc_last3_mean"]) if sd in by_seed else "-" for sd in seeds]
                + [
                    _pct(sum(accs) / len(accs)),
                    f"{(first['bytes_up_total'] + first['bytes_down_total']) / 1e6:.2f}",
                    "-" if ratio is None else f"{ratio:.2f}x",
                ]
            )
            + " |"
        )
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
        (
            "accuracy_vs_mb.png",
            "cumulative MB (up + down)",
            lambda r: (r["cum_bytes_up"] + r["cum_bytes_down"]) / 1e6,
            True,
        ),
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


# ---- frontier: seeded sweeps at convergence ---------------------------------------------
def _group_runs(results: Path) -> dict[str, list[tuple[dict, list[dict]]]]:
    """``results/runs/<variant>-s<seed>/`` grouped by variant (finished runs only)."""
    groups: dict[str, list] = {}
    for d in sorted((results / "runs").glob("*-s*")):
        if (d / "summary.json").is_file():
            summary, rounds = load_run(d)
            groups.setdefault(summary["name"], []).append((summary, rounds))
    return groups


def frontier_rows(results: Path, reference: str = "fedavg") -> list[dict]:
    """One row per variant: accuracy at convergence (mean of the last 10
    rounds) as mean and spread over seeds, total traffic and its ratio."""
    import numpy as np

    rows = []
    for name, runs in _group_runs(Path(results)).items():
        # personalised methods (FedLoRA) are judged on each client's own held-out data
        key = "personal_last10_mean" if "personal_last10_mean" in runs[0][0] else "acc_last10_mean"
        accs = np.array([s[key] for s, _ in runs])
        total = np.array([(s["bytes_up_total"] + s["bytes_down_total"]) for s, _ in runs], dtype=float)
        ratios = [s["ratio_vs_fedavg"] for s, _ in runs if s["ratio_vs_fedavg"]]
        s0 = runs[0][0]
        m = s0["config"]["method"]
        rows.append(
            {
                "name": name,
                "method": s0["method"],
                "transport": s0.get("transport", m.get("transport", "delta" if s0["method"] == "stc" else "weights")),
                "seeds": [s["config"]["seed"] for s, _ in runs],
                "rounds": [s["rounds"] for s, _ in runs],
                "acc_mean": float(accs.mean()),
                "acc_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
                "acc_min": float(accs.min()),
                "acc_max": float(accs.max()),
                "accs": accs.tolist(),
                "flat": sum(bool(s["personal_flat" if key.startswith("personal") else "flat"]) for s, _ in runs),
                "metric": "personal" if key.startswith("personal") else "global",
                "mb_total": float(total.mean() / 1e6),
                "ratio": float(np.mean(ratios)) if ratios else float("inf"),
                "up_msg_bytes": float(np.mean([s["up_message_bytes"] for s, _ in runs])),
                "personal": [s.get("personal_last10_mean") for s, _ in runs] if "final_acc_personal" in s0 else None,
            }
        )
    ref = next((r for r in rows if r["name"] == reference), None)
    for r in rows:
        r["gap_points"] = 100 * (r["acc_mean"] - ref["acc_mean"]) if ref else None
    return sorted(rows, key=lambda r: r["ratio"])


def frontier_table(rows: list[dict], reference: str = "fedavg") -> str:
    metric = "personal acc" if rows and rows[0].get("metric") == "personal" else "acc"
    head = [
        "run",
        "method",
        "transport",
        f"{metric} % (mean ± sd, last 10 rounds)",
        "per seed",
        f"vs {reference} (points)",
        "flat",
        "rounds",
        "MB up+down",
        "ratio vs FedAvg",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        gap = "-" if r["gap_points"] is None else f"{r['gap_points']:+.2f}"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    r["method"],
                    r["transport"],
                    f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}",
                    " / ".join(f"{100 * a:.1f}" for a in r["accs"]),
                    gap,
                    f"{r['flat']}/{len(r['accs'])}",
                    "/".join(str(n) for n in sorted(set(r["rounds"]))),
                    f"{r['mb_total']:.3f}",
                    f"{r['ratio']:.1f}x" if r["ratio"] != float("inf") else "nothing sent",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def best_within(rows: list[dict], points: float = 1.0, exclude=("fedlora", "local")) -> dict | None:
    """The most compressed run whose mean accuracy is within ``points`` of the reference."""
    ok = [r for r in rows if r["gap_points"] is not None and r["gap_points"] >= -points and r["method"] not in exclude]
    return max(ok, key=lambda r: r["ratio"]) if ok else None


def frontier_report(results: Path, reference: str = "fedavg") -> list[Path]:
    """``table.md``, ``frontier.json`` and the plots (frontier, accuracy vs round
    with the seed band, accuracy vs cumulative MB) of a seeded sweep."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    results = Path(results)
    rows = frontier_rows(results, reference)
    if not rows:
        raise FileNotFoundError(f"{results}/runs holds no finished run")
    best = best_within(rows)
    table = frontier_table(rows, reference)
    if best:
        table += (
            f"\n\nMost compressed within 1 point of {reference}: **{best['name']}**, "
            f"{best['ratio']:.1f}x less traffic, {best['gap_points']:+.2f} points."
        )
    (results / "table.md").write_text(table + "\n")
    (results / "frontier.json").write_text(json.dumps(rows, indent=2))
    paths = [results / "table.md", results / "frontier.json"]

    # FedLoRA's personalised accuracy is not comparable with a global model's: plotted on its own
    comm = [r for r in rows if r["method"] not in ("fedlora", "local")] or rows
    fig, ax = plt.subplots(figsize=(10, 6.5))
    ref_row = next((r for r in rows if r["name"] == reference), None)
    floor = 100 * ref_row["acc_mean"] - 4 if ref_row else None
    markers = "osD^v<>ph*XP"
    for i, r in enumerate(r for r in comm if r["mb_total"] > 0):  # nothing sent: no point on a log axis
        y, lo, hi = 100 * r["acc_mean"], 100 * r["acc_min"], 100 * r["acc_max"]
        label = f"{r['name']} ({r['ratio']:.0f}x, {y:.1f}%)"
        if floor is not None and y < floor:  # far below: a marker on the floor, its value in the legend
            ax.plot(r["mb_total"], floor + 0.15, marker="v", ms=9, ls="none", label=label + " (below)")
            continue
        ax.errorbar(
            r["mb_total"], y, yerr=[[y - lo], [hi - y]], fmt=markers[i % len(markers)], capsize=3, ms=6, label=label
        )
    if ref_row:
        ax.axhline(100 * ref_row["acc_mean"] - 1, color="grey", ls="--", lw=0.8)
        ax.text(ax.get_xlim()[0], 100 * ref_row["acc_mean"] - 0.95, f" {reference} - 1 point", fontsize=7, color="grey")
        ax.set_ylim(floor, 100 * ref_row["acc_mean"] + 1)
    ax.set_xscale("log")
    ax.set_xlabel("total traffic, MB (up + down, whole run, mean over seeds)")
    ax.set_ylabel(
        f"{'personal' if comm[0]['metric'] == 'personal' else 'test'} accuracy at convergence, % "
        "(mean of last 10 rounds)"
    )
    ax.set_title("accuracy vs traffic; bars: min-max over seeds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(results / "frontier.png", dpi=130)
    plt.close(fig)
    paths.append(results / "frontier.png")

    groups = _group_runs(results)
    for fname, xlabel, key, logx in (
        ("accuracy_vs_round.png", "round", "round", False),
        ("accuracy_vs_mb.png", "cumulative MB (up + down)", "mb", True),
    ):
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for r in comm:
            runs = groups[r["name"]]
            n = min(len(rs) for _, rs in runs)
            metric = "acc_personal" if r["metric"] == "personal" else "acc"
            acc = np.array([[x[metric] for x in rs[:n]] for _, rs in runs]) * 100
            if key == "round":
                x = np.arange(1, n + 1)
            else:
                x = np.mean([[(x["cum_bytes_up"] + x["cum_bytes_down"]) / 1e6 for x in rs[:n]] for _, rs in runs], 0)
            (line,) = ax.plot(x, acc.mean(0), lw=1, label=r["name"])
            ax.fill_between(x, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.15)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(
            f"{'personal' if comm[0]['metric'] == 'personal' else 'test'} accuracy, % "
            "(line: mean over seeds; band: min-max)"
        )
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(results / fname, dpi=130)
        plt.close(fig)
        paths.append(results / fname)
    return paths
