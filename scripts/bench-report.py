#!/usr/bin/env python3
"""Usage: bench-report.py [--check] [FOLDER]   (--check: exit 1 if a control row disagrees)

Turn target/pvops-bench/*.json into report.md (Markdown tables) and report.svg (op x path,
one panel per rig, log scale). No dependencies beyond the standard library.

Rig files come from the in-guest benchmark (guest-kmod/bench.rs): TSC cycles per 100 ops, every
path measured `runs` times in one boot by the same C loop (linux_peer.c), each run's value the
median of `samples` loops minus the empty loop's median. host.json comes from the host benchmark
(criterion, converted by scripts/bench with a measured TSC rate).

Rules (the same for every table):
  - a value is the median of the runs, with the lowest and highest run; a value below the rig's
    resolution (the empty loop's spread) is printed as `< x`, never as 0 or a negative;
  - a ratio is the median of the per-run ratios (both paths of a run measured minutes apart at
    most), with their lowest and highest; none where either side is below the resolution (an
    upper bound `< x` where only the numerator is); on the host (one criterion run) the ratio of
    the medians, bounded by their confidence intervals;
  - a goal `ratio <= g` is met when every run's ratio is <= g, missed when every run's is > g,
    undecided otherwise; `= 1 within noise` is met when the two paths' run ranges meet
    (within one resolution), missed otherwise;
  - control rows (same bytes on the pvops and Linux paths: the inline site holds the native
    bytes Linux's site holds) must agree the same way; if one does not, the rig's table is
    printed with a warning and no ratios: the harness, not the code, would be what differs.
"""
import html
import json
import math
import os
import sys

PATHS = ["raw", "inline", "direct", "indirect", "linux", "linux_indirect"]
COLORS = {"raw": "#444444", "inline": "#1b9e77", "direct": "#66a61e", "indirect": "#e6ab02",
          "linux": "#d95f02", "linux_indirect": "#e7298a"}


def fmt(v):
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"


def load(folder):
    rigs = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                doc = json.load(f)
            if "ops" in doc:  # a benchmark's table, nothing else
                rigs[name[:-5]] = doc
    return rigs


