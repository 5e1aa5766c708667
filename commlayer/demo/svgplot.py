"""A dependency-free SVG version of the demo's time-to-accuracy plot (used when matplotlib is absent)."""

from __future__ import annotations

import math
from typing import Any, Sequence
from xml.sax.saxutils import escape

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
W, H, PAD = 480, 320, 48


def _panel(x0: int, series: Sequence[tuple[str, list[float], list[float]]], ylabel: str, hline: float | None) -> list[str]:
    xs = [math.log10(max(x, 1e-2)) for _, xv, _ in series for x in xv] or [0.0, 1.0]
    ys = [y for _, _, yv in series for y in yv] + ([hline] if hline is not None else []) or [0.0, 1.0]
    lox, hix = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    loy, hiy = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def px(x: float) -> float:
        return x0 + PAD + (math.log10(max(x, 1e-2)) - lox) / (hix - lox) * (W - 2 * PAD)

    def py(y: float) -> float:
        return H - PAD - (y - loy) / (hiy - loy) * (H - 2 * PAD)

    out = [f'<rect x="{x0 + PAD}" y="{PAD}" width="{W - 2 * PAD}" height="{H - 2 * PAD}" fill="none" stroke="#999"/>',
           f'<text x="{x0 + W / 2}" y="{H - 12}" text-anchor="middle" font-size="11">training time (s, log)</text>',
           f'<text x="{x0 + 14}" y="{H / 2}" font-size="11" transform="rotate(-90 {x0 + 14} {H / 2})" text-anchor="middle">{escape(ylabel)}</text>',
           f'<text x="{x0 + PAD}" y="{H - PAD + 14}" font-size="9">{10 ** lox:.2g}</text>',
           f'<text x="{x0 + W - PAD}" y="{H - PAD + 14}" font-size="9" text-anchor="end">{10 ** hix:.2g}</text>',
           f'<text x="{x0 + PAD - 4}" y="{py(loy)}" font-size="9" text-anchor="end">{loy:.3g}</text>',
           f'<text x="{x0 + PAD - 4}" y="{py(hiy) + 8}" font-size="9" text-anchor="end">{hiy:.3g}</text>']
    if hline is not None:
        out.append(f'<line x1="{x0 + PAD}" x2="{x0 + W - PAD}" y1="{py(hline):.1f}" y2="{py(hline):.1f}" stroke="grey" stroke-dasharray="3,3"/>')
    for i, (_, xv, yv) in enumerate(series):
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xv, yv))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{_COLORS[i % len(_COLORS)]}" stroke-width="1.5"/>')
    return out


def write_svg(runs: list[dict[str, Any]], path: str, title: str) -> None:
    """Eval loss and accuracy against training time, one line per configuration (first repeat)."""
    seen: set[str] = set()
    loss, acc = [], []
    for r in runs:
        if r["config"] in seen:
            continue
        seen.add(r["config"])
        ts = [c["time_s"] for c in r["curve"]]
        loss.append((r["label"], ts, [c["loss"] for c in r["curve"]]))
        acc.append((r["label"], ts, [c["acc"] for c in r["curve"]]))
    target = runs[0]["target_loss"] if runs else None
    legend = [f'<text x="{2 * W + 8}" y="{PAD + 14 * i}" font-size="10" fill="{_COLORS[i % len(_COLORS)]}">{escape(name)}</text>'
              for i, (name, _, _) in enumerate(loss)]
    body = _panel(0, loss, "eval loss", target) + _panel(W, acc, "eval accuracy (%)", None) + legend
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W + 260}" height="{H}" font-family="sans-serif">'
           f'<text x="{W}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>' + "".join(body) + "</svg>\n")
    with open(path, "w") as f:
        f.write(svg)
