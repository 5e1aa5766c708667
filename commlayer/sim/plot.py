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
