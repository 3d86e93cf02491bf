"""Draws bench/soak.jsonl as an SVG of three panels over time: resident memory, delivery
latency (p50 and p99) and throughput (stories acknowledged and received per second), with the
script's events (reloads, the restart) as vertical lines. No plotting library: plain SVG."""
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
samples = [r for r in rows if r.get("scenario") == "soak"]
out = sys.argv[2]
W, H, PAD, GAP = 900, 200, 60, 40
t_max = max((r["t"] for r in samples), default=1) or 1
panels = [
    ("resident memory, MB", [("rss_mb", "#1f77b4")]),
    ("delivery latency, ms (p50, p99)", [("p50_ms", "#2ca02c"), ("p99_ms", "#d62728")]),
    ("stories per second (acknowledged, received by 10 readers / 10)", [("acked_per_s", "#9467bd"), ("received_per_s", "#ff7f0e")]),
]
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{len(panels) * (H + GAP) + GAP}" '
       f'font-family="sans-serif" font-size="12">',
       f'<rect width="100%" height="100%" fill="white"/>']
for i, (title, series) in enumerate(panels):
    top = GAP + i * (H + GAP)
    values = []
    for key, _ in series:
        for r in samples:
            v = r.get(key)
            if v is not None and v >= 0:
                values.append(v / 10 if key == "received_per_s" else v)
    v_max = max(values, default=1) * 1.1 or 1
    x = lambda t: PAD + (W - 2 * PAD) * t / t_max
    y = lambda v: top + H - H * v / v_max
    svg.append(f'<text x="{PAD}" y="{top - 8}">{title}</text>')
    svg.append(f'<rect x="{PAD}" y="{top}" width="{W - 2 * PAD}" height="{H}" fill="none" stroke="#999"/>')
    for frac in (0, 0.5, 1):
        v = v_max * frac
        svg.append(f'<text x="{PAD - 6}" y="{y(v) + 4}" text-anchor="end">{v:.0f}</text>')
    for r in samples:
        for e in r.get("events", []):
            colour = "#d62728" if e == "restart" else "#bbb"
            svg.append(f'<line x1="{x(r["t"]):.1f}" y1="{top}" x2="{x(r["t"]):.1f}" y2="{top + H}" stroke="{colour}" stroke-dasharray="3,3"/>')
    for key, colour in series:
        pts = [(x(r["t"]), y((r[key] / 10) if key == "received_per_s" else r[key])) for r in samples
               if r.get(key) is not None and r[key] >= 0]
        if pts:
            path = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
            svg.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        svg.append(f'<text x="{W - PAD}" y="{top - 8 - 14 * series.index((key, colour))}" text-anchor="end" fill="{colour}">{key}</text>')
    if i == len(panels) - 1:
        for m in range(0, int(t_max / 60) + 1, max(1, int(t_max / 60 / 12))):
            svg.append(f'<text x="{x(m * 60):.1f}" y="{top + H + 16}" text-anchor="middle">{m} min</text>')
svg.append("</svg>")
open(out, "w").write("\n".join(svg))
