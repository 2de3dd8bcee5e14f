#!/usr/bin/env python3
"""Judges and plots a soak run (see scripts/soak.sh); standard library only.

    python3 scripts/plot_rss.py OUT --duration 600 --warmup 30 [--tolerance 10]
        [--server-alive yes|no] [--loadgen-rc N] [--panics N]

Reads OUT/soak.json (loadgen --json), OUT/rss.csv (seconds,rss_kb) and, if present,
OUT/healthz.csv (seconds,connections,slow_consumers_closed,messages_in,deliveries). Times are
seconds since loadgen started. Writes OUT/rss.svg and OUT/summary.md, prints the summary and
exits 1 when a check fails.

The measured window is placed from the end of the run: it ends when sending stops, which is
loadgen's elapsed time minus the drain it needed (about 0.5 s when everything arrived) and
starts --duration seconds earlier; warm-up is the --warmup seconds before it. That is accurate
to about a second, well inside the 10 s sampling step.
"""

import argparse
import csv
import json
import math
import os
import sys


def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    out = []
    for row in rows[1:]:
        try:
            out.append([float(v) for v in row])
        except ValueError:
            continue
    return out


def mib(kb):
    return kb / 1024.0


def nice_ceiling(v):
    if v <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * mag:
            return m * mag
    return 10 * mag


def tick_step(span):
    """A 1, 2 or 5 times a power of ten step giving at most 12 ticks over `span`."""
    mag = 10 ** math.floor(math.log10(span / 12)) if span > 12 else 1.0
    for m in (1, 2, 5, 10):
        if span / (m * mag) <= 12:
            return m * mag
    return 10 * mag


