"""The figures of a reliability run as one plain-text table."""

from __future__ import annotations

def _fmt_detect(d: dict) -> str:
    return ", ".join(f"{m} {v:.2f} s" for m, v in d.items() if v is not None) or "-"


def table(res: dict) -> str:
    """The figures of a run as a plain-text table."""
    rows: list[tuple[str, str, str]] = []
    if "kill" in res:
        k = res["kill"]
        rows += [("kill: clean failures", f"{k['clean']}/{k['runs']}", "all"),
                 ("kill: blamed a survivor / other failures", f"{k['misnamed_runs']} / {k['hard_failures']}", "0 / 0"),
                 ("kill: worst detection", _fmt_detect(k["worst_detect_s"]), f"<= {2 * k['heartbeat_s']:.1f} s (2 x heartbeat)"),
                 ("kill: median detection", _fmt_detect(k["median_detect_s"]), ""),
                 ("kill: wall time", f"{k['seconds']:.0f} s", "")]
    for key, label in (("fuzz_decoder", "fuzz decoder"), ("fuzz_decoder_no_deep", "fuzz decoder (no deep nesting)")):
        if key in res:
            f = res[key]
            rows += [(f"{label}: messages", str(f["messages"]), ""),
                     (f"{label}: non-WireError escapes", f"{f['escaped']} {sorted(f['escaped_types'])}", "0"),
                     (f"{label}: slowest call", f"{f['slowest_call_ms']:.1f} ms", "")]
    for key, label in (("fuzz_socket", "fuzz socket"), ("fuzz_socket_deep", "fuzz socket (+2 deep headers)")):
        if key in res:
            f = res[key]
            rows += [(f"{label}: messages", f"{f['messages']} in {f.get('send_s', 0):.0f} s", ""),
                     (f"{label}: crashes / hangs / wrong", f"{f['crashes']} / {f['hangs']} / {f['wrong_results']}", "0 / 0 / 0")]
            if "rss_before_mb" in f:
                rows += [(f"{label}: rejected", f"{f['rejected']} of {f['expected_rejections']}", "all"),
                         (f"{label}: RSS before/peak/after", f"{f['rss_before_mb']} / {f['rss_peak_mb']} / {f['rss_after_mb']} MiB", "bounded"),
                         (f"{label}: fds before/during/after", f"{f['fds_before']} / {f['fds_during']} / {f['fds_after']}", "")]
    if "soak" in res:
        s = res["soak"]
        rows += [("soak: collectives x ranks", f"{s.get('ops', 0)} x {s['world']}", ""),
                 ("soak: mismatches", str(s.get("mismatches")), "0"),
                 ("soak: crashes / hangs", f"{s['crashes']} / {s['hangs']}", "0 / 0")]
        if "threads_before_after" in s:
            rows += [("soak: threads before->after", " ".join(f"{a}->{b}" for a, b in s["threads_before_after"]), "equal"),
                     ("soak: fds before->after", " ".join(f"{a}->{b}" for a, b in s["fds_before_after"]), "equal"),
                     ("soak: RSS MiB before->after", " ".join(f"{a}->{b}" for a, b in s["rss_mb_before_after"]), "bounded"),
                     ("soak: wall time", f"{s['seconds']:.0f} s", "")]
    if "timeouts" in res:
        t = res["timeouts"]
        rows += [("timeouts: kinds ok", f"{t['ok']}/{t['total']}", "all"),
                 ("timeouts: worst (timeout 1 s)", f"{max(v['worst_s'] for v in t['kinds'].values()):.2f} s", f"<= {t['timeout_s'] + t['margin_s']:.0f} s")]
    w = max(len(r[0]) for r in rows) if rows else 10
    v = max(len(r[1]) for r in rows) if rows else 10
    lines = [f"{'figure':<{w}}  {'measured':<{v}}  target", "-" * (w + v + 12)]
    lines += [f"{a:<{w}}  {b:<{v}}  {c}" for a, b, c in rows]
    return "\n".join(lines)
