#!/usr/bin/env python3
"""Plots of bench results as SVG, with nothing but the standard library.

    bench/plot.py dip DIP.json OUT.svg                 throughput over time, kill marked
    bench/plot.py nodes OUT_PREFIX SMTP.json...        msgs/s, CPU per message and latency p99
                                                       by node count, one line per offered load
    bench/plot.py concurrency OUT_PREFIX SMTP.json     msgs/s and latency by concurrency

SMTP.json files are what `bench smtp` writes (for `nodes`, one per cluster size, from
`bench/scaling.sh --keep DIR`); DIP.json is what `bench dip` writes.
"""
import json
import statistics
import sys
from xml.sax.saxutils import escape

W, H = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 50
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def nice_max(v):
    if v <= 0:
        return 1.0
    step = 10 ** len(str(int(v))) / 10
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * step:
            return m * step
    return v


def line_chart(path, title, xlabel, ylabel, series, vline=None, vlabel="", x_from_zero=True):
    """series: [(label, [(x, y), ...])]; every series shares both axes; y starts at 0, and x
    too unless `x_from_zero` is False (then it spans the points, with a margin)."""
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    if x_from_zero:
        x0, x1 = min(0.0, min(xs)), max(xs) if max(xs) > 0 else 1.0
    else:
        margin = (max(xs) - min(xs)) * 0.1 or 1.0
        x0, x1 = min(xs) - margin, max(xs) + margin
    y1 = nice_max(max(ys))
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x):
        return LEFT + (x - x0) / (x1 - x0) * pw

    def py(y):
        return TOP + ph - y / y1 * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>',
        f'<line x1="{LEFT}" y1="{TOP + ph}" x2="{LEFT + pw}" y2="{TOP + ph}" stroke="black"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + ph}" stroke="black"/>',
    ]
    for i in range(6):
        y = y1 * i / 5
        out.append(f'<line x1="{LEFT}" y1="{py(y)}" x2="{LEFT + pw}" y2="{py(y)}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{py(y) + 4}" text-anchor="end">{y:g}</text>')
    if len(set(xs)) <= 8:
        ticks = sorted(set(xs))
    else:
        step = nice_max(x1 - x0) / 5
        ticks = [x0 + step * i for i in range(6) if x0 + step * i <= x1]
    ticks = [x for x in ticks if x0 <= x <= x1]
    for x in ticks:
        out.append(f'<text x="{px(x)}" y="{TOP + ph + 16}" text-anchor="middle">{x:g}</text>')
    out.append(f'<text x="{LEFT + pw / 2}" y="{H - 12}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(
        f'<text x="16" y="{TOP + ph / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {TOP + ph / 2})">{escape(ylabel)}</text>'
    )
    if vline is not None:
        out.append(f'<line x1="{px(vline)}" y1="{TOP}" x2="{px(vline)}" y2="{TOP + ph}" '
                   f'stroke="#888" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{px(vline) + 4}" y="{TOP + 12}">{escape(vlabel)}</text>')
    for i, (label, pts) in enumerate(series):
        c = COLOURS[i % len(COLOURS)]
        d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{d}" fill="none" stroke="{c}" stroke-width="2"/>')
        if len(pts) <= 12:
            for x, y in pts:
                out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}"/>')
        out.append(f'<text x="{LEFT + 8}" y="{TOP + 14 + 16 * i}" '
                   f'fill="{c}">{escape(label)}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {path}")


def dip(src, dst):
    r = json.load(open(src))
    b = r["bucket_ms"] / 1000.0
    pts = [(i * b, n / b) for i, n in enumerate(r["buckets"][:-1])]
    line_chart(dst, f"SMTP throughput while node {r['killed_node']} of {r['nodes']} is killed "
               f"({r['senders']} senders, 4 KiB)", "seconds", "messages/s per "
               f"{r['bucket_ms']} ms interval", [("stored (250 sent)", pts)],
               vline=r["kill_at_s"], vlabel="kill -9")


def nodes(prefix, files):
    # One line per offered load: as fast as the senders go, or each fixed `--rate`.
    by_load = {}
    for f in files:
        r = json.load(open(f))
        rate = r.get("rate")
        label = f"{rate:g} msgs/s offered" if rate else "saturated"
        by_load.setdefault(label, {}).setdefault(len(r["servers"]), []).append(r["runs"][0])
    # Several runs of one size (rounds): each measure's median.
    series = []
    for label, by_size in sorted(by_load.items()):
        rows = sorted((n, statistics.median(r["msgs_per_sec"] for r in runs),
                       statistics.median(r["cpu_ms_per_msg"] for r in runs),
                       statistics.median(r["p99_ms"] for r in runs))
                      for n, runs in by_size.items())
        series.append((label, rows))
    line_chart(f"{prefix}-throughput.svg", "SMTP 4 KiB, 32 senders, RF 3, one 2-vCPU machine",
               "nodes", "messages/s", [(l, [(n, t) for n, t, _, _ in rows]) for l, rows in series],
               x_from_zero=False)
    line_chart(f"{prefix}-cpu.svg", "CPU of all nodes per stored message", "nodes",
               "CPU ms per message", [(l, [(n, c) for n, _, c, _ in rows]) for l, rows in series],
               x_from_zero=False)
    line_chart(f"{prefix}-latency.svg", "SMTP latency p99 (250 after the due time at a fixed rate)",
               "nodes", "p99 ms", [(l, [(n, p) for n, _, _, p in rows]) for l, rows in series],
               x_from_zero=False)


def concurrency(prefix, src):
    r = json.load(open(src))
    # A size is a byte count, or "spec" (SPECmail2001's distribution), listed last.
    order = lambda s: (isinstance(s, str), 0 if isinstance(s, str) else s)
    runs = sorted(r["runs"], key=lambda x: (order(x["size"]), x["concurrency"]))
    sizes = sorted({x["size"] for x in runs}, key=order)
    label = lambda s: "SPECmail2001 sizes" if isinstance(s, str) else f"{s // 1024} KiB"
    line_chart(f"{prefix}-throughput.svg", f"SMTP throughput: {r['target']}", "concurrent senders",
               "messages/s", [(label(s), [(x["concurrency"], x["msgs_per_sec"]) for x in runs
                                          if x["size"] == s]) for s in sizes])
    line_chart(f"{prefix}-latency.svg", f"SMTP latency p99: {r['target']}", "concurrent senders",
               "p99 ms", [(label(s), [(x["concurrency"], x["p99_ms"]) for x in runs
                                      if x["size"] == s]) for s in sizes])


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    kind, args = sys.argv[1], sys.argv[2:]
    if kind == "dip":
        dip(args[0], args[1])
    elif kind == "nodes":
        nodes(args[0], args[1:])
    elif kind == "concurrency":
        concurrency(args[0], args[1])
    else:
        sys.exit(f"unknown plot {kind!r}\n{__doc__}")
