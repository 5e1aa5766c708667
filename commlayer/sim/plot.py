"""Plots of a sweep: step time and energy per device against world size; predicted vs measured; consensus.

Uses matplotlib (a dependency of the CLI's plots, as ``commlayer bench``).
"""

from __future__ import annotations

from typing import Any


def plot_sweep(rows: list[dict[str, Any]], path: str, validation: list[dict[str, Any]] | None = None) -> None:
    """Writes a PNG: step time and energy per device vs nodes per (topology, codec); validation panels if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 + (2 if validation else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in rows:
        series.setdefault(f"{r['topology']} {r['codec']}", []).append((r["nodes"], r["step_time_s"], r["energy_per_device_J"]))
    for key, pts in sorted(series.items()):
        pts.sort()
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=key)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", ms=3, label=key)
    for ax, yl in ((axes[0], "step time (s)"), (axes[1], "energy per device per round (J)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("nodes")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6)
    if validation:
        ax = axes[2]
        xs = [v["measured_s"] for v in validation]
        ys = [v["predicted_s"] for v in validation]
        ax.scatter(xs, ys, s=12)
        lo, hi = min(xs + ys) * 0.8, max(xs + ys) * 1.2
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.plot([lo, hi], [lo * 1.15, hi * 1.15], "k:", lw=0.6)
        ax.plot([lo, hi], [lo / 1.15, hi / 1.15], "k:", lw=0.6)
        for v in validation:
            ax.annotate(f"{v['nodes']} {v['topology']} {v['codec']}", (v["measured_s"], v["predicted_s"]), fontsize=5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured step time (s)")
        ax.set_ylabel("predicted (s); dotted: +-15 %")
        ax = axes[3]
        for v in validation:
            if "consensus_real" in v:
                ax.semilogy(v["consensus_real"], "o", ms=3, label=f"real {v['nodes']} {v['topology']}")
                ax.semilogy(v["consensus_sim"], "-", lw=1, label=f"sim {v['nodes']} {v['topology']}")
        ax.set_xlabel("gossip round")
        ax.set_ylabel("consensus error ||X-mean|| / ||X0-mean||")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_validation(rows: list[dict[str, Any]], path: str) -> None:
    """Predicted vs measured step time, one panel per profile; and gossip consensus error, real vs simulated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = sorted({r["profile"] for r in rows})
    fig, axes = plt.subplots(1, len(profiles) + 1, figsize=(4.6 * (len(profiles) + 1), 4.2))
    marks = {"ring": "o", "tree": "s", "ps": "^", "gossip:ring": "D"}
    colors = {"exact": "#1f77b4", "int8+ef": "#ff7f0e", "topk:ratio=0.01+ef": "#2ca02c"}
    for ax, prof in zip(axes, profiles):
        pts = [r for r in rows if r["profile"] == prof]
        for r in pts:
            ax.scatter(r["measured_s"], r["predicted_s"], marker=marks.get(r["topology"], "x"),
                       color=colors.get(r["codec"], "k"), s=14 + 10 * (r["nodes"] == 8))
        v = [r["measured_s"] for r in pts] + [r["predicted_s"] for r in pts]
        lo, hi = min(v) * 0.7, max(v) * 1.4
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.fill_between([lo, hi], [lo / 1.15, hi / 1.15], [lo * 1.15, hi * 1.15], color="0.85", zorder=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{prof} (4 and 8 ranks)", fontsize=9)
        ax.set_xlabel("measured step time (s)")
        ax.set_ylabel("predicted (s); band: +-15 %")
    for topo, m in marks.items():
        axes[0].scatter([], [], marker=m, color="k", label=topo)
    for codec, c in colors.items():
        axes[0].scatter([], [], marker="o", color=c, label=codec)
    axes[0].legend(fontsize=6)
    ax = axes[-1]
    for r in rows:
        if "consensus_real" in r:
            ax.semilogy(r["consensus_real"], "o", ms=3, label=f"real {r['profile'][:8]} {r['nodes']}")
            ax.semilogy(r["consensus_sim"], "-", lw=1)
    ax.set_xlabel("gossip round (ring graph)")
    ax.set_ylabel("||X - mean|| / ||X0 - mean||  (lines: simulated)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_study(rows: list[dict[str, Any]], path: str) -> None:
    """Fleet study: step time, time to target and energy per device, per (topology, codec), at each size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["nodes"] for r in rows})
    keys = sorted({(r["topology"], r["codec"]) for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    width = 0.8 / max(1, len(sizes))
    for k, n in enumerate(sizes):
        by = {(r["topology"], r["codec"]): r for r in rows if r["nodes"] == n}
        xs = [i + k * width for i in range(len(keys))]
        for ax, field in zip(axes, ("step_time_s", "time_to_target_s", "energy_per_device_J")):
            vals = [by[key].get(field) or 0.0 if key in by else 0.0 for key in keys]
            ax.bar(xs, vals, width=width, label=f"{n} nodes")
    for ax, yl in zip(axes, ("step time (s)", "time to target loss (s)", "energy per device per round (J)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
        ax.set_xticklabels([f"{t}\n{c}" for t, c in keys], rotation=75, fontsize=6)
        ax.set_yscale("log")
        ax.set_ylabel(yl)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