class Rig:
    """One rig's document with its resolution (cycles per op)."""

    def __init__(self, name, doc):
        self.name, self.doc = name, doc
        self.host = "resolution" not in doc
        self.res = doc.get("resolution", 0) / 100.0

    def runs(self, o, p):
        """A path's per-run values in cycles per op (None: no such path)."""
        s = o.get(p)
        if s is None:
            return None
        if "runs" in s:
            return [v / 100.0 for v in s["runs"]]
        return None

    def stat(self, o, p):
        """(median, low, high) in cycles per op, or None."""
        s = o.get(p)
        if s is None:
            return None
        if "runs" in s:
            return s["median"] / 100.0, s["min"] / 100.0, s["max"] / 100.0
        return s["median"] / 100.0, s["ci_lo"] / 100.0, s["ci_hi"] / 100.0

    def cell(self, o, p):
        st = self.stat(o, p)
        if st is None:
            return "–"
        m, lo, hi = st
        if not self.host and m < self.res:
            return f"< {fmt(self.res)}"
        return f"{fmt(m)} [{fmt(lo)}–{fmt(hi)}]"

    def ratio(self, o, a, b):
        """(median, low, high) of the per-run ratios a/b, or None."""
        ra, rb = self.runs(o, a), self.runs(o, b)
        if ra is None or rb is None:
            sa, sb = self.stat(o, a), self.stat(o, b)
            if self.host and sa and sb and sb[1] > 0:
                # one criterion run: the ratio of the medians, bounded by their intervals
                return sa[0] / sb[0], sa[1] / sb[2], sa[2] / sb[1]
            return None
        if min(rb) < self.res or min(rb) <= 0:
            return None
        if max(ra) < self.res:
            # a below the resolution in every run: only an upper bound
            return 0.0, 0.0, self.res / min(rb)
        if min(ra) < self.res:
            return None
        rs = sorted(x / y for x, y in zip(ra, rb))
        return rs[len(rs) // 2], rs[0], rs[-1]

    def agree(self, o, a, b):
        """Whether paths a and b measure the same within the noise: their run ranges meet,
        within one resolution. None if either is missing."""
        sa, sb = self.stat(o, a), self.stat(o, b)
        if sa is None or sb is None:
            return None
        gap = max(sa[1], sb[1]) - min(sa[2], sb[2])
        return gap <= max(self.res, 0)

    def controls(self):
        """[(op, agrees, ratio)] for the control rows."""
        out = []
        for o in self.doc["ops"]:
            if o.get("control"):
                out.append((o["op"], self.agree(o, "inline", "linux"), self.ratio(o, "inline", "linux")))
        return out

    def controls_ok(self):
        return all(ok for _, ok, _ in self.controls())


def rtxt(r):
    if r is None:
        return "–"
    m, lo, hi = r
    if m == 0.0 and lo == 0.0:
        return f"< {hi:.2g}"
    return f"{m:.2f} [{lo:.2f}–{hi:.2f}]"


def verdict_le(r, goal):
    if r is None:
        return "no figure"
    _, lo, hi = r
    if hi <= goal:
        return "met"
    if lo > goal:
        return "missed"
    return "undecided (the spread straddles the goal)"


def pvops_path(o):
    return "inline" if "inline" in o else "direct"


def table(rig):
    d, out = rig.doc, []
    meta = d.get("meta", {})
    out.append(f"### {rig.name}\n")
    if rig.host:
        out.append(f"{meta.get('where', '')} Backend `{d.get('backend')}`. {meta.get('unit_note', '')} "
                   "Each cell: criterion's median [its 95 % confidence interval of the median], "
                   "TSC cycles per op.\n")
    else:
        out.append(f"{meta.get('where', '')} Backend `{d.get('backend')}`; {d.get('reps')} ops per "
                   f"loop, {d.get('samples')} loops per path and run, {d.get('runs')} runs of the whole "
                   "table in one boot. Each cell: TSC cycles per op, the median of the runs "
                   "[lowest–highest run], each run's value the median loop minus the empty loop's; "
                   f"resolution (the empty loop's spread) {fmt(rig.res)} cycles per op. Paths costing "
                   f"over {d.get('slow_cycles', 0)} cycles per op (VM exits) loop {d.get('reps_slow')} ops, "
                   "against the empty loop of the same length. "
                   f"{d.get('bench_sites')} benchmark call sites, patched by the pvops engine.\n")
    if meta.get("note"):
        out.append(f"**{meta['note']}**\n")
    ok = rig.host or rig.controls_ok()
    if not rig.host:
        cs = rig.controls()
        if cs:
            out.append("Control rows (the same bytes on the pvops and Linux paths), inline÷linux: " +
                       "; ".join(f"{op} {rtxt(r) if r else 'both < ' + fmt(rig.res) if a else rtxt(r)}"
                                 f" {'agrees' if a else '**DISAGREES**'}" for op, a, r in cs) + ".\n")
        else:
            out.append("No control row on this rig (no site holds the native bytes Linux's does).\n")
        if not ok:
            out.append("> **Warning: a control row disagrees beyond the noise.** Identical bytes did not "
                       "measure the same, so the harness and not the code may be what differs: the "
                       "table is printed without ratios and is not a comparison.\n")
    present = [p for p in PATHS if any(p in o for o in d["ops"])]
    ratios = ["inline÷raw", "pvops÷linux", "indirect÷linux_indirect"] if ok else []
    out.append("| op | " + " | ".join(present + ratios) + " | Linux's path |")
    out.append("|---|" + "---|" * (len(present) + len(ratios) + 1))
    for o in d["ops"]:
        cells = [rig.cell(o, p) for p in present]
        if ok:
            r1 = rig.ratio(o, "inline", "raw")
            kind = o.get("linux_kind", "pv")
            r2 = rig.ratio(o, pvops_path(o), "linux") if kind == "pv" else None
            r3 = rig.ratio(o, "indirect", "linux_indirect")
            c2 = rtxt(r2) if kind == "pv" else "– (no pv op)"
            if o.get("control"):
                c2 = f"{rtxt(rig.ratio(o, 'inline', 'linux'))} (control)"
            cells += [rtxt(r1), c2, rtxt(r3)]
        note = o.get("linux_note") or ""
        if o.get("sites"):
            note += f" · our sites: {', '.join(o['sites'])}"
        if o.get("control"):
            note += " · **control**"
        out.append(f"| {o['op']} | " + " | ".join(cells) + f" | {note} |")
    load_ = d.get("load")
    if load_:
        out.append(f"\nModule load: detect {load_['detect']} cycles, select {load_['select']}, "
                   f"patch {load_['patch']} for the module's {load_['sites']} sites "
                   f"({load_['patch_per_site']} per site, stop_machine and the text alias included).\n")
    return "\n".join(out)


def find(d, op):
    return next((o for o in d["ops"] if o["op"] == op), None)


def headline(rigs):
    """The goals, per rig, with their verdicts."""
    out = ["## Goals\n",
           "Per rig: the ratio (median of the runs' ratios [lowest–highest]) and the verdict; a goal is "
           "met or missed only when every run is on the same side of it.\n",
           "| rig | backend | controls | irq_disable inline÷raw (= 1) | sched_clock pvops÷linux (≤ 1) "
           "| save_fl indirect÷linux_indirect (≤ 1) | hypercall direct÷raw (≤ 1.02) |",
           "|---|---|---|---|---|---|---|"]
    for name, rig in rigs.items():
        d = rig.doc
        if rig.host:
            continue
        ok = rig.controls_ok()
        cs = rig.controls()
        ctl = ("agree" if ok else "**disagree**") if cs else "none"
        if not ok:
            out.append(f"| {name} | {d['backend']} | {ctl} | – | – | – | – |")
            continue
        cells = []
        o = find(d, "irq.irq_disable")
        if o and "inline" in o:
            r = rig.ratio(o, "inline", "raw")
            a = rig.agree(o, "inline", "raw")
            cells.append(f"{rtxt(r) if r else 'both < ' + fmt(rig.res)} {'met' if a else 'missed'}")
        else:
            cells.append("– (not inlined)")
        o = find(d, "timer.sched_clock")
        r = rig.ratio(o, pvops_path(o), "linux") if o else None
        cells.append(f"{rtxt(r)} {verdict_le(r, 1.0)}")
        o = find(d, "irq.save_fl")
        r = rig.ratio(o, "indirect", "linux_indirect") if o else None
        cells.append(f"{rtxt(r)} {verdict_le(r, 1.0)}")
        o = find(d, "cpu.hypercall")
        r = rig.ratio(o, "direct", "raw") if o and "raw" in o else None
        cells.append(f"{rtxt(r)} {verdict_le(r, 1.02)}" if r else "– (no raw hypercall)")
        out.append(f"| {name} | {d['backend']} | {ctl} | " + " | ".join(cells) + " |")
    for name, rig in rigs.items():
        if not rig.host:
            continue
        d, parts = rig.doc, []
        o = find(d, "irq.save_fl")
        if o and "inline" in o:
            parts.append(f"save_fl inline÷raw {rtxt(rig.ratio(o, 'inline', 'raw'))}")
        o = find(d, "cpu.hypercall")
        if o and "raw" in o:
            r = rig.ratio(o, "direct", "raw")
            parts.append(f"hypercall direct÷raw {rtxt(r)} {verdict_le(r, 1.02)}")
        out.append(f"\n{name} (criterion's medians, bounded by their 95 % intervals): " + "; ".join(parts) + ".")
    out.append("")
    out.append("Every other pvops÷linux row (Linux has a pv op; the control rows excluded) against "
               "`≤ 1`, per rig: met / missed / undecided, and the rows missed.\n")
    for name, rig in rigs.items():
        if rig.host or not rig.controls_ok():
            continue
        tally, missed = {"met": 0, "missed": 0, "undecided": 0}, []
        for o in rig.doc["ops"]:
            if o.get("linux_kind") != "pv" or o.get("control"):
                continue
            r = rig.ratio(o, pvops_path(o), "linux")
            if r is None:
                continue
            v = verdict_le(r, 1.0).split()[0]
            tally[v] += 1
            if v == "missed":
                missed.append(f"{o['op']} {r[0]:.2f}")
        out.append(f"- {name}: {tally['met']} met, {tally['missed']} missed, {tally['undecided']} undecided"
                   + (f" (missed: {', '.join(missed)})" if missed else ""))
    return "\n".join(out) + "\n"


def svg(rigs):
    panels = list(rigs.values())
    row_h, top, left, width = 16, 40, 230, 520
    heights = [top + len(r.doc["ops"]) * row_h + 40 for r in panels]
    total_h = int(sum(heights) + 40)
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 220}" height="{total_h}" '
         f'font-family="sans-serif" font-size="11">',
         f'<rect width="100%" height="100%" fill="white"/>']
    y0 = 20
    for rig, h in zip(panels, heights):
        d = rig.doc
        floor = max(rig.res, 0.01)
        vals = [v for o in d["ops"] for p in PATHS if (st := rig.stat(o, p)) for v in st[1:] if v > 0]
        # the axis starts a decade at or below the resolution: what lies under it is noise
        lo = 10 ** math.floor(math.log10(floor if not rig.host else max(min(vals or [0.1]), 0.01)))
        hi = 10 ** math.ceil(math.log10(max(vals))) if vals else 10
        span = math.log10(hi) - math.log10(lo) or 1

        def xs(v):
            return left + width * (math.log10(max(v, lo)) - math.log10(lo)) / span

        warn = "" if rig.host or rig.controls_ok() else " — CONTROL ROWS DISAGREE: not a comparison"
        s.append(f'<text x="10" y="{y0 + 14}" font-size="14" font-weight="bold">{html.escape(rig.name)}: '
                 f'TSC cycles per op (log scale; median and run range; same-run ratios only)'
                 f'{html.escape(warn)}</text>')
        k = lo
        while k <= hi * 1.0001:
            x = xs(k)
            s.append(f'<line x1="{x:.1f}" y1="{y0 + top - 12}" x2="{x:.1f}" y2="{y0 + h - 30}" stroke="#ddd"/>')
            s.append(f'<text x="{x:.1f}" y="{y0 + h - 18}" text-anchor="middle">{k:g}</text>')
            k *= 10
        if not rig.host:
            x = xs(floor)
            s.append(f'<rect x="{left}" y="{y0 + top - 12}" width="{max(x - left, 0):.1f}" '
                     f'height="{h - top - 18}" fill="#f0f0f0"><title>below the resolution '
                     f'({fmt(rig.res)})</title></rect>')
        for i, o in enumerate(d["ops"]):
            y = y0 + top + i * row_h
            label = o["op"] + (" (control)" if o.get("control") else "")
            s.append(f'<text x="{left - 6}" y="{y + 4}" text-anchor="end">{html.escape(label)}</text>')
            for j, p in enumerate(PATHS):
                st = rig.stat(o, p)
                if not st:
                    continue
                m, a, b = st
                yy = y - 5 + j * 2
                s.append(f'<line x1="{xs(a):.1f}" y1="{yy}" x2="{xs(b):.1f}" y2="{yy}" '
                         f'stroke="{COLORS[p]}" stroke-width="1.5"/>')
                below = not rig.host and m < rig.res
                fill = "none" if below else COLORS[p]
                s.append(f'<circle cx="{xs(max(m, floor)):.1f}" cy="{y}" r="4" fill="{fill}" '
                         f'stroke="{COLORS[p]}" opacity="0.85"><title>{p}: {html.escape(rig.cell(o, p))}</title></circle>')
        present = [p for p in PATHS if any(p in o for o in d["ops"])]
        for j, p in enumerate(present):
            ly = y0 + top + j * 16
            s.append(f'<circle cx="{left + width + 60}" cy="{ly}" r="4" fill="{COLORS[p]}"/>'
                     f'<text x="{left + width + 70}" y="{ly + 4}">{p}</text>')
        if not rig.host:
            ly = y0 + top + len(present) * 16
            s.append(f'<circle cx="{left + width + 60}" cy="{ly}" r="4" fill="none" stroke="#444"/>'
                     f'<text x="{left + width + 70}" y="{ly + 4}">below resolution</text>')
        y0 += h
    s.append("</svg>")
    return "\n".join(s)


def main():
    args = sys.argv[1:]
    check = "--check" in args
    args = [a for a in args if a != "--check"]
    folder = args[0] if args else "target/pvops-bench"
    docs = load(folder)
    if not docs:
        sys.exit(f"bench-report: no JSON in {folder}")
    rigs = {name: Rig(name, d) for name, d in docs.items()}
    md = ["# pvops benchmark\n",
          "TSC cycles per operation. Under TCG and in nested rigs the TSC is emulated: only ratios "
          "between paths measured in the same run mean anything. Regenerate: `scripts/bench` (every "
          "rig and the host), or `python3 scripts/bench-report.py target/pvops-bench` over the JSON "
          "files there.\n", headline(rigs)]
    for rig in rigs.values():
        md.append(table(rig))
        md.append("")
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(folder, "report.svg"), "w") as f:
        f.write(svg(rigs))
    print("\n".join(md))
    bad = [r.name for r in rigs.values() if not r.host and not r.controls_ok()]
    if bad:
        print(f"bench-report: control rows disagree on: {', '.join(bad)}", file=sys.stderr)
        if check:
            sys.exit(1)


if __name__ == "__main__":
    main()
