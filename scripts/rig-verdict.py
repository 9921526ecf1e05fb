#!/usr/bin/env python3
"""A rig's verdict, from its serial log (scripts/rig calls this after the guest ran).

The guest (scripts/guest-init.sh) prints its checks as one KTAP document; the module's self-test
is the subtest of the check named `selftest`. This script

- reads that document and the host's own checks (`--host NAME=ok|fail:DETAIL`), and scans the
  whole serial log for faults (`serial-clean`: the guest's dmesg scan cannot see what happens
  after it, nor an L1 hypervisor's messages);
- compares the checks found with the ones the rig expects by name (`--expect`, with `refuse-*`
  standing for one `refuse-B` per backend the module's modinfo names, but native and the expected
  one), and the ones it expects to be n/a (`--na`): a missing check fails the rig, an unexpected
  one too, and a check that cannot fail is never counted as passed;
- writes the KTAP document to OUT.ktap and, where the kernel tree has it, has the kernel's own
  tools/testing/kunit/kunit.py parse read it: its count of passed, failed and skipped tests must
  be ours (`ktap-parsed`).

Prints one line per failure and a summary; exit status 0 only if every expected check held.
"""
import argparse
import glob
import os
import re
import subprocess
import sys

# the faults a kernel engineer looks for: one extended regex, which the guest's dmesg scan
# (scripts/guest-init.sh) reads too
FAULTS = re.compile(open(os.path.join(os.path.dirname(__file__), "faults.ere")).read().strip())
RESULT = re.compile(r"^(ok|not ok) (\d+) (\S+)(?: # SKIP ?(.*))?$")


def ktap_document(log):
    """The last KTAP document in the log, as its lines (None: there is none)."""
    lines = log.split("\n")
    starts = [i for i, l in enumerate(lines) if l == "KTAP version 1"]
    if not starts:
        return None
    doc = []
    for l in lines[starts[-1]:]:
        if l.startswith("RIG-RESULT") or l.startswith("RIG-DONE"):
            break
        doc.append(l)
    return doc


def parse(doc):
    """Top-level results {name: (outcome, detail)} and the selftest subtest's, in KTAP order;
    outcome is ok, fail or na. Diagnostic lines after a result are its detail."""
    top, sub, last = {}, {}, None
    for l in doc:
        indent = l.startswith("    ")
        m = RESULT.match(l.strip())
        if m:
            how = "na" if m.group(4) is not None else ("ok" if m.group(1) == "ok" else "fail")
            target = sub if indent else top
            target[m.group(3)] = (how, m.group(4) or "")
            last = (target, m.group(3)) if not indent else None
        elif l.startswith("# ") and last and not l.startswith("# Subtest"):
            t, n = last
            t[n] = (t[n][0], (t[n][1] + " " + l[2:]).strip())
    return top, sub


def compare(found, expect, na, prefix):
    """What is wrong with the checks `found` ({name: (outcome, detail)}) against the names the rig
    expects and the ones it expects n/a (`na`, names with `prefix`): one line per problem."""
    bad = [f"{prefix}{name}: missing" for name in expect if name not in found]
    for name, (how, detail) in found.items():
        if name not in expect:
            bad.append(f"{prefix}{name}: not expected on this rig")
        if how == "fail":
            bad.append(f"{prefix}{name}: FAIL {detail}".rstrip())
        if (how == "na") != (prefix + name in na):
            want = "n/a" if prefix + name in na else "a check that can fail"
            why = f" ({detail})" if detail else ""
            bad.append(f"{prefix}{name}: {how}{why}, the rig expects {want}")
    return bad


def backend_names(ko):
    try:
        data = open(ko, "rb").read()
    except OSError:
        return []
    m = re.search(rb"\0backends=([^\0]*)\0", data)
    return m.group(1).decode().split() if m else []


def kunit_counts(ktap_file):
    cache = os.environ.get("PVOPS_CACHE", "/var/cache/pvops")
    tools = sorted(glob.glob(f"{cache}/src/linux-*/tools/testing/kunit/kunit.py"))
    if not tools:
        return None
    r = subprocess.run([sys.executable, tools[-1], "parse", ktap_file], capture_output=True, text=True)
    m = re.search(r"Ran (\d+) tests?: passed: (\d+)(?:, failed: (\d+))?(?:, skipped: (\d+))?", r.stdout)
    if not m:
        return ("unparsed", r.stdout[-300:])
    return tuple(int(g or 0) for g in m.groups())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--out", required=True, help="OUT.ktap is written")
    ap.add_argument("--expect", default="", help="expected top-level checks, space-separated")
    ap.add_argument("--selftest", default="", help="expected self-test checks")
    ap.add_argument("--na", default="", help="checks expected n/a (selftest.NAME for the self-test's)")
    ap.add_argument("--backend", required=True, help="the backend auto must select")
    ap.add_argument("--ko", default="", help="the module, for the backend names of refuse-*")
    ap.add_argument("--host", action="append", default=[], help="NAME=ok|fail:DETAIL")
    a = ap.parse_args()

    log = open(a.log, errors="replace").read()
    doc = ktap_document(log)
    bad = []
    top, sub = parse(doc) if doc else ({}, {})
    if doc is None:
        bad.append("no KTAP document in the log (the guest did not get to its end)")

    # host-side checks, appended to the document
    host = {}
    for h in a.host:
        name, _, rest = h.partition("=")
        how, _, detail = rest.partition(":")
        host[name] = ("ok" if how == "ok" else "fail", detail)
    faults = [l for l in log.split("\n") if FAULTS.search(l) and not l.startswith("# ")]
    host["serial-clean"] = ("fail", faults[0][:200]) if faults else ("ok", "")

    expect = []
    for e in a.expect.split():
        if e == "refuse-*":
            names = [n for n in backend_names(a.ko) if n not in ("native", a.backend)]
            if not names:
                bad.append("refuse-*: no backend names in the module's modinfo")
            expect += [f"refuse-{n}" for n in names]
        else:
            expect.append(e)
    expect += list(host)
    na = set(a.na.split())

    found = dict(top, **host)
    bad += compare(found, expect, na, "")
    if "selftest" in top:
        bad += compare(sub, a.selftest.split(), na, "selftest.")

    # the document as written, host checks appended, and the kernel's parser reading it
    n = len(top)
    lines = list(doc or ["KTAP version 1", "1..0"])
    plan = next((i for i, l in enumerate(lines) if re.match(r"^1\.\.\d+$", l)), None)
    for name, (how, detail) in host.items():
        n += 1
        lines.append(("ok" if how == "ok" else "not ok") + f" {n} {name}")
        if detail:
            lines.append("# " + detail)
    if plan is not None:
        lines[plan] = f"1..{n}"
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    leaves = [v for k, v in found.items() if not (k == "selftest" and sub)] + list(sub.values())
    ours = (len(leaves), sum(h == "ok" for h, _ in leaves), sum(h == "fail" for h, _ in leaves),
            sum(h == "na" for h, _ in leaves))
    theirs = kunit_counts(a.out)
    if theirs is None:
        print("ktap-parsed: n/a (no kernel tree with tools/testing/kunit)")
    elif theirs != ours:
        bad.append(f"ktap-parsed: kunit.py parse counts (ran, passed, failed, skipped) {theirs}, ours {ours}")

    for b in bad:
        print(f"  {b}", file=sys.stderr)
    oks = sum(1 for h, _ in leaves if h == "ok")
    nas = sum(1 for h, _ in leaves if h == "na")
    print(f"{oks} checks held, {nas} n/a, {len(bad)} problems (KTAP: {os.path.relpath(a.out)})")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
