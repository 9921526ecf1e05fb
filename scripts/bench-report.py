#!/usr/bin/env python3
"""Turn target/pvops-bench/*.json into report.md (a Markdown table) and report.svg (op x path,
one panel per rig, log scale). No dependencies beyond the standard library.

Rig files come from the in-guest benchmark (TSC cycles per 100 ops); host.json from the host
benchmark (criterion, nanoseconds, converted here to TSC cycles with the measured TSC rate).
"""
import html
import json
import math
import os
import sys

PATHS = ["raw", "inline", "direct", "indirect", "linux", "linux_indirect"]
COLORS = {"raw": "#444444", "inline": "#1b9e77", "direct": "#66a61e", "indirect": "#e6ab02",
          "linux": "#d95f02", "linux_indirect": "#e7298a"}


def cyc(stats):
    return stats["median"] / 100.0


def fmt(v):
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def ratio(a, b):
    if a is None or b is None or b <= 0:
        return None
    return a / b


def load(folder):
    rigs = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                rigs[name[:-5]] = json.load(f)
    return rigs


def table(rig, doc):
    out = []
    meta = doc.get("meta", {})
    out.append(f"### {rig}\n")
    out.append(f"{meta.get('where', '')} Backend `{doc.get('backend')}`; "
               f"{doc.get('reps')} ops per sample, {doc.get('samples')} samples, median "
               f"(10th–90th percentile in the JSON); TSC cycles per op, loop overhead subtracted.\n")
    if meta.get("note"):
        out.append(f"**{meta['note']}**\n")
    present = [p for p in PATHS if any(p in o for o in doc["ops"])]
    out.append("| op | " + " | ".join(present) + " | inline÷raw | pvops÷linux | indirect÷linux_indirect |")
    out.append("|---|" + "---|" * (len(present) + 3))
    for o in doc["ops"]:
        vals = {p: cyc(o[p]) for p in present if p in o}
        best = vals.get("inline", vals.get("direct"))
        r1 = ratio(vals.get("inline"), vals.get("raw"))
        r2 = ratio(best, vals.get("linux"))
        r3 = ratio(vals.get("indirect"), vals.get("linux_indirect"))
        cells = [fmt(vals[p]) if p in vals else "–" for p in present]
        rs = [f"{r:.2f}" if r is not None else "–" for r in (r1, r2, r3)]
        out.append(f"| {o['op']} | " + " | ".join(cells) + " | " + " | ".join(rs) + " |")
    load_ = doc.get("load")
    if load_:
        out.append(f"\nModule load: detect {load_['detect']} cycles, select {load_['select']}, "
                   f"patch {load_['patch']} for {load_['sites']} sites "
                   f"({load_['patch_per_site']} per site, stop_machine and the text alias included).\n")
    return "\n".join(out)


def svg(rigs):
    panels = [(r, d) for r, d in rigs.items()]
    row_h, top, left, width = 16, 40, 210, 520
    heights = [top + len(d["ops"]) * row_h * 1.0 + 40 for _, d in panels]
    total_h = int(sum(heights) + 40)
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 200}" height="{total_h}" '
         f'font-family="sans-serif" font-size="11">']
    y0 = 20
    for (rig, d), h in zip(panels, heights):
        vals = [cyc(o[p]) for o in d["ops"] for p in PATHS if p in o and cyc(o[p]) > 0]
        lo = 10 ** math.floor(math.log10(max(min(vals), 0.1))) if vals else 0.1
        hi = 10 ** math.ceil(math.log10(max(vals))) if vals else 10
        span = math.log10(hi) - math.log10(lo) or 1
        xs = lambda v: left + width * (math.log10(max(v, lo)) - math.log10(lo)) / span
        s.append(f'<text x="10" y="{y0 + 14}" font-size="14" font-weight="bold">{html.escape(rig)}: '
                 f'TSC cycles per op (log scale; same-run ratios only)</text>')
        k = lo
        while k <= hi * 1.0001:
            x = xs(k)
            s.append(f'<line x1="{x:.1f}" y1="{y0 + top - 12}" x2="{x:.1f}" y2="{y0 + h - 30}" stroke="#ddd"/>')
            s.append(f'<text x="{x:.1f}" y="{y0 + h - 18}" text-anchor="middle">{k:g}</text>')
            k *= 10
        for i, o in enumerate(d["ops"]):
            y = y0 + top + i * row_h
            s.append(f'<text x="{left - 6}" y="{y + 4}" text-anchor="end">{html.escape(o["op"])}</text>')
            for p in PATHS:
                if p in o:
                    x = xs(cyc(o[p]))
                    s.append(f'<circle cx="{x:.1f}" cy="{y}" r="4" fill="{COLORS[p]}" opacity="0.85">'
                             f'<title>{p}: {fmt(cyc(o[p]))}</title></circle>')
        present = [p for p in PATHS if any(p in o for o in d["ops"])]
        for j, p in enumerate(present):
            ly = y0 + top + j * 16
            s.append(f'<circle cx="{left + width + 60}" cy="{ly}" r="4" fill="{COLORS[p]}"/>'
                     f'<text x="{left + width + 70}" y="{ly + 4}">{p}</text>')
        y0 += h
    s.append("</svg>")
    return "\n".join(s)


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "target/pvops-bench"
    rigs = load(folder)
    if not rigs:
        sys.exit(f"bench-report: no JSON in {folder}")
    md = ["# pvops benchmark\n",
          "Cycles are TSC cycles per operation, medians of one run. Under TCG and in nested rigs "
          "the TSC is emulated: only ratios between paths measured in the same run mean anything.\n"]
    for rig, d in rigs.items():
        md.append(table(rig, d))
        md.append("")
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(folder, "report.svg"), "w") as f:
        f.write(svg(rigs))
    print("\n".join(md))


if __name__ == "__main__":
    main()