def svg_plot(samples, conns, window, limit_mib, title, path):
    """RSS over time; connections (right axis) when sampled."""
    W, H, L, R, T, B = 900.0, 480.0, 70.0, 80.0, 46.0, 56.0
    xs = [s[0] for s in samples] + [c[0] for c in conns] + [window[1]]
    x_step = tick_step(max(xs + [1.0]))
    x_max = math.ceil(max(xs + [1.0]) / x_step) * x_step
    y_max = nice_ceiling(max([mib(s[1]) for s in samples] + [limit_mib or 0.0, 1.0]) * 1.1)
    c_max = nice_ceiling(max([c[1] for c in conns] + [1.0]) * 1.1)
    px = lambda x: L + x / x_max * (W - L - R)
    py = lambda y: H - B - y / y_max * (H - T - B)
    pc = lambda y: H - B - y / c_max * (H - T - B)
    o = []
    o.append(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W:.0f}" height="{H:.0f}" '
        f'viewBox="0 0 {W:.0f} {H:.0f}" font-family="sans-serif" font-size="12">'
    )
    o.append('<rect width="100%" height="100%" fill="white"/>')
    o.append(
        f'<text x="{(L + W - R) / 2:.1f}" y="24" text-anchor="middle" font-size="15">'
        f"{esc(title)}</text>"
    )
    ws, we = window[0], window[1]
    warm = max(0.0, ws - window[2])
    # Shading: before the measured window (connect + warm-up), and the thirds.
    o.append(
        f'<rect x="{px(0):.1f}" y="{T}" width="{px(ws) - px(0):.1f}" height="{H - T - B}" '
        'fill="#f0f0f0"/>'
    )
    o.append(
        f'<text x="{px(ws / 2):.1f}" y="{T + 14}" text-anchor="middle" fill="#777">'
        "connect + warm-up</text>"
    )
    third = (we - ws) / 3
    for k, name in enumerate(("first third", "middle third", "last third")):
        a = ws + k * third
        o.append(
            f'<line x1="{px(a):.1f}" y1="{T}" x2="{px(a):.1f}" y2="{H - B}" stroke="#999" '
            'stroke-dasharray="4,3"/>'
        )
        o.append(
            f'<text x="{px(a + third / 2):.1f}" y="{T + 14}" text-anchor="middle" '
            f'fill="#777">{name}</text>'
        )
    o.append(
        f'<line x1="{px(we):.1f}" y1="{T}" x2="{px(we):.1f}" y2="{H - B}" stroke="#999" '
        'stroke-dasharray="4,3"/>'
    )
    if warm > 0:
        o.append(
            f'<line x1="{px(warm):.1f}" y1="{T}" x2="{px(warm):.1f}" y2="{H - B}" '
            'stroke="#ccc" stroke-dasharray="2,3"/>'
        )
    for i in range(6):
        v = y_max * i / 5
        y = py(v)
        o.append(
            f'<line x1="{L}" y1="{y:.1f}" x2="{W - R}" y2="{y:.1f}" stroke="#e4e4e4"/>'
            f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>'
        )
        if conns:
            cv = c_max * i / 5
            o.append(
                f'<text x="{W - R + 6}" y="{pc(cv) + 4:.1f}" fill="#2ca02c">{cv:g}</text>'
            )
    for i in range(round(x_max / x_step) + 1):
        v = i * x_step
        o.append(
            f'<text x="{px(v):.1f}" y="{H - B + 18}" text-anchor="middle">{v:.0f}</text>'
        )
    o.append(
        f'<text x="{(L + W - R) / 2:.1f}" y="{H - 14}" text-anchor="middle">'
        "seconds since loadgen started</text>"
    )
    mid = (T + H - B) / 2
    o.append(
        f'<text x="18" y="{mid:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 18 {mid:.1f})">server RSS (MiB)</text>'
    )
    if conns:
        o.append(
            f'<text x="{W - 14}" y="{mid:.1f}" text-anchor="middle" fill="#2ca02c" '
            f'transform="rotate(90 {W - 14} {mid:.1f})">connections (/healthz)</text>'
        )
    o.append(
        f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="none" '
        'stroke="black"/>'
    )
    if limit_mib:
        a = ws + 2 * third
        o.append(
            f'<line x1="{px(a):.1f}" y1="{py(limit_mib):.1f}" x2="{px(we):.1f}" '
            f'y2="{py(limit_mib):.1f}" stroke="#d62728" stroke-dasharray="6,3"/>'
            f'<text x="{px(we) - 4:.1f}" y="{py(limit_mib) - 5:.1f}" text-anchor="end" '
            f'fill="#d62728">limit</text>'
        )
    if conns:
        pts = " ".join(f"{px(t):.1f},{pc(c):.1f}" for t, c in conns)
        o.append(
            f'<polyline fill="none" stroke="#2ca02c" stroke-width="1.5" '
            f'stroke-dasharray="5,2" points="{pts}"/>'
        )
    if samples:
        pts = " ".join(f"{px(t):.1f},{py(mib(kb)):.1f}" for t, kb in samples)
        o.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{pts}"/>')
        for t, kb in samples:
            o.append(f'<circle cx="{px(t):.1f}" cy="{py(mib(kb)):.1f}" r="2.5" fill="#1f77b4"/>')
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--warmup", type=float, required=True)
    ap.add_argument("--tolerance", type=float, default=10.0, help="percent")
    ap.add_argument("--server-alive", default="yes")
    ap.add_argument("--loadgen-rc", type=int, default=0)
    ap.add_argument("--panics", type=int, default=0)
    a = ap.parse_args()

    rss = [(r[0], r[1]) for r in read_csv(os.path.join(a.out, "rss.csv")) if len(r) >= 2]
    hz = read_csv(os.path.join(a.out, "healthz.csv"))
    conns = [(r[0], r[1]) for r in hz if len(r) >= 2]
    report = None
    try:
        with open(os.path.join(a.out, "soak.json")) as f:
            report = json.load(f)
    except (OSError, ValueError):
        pass

    checks = []  # (name, ok, detail)
    checks.append(("loadgen finished", a.loadgen_rc == 0 and report is not None,
                   f"exit {a.loadgen_rc}" + ("" if report else ", no JSON report")))
    checks.append(("server alive at the end", a.server_alive == "yes",
                   "yes" if a.server_alive == "yes" else "no: it crashed or exited"))
    checks.append(("no panics in the server log", a.panics == 0, f"{a.panics}"))

    lines = []
    if report:
        c = report["config"]
        t = report["totals"]
        m = report["measured"]
        lat = m["latency"]
        roles = report.get("roles") or {}
        st = roles.get("stalled", {})
        rc = roles.get("reconnecting", {})
        elapsed = report["elapsed_s"]
        drain_used = 0.5 if report["drained"] else c["drain_s"] + 0.5
        we = max(0.0, elapsed - drain_used)
        ws = max(0.0, we - a.duration)
        faults = t["lost"] + t["duplicates"] + t["order_violations"] + t["misrouted"]
        checks.append((
            "healthy clients lost nothing",
            faults == 0 and t["expected"] > 0,
            f"lost {t['lost']} of {t['expected']}, duplicates {t['duplicates']}, "
            f"order violations {t['order_violations']}, misrouted {t['misrouted']}",
        ))
        k = report["connect"]
        lines += [
            f"- load: {c['clients']} clients in {c['rooms']} rooms, {c['senders']} senders at "
            f"{c['rates'][0]}/s each ({m['offered_msgs_per_s']:.0f} msg/s offered, "
            f"{m['deliveries_per_s']:.0f} deliveries/s), payload {c['payload_bytes']} B, "
            f"warm-up {c['warmup_s']:g} s + {c['duration_s']:g} s measured",
            f"- connected {k['connected']}/{k['attempted']} in {k['total_s']:.1f} s, "
            f"not ready {k['not_ready']}",
            f"- healthy clients: {roles.get('healthy_clients', k['connected'])}; messages sent "
            f"{t['sent']}, deliveries expected {t['expected']}, received {t['received']}, "
            f"lost {t['lost']}, duplicates {t['duplicates']}, order violations "
            f"{t['order_violations']}, misrouted {t['misrouted']}; server errors "
            f"{report['server_errors']}",
            f"- healthy latency (measured window): p50 {lat['p50_us'] / 1000:.2f} / p99 "
            f"{lat['p99_us'] / 1000:.2f} / p99.9 {lat['p999_us'] / 1000:.2f} / max "
            f"{lat['max_us'] / 1000:.2f} ms",
        ]
        if roles:
            reasons = ", ".join(f"{r} x {n}" for r, n in st.get("close_reasons", {}).items())
            lines += [
                f"- stalled clients: {st.get('clients', 0)}; closed by server: "
                f"{st.get('closed_by_server', 0)} ({reasons or 'none'}); still open at the "
                f"end: {st.get('still_open', 0)}",
                f"- reconnecting clients: {rc.get('clients', 0)} every {rc.get('every_s', 0):g} s;"
                f" reconnects {rc.get('reconnects', 0)}, failed {rc.get('failed', 0)}; "
                f"deliveries received {rc.get('received', 0)} (not checked)",
            ]
        if report.get("disconnects"):
            d = ", ".join(f"{r} x {n}" for r, n in report["disconnects"].items())
            lines.append(f"- unexpected disconnects: {d}")
    else:
        # Without the report, fall back to the planned schedule from the first sample.
        ws = a.warmup
        we = ws + a.duration

    # RSS rule.
    third = (we - ws) / 3
    middle = [kb for s, kb in rss if ws + third <= s < ws + 2 * third]
    last = [kb for s, kb in rss if ws + 2 * third <= s <= we]
    limit = None
    if middle and last:
        limit = max(middle) * (1 + a.tolerance / 100)
        growth = (max(last) / max(middle) - 1) * 100
        checks.append((
            "RSS stopped growing after warm-up",
            max(last) <= limit,
            f"max in last third {mib(max(last)):.1f} MiB vs middle third "
            f"{mib(max(middle)):.1f} MiB ({growth:+.1f}%, limit +{a.tolerance:g}%)",
        ))
    else:
        checks.append((
            "RSS stopped growing after warm-up",
            False,
            f"too few samples: {len(middle)} in the middle third, {len(last)} in the last "
            "(the measured window must span at least three sampling steps)",
        ))
    if rss:
        kbs = [kb for _, kb in rss]
        before = [kb for s, kb in rss if s <= ws]
        lines.append(
            f"- server RSS: {mib(kbs[0]):.1f} MiB at start, "
            f"{mib(max(before or kbs[:1])):.1f} MiB max by the end of warm-up, peak "
            f"{mib(max(kbs)):.1f} MiB, {mib(kbs[-1]):.1f} MiB at the end "
            f"({len(rss)} samples)"
        )
    if conns:
        slow = f"; slow consumers closed (server's count): {hz[-1][2]:.0f}" if len(hz[-1]) >= 3 else ""
        lines.append(
            f"- /healthz connections: max {max(c for _, c in conns):.0f}, "
            f"last {conns[-1][1]:.0f}{slow}"
        )
    lines.append(
        f"- measured window placed at {ws:.1f}-{we:.1f} s after loadgen start; "
        f"thirds of {third:.1f} s"
    )

    ok = all(c[1] for c in checks)
    title = f"roomcast soak: server RSS over time ({'PASS' if ok else 'FAIL'})"
    svg_plot(rss, conns, (ws, we, a.warmup), limit and mib(limit), title,
             os.path.join(a.out, "rss.svg"))

    out = [f"## soak: {'PASS' if ok else 'FAIL'}", ""]
    out += [l for l in lines if l]
    out += ["", "| check | result | detail |", "|---|---|---|"]
    out += [f"| {n} | {'PASS' if k else 'FAIL'} | {d} |" for n, k, d in checks]
    table = ["", "| seconds | RSS (MiB) |", "|---:|---:|"]
    table += [f"| {s:.0f} | {mib(kb):.1f} |" for s, kb in rss]
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write("\n".join(out + table) + "\n")
    print("\n".join(out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
