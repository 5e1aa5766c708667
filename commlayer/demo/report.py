"""Tables and the time-to-accuracy plot of the demo and the benchmark."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def time_to_target(r: dict[str, Any]) -> float | None:
    """Seconds of training until the eval loss first reached the target (None: not reached)."""
    return float(r["reached"]["time_s"]) if r.get("reached") else None


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over repeats per configuration, in first-seen order."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["config"], []).append(r)
    out = []
    for name, rs in by.items():
        ttt = [time_to_target(r) for r in rs]
        hit = [t for t in ttt if t is not None]
        out.append({
            "config": name, "label": rs[0]["label"], "runs": len(rs), "reached_runs": len(hit),
            "time_to_target_s": statistics.median(hit) if len(hit) * 2 > len(rs) else None,
            "elapsed_s": statistics.median(r["time_s"] for r in rs),
            "s_per_step": statistics.median(r["s_per_step"] for r in rs),
            "bytes_per_step": statistics.median(r["bytes_sent"] / max(r["steps"], 1) for r in rs),
            "steps": statistics.median(r["steps"] for r in rs),
            "final_loss": statistics.median(r["final_loss"] for r in rs),
            "final_acc": statistics.median(r["final_acc"] for r in rs),
            "target_loss": rs[0]["target_loss"],
        })
    return out


def speedup(row: dict[str, Any], base: dict[str, Any]) -> str:
    """Time-to-target ratio base/row; a lower bound ('>=') when the baseline did not reach it."""
    t, b = row["time_to_target_s"], base["time_to_target_s"]
    if t is None:
        return "-"
    if b is None:
        return f">={base['elapsed_s'] / t:.1f}x"
    return f"{b / t:.1f}x"


def format_table(rows: list[dict[str, Any]], base_config: str) -> str:
    """The summary table; speed-up is relative to ``base_config``."""
    base = next((r for r in rows if r["config"] == base_config), rows[0])
    lines = [f"{'configuration':<48}{'s/step':>8}{'MB/step':>9}{'to target':>11}{'final loss':>11}{'final acc':>10}{'speed-up':>10}"]
    for r in rows:
        ttt = r["time_to_target_s"]
        tt = f"{ttt:.1f}s" if ttt is not None else f">{r['elapsed_s']:.0f}s"
        lines.append(f"{r['label'][:47]:<48}{r['s_per_step']:>8.3f}{r['bytes_per_step'] / 1e6:>9.3f}{tt:>11}"
                     f"{r['final_loss']:>11.3f}{r['final_acc']:>9.1f}%{speedup(r, base):>10}")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: str, title: str) -> tuple[str, str]:
    """Eval loss and accuracy against training time, one line per configuration (first repeat).

    Draws ``path`` (PNG) with matplotlib (the ``bench`` extra). Without it, writes the same plot as
    SVG next to it instead (``x.png`` -> ``x.svg``), so a plain install still gets a picture.

    Returns:
        (the path written, a note for the user or "").
    """
    try:
        import matplotlib
    except ImportError:
        from commlayer.demo.svgplot import write_svg

        svg = str(Path(path).with_suffix(".svg"))
        write_svg(runs, svg, title)
        return svg, f"matplotlib is not installed, so no PNG (pip install 'commlayer[bench]' for it); drew {svg} instead"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    seen = set()
    for r in runs:
        if r["config"] in seen:
            continue
        seen.add(r["config"])
        ts = [max(c["time_s"], 1e-2) for c in r["curve"]]
        a1.plot(ts, [c["loss"] for c in r["curve"]], marker="o", ms=2, label=r["label"])
        a2.plot(ts, [c["acc"] for c in r["curve"]], marker="o", ms=2, label=r["label"])
    if runs:
        a1.axhline(runs[0]["target_loss"], color="grey", ls=":", label="target loss")
    for ax, yl in ((a1, "eval loss"), (a2, "eval accuracy (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("training time (s, log)")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, ""
