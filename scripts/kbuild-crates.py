#!/usr/bin/env python3
"""Compile pvops, its backends and their crates.io dependencies with the kernel's own rustc
flags, for linking into the guest module (Linux 6.12 has no multi-crate module build).

Called by the top-level Kbuild with the flags Kbuild uses for a module's Rust object. The
crate graph, source paths, editions and enabled features come from `cargo metadata` on the
workspace's Cargo.lock, so the module is built from exactly the sources `cargo test` checks.
Each crate becomes OUT/lib<name>.rmeta (for --extern) and OUT/<name>.o; all objects are then
joined with `ld -r` into OUT.o.

With --clippy CLIPPY_DRIVER (Kbuild's CLIPPY=1) the workspace's own crates are compiled by
clippy-driver instead, under the lints `cargo clippy -- -D warnings` applies on the host: the
kernel's lint flags are replaced by the workspace's ([workspace.lints] in Cargo.toml) and
warnings are denied. That reaches the code paths only the kernel build compiles
(`--cfg pvops_kernel`). The crates.io dependencies stay with rustc and --cap-lints=allow.

`kbuild-crates.py --print-lints --root ROOT` prints the workspace's lints as rustc flags
(`-Dmissing_docs -Dclippy::undocumented_unsafe_blocks ...`), for the module's own objects.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tomllib

ROOT_CRATE = "pvops-backends"
LEVELS = {"forbid": "-F", "deny": "-D", "warn": "-W", "allow": "-A"}


def run(cmd, **kw):
    r = subprocess.run(cmd, **kw)
    if r.returncode != 0:
        sys.exit(f"kbuild-crates: failed ({r.returncode}): {' '.join(map(shlex.quote, cmd))}")
    return r


def workspace_lints(root):
    """[workspace.lints] of ROOT/Cargo.toml as rustc flags, in Cargo's order (by priority, then
    name: a later flag overrides an earlier one). A table entry's extra keys (check-cfg) are
    Cargo's business and are not passed."""
    with open(os.path.join(root, "Cargo.toml"), "rb") as f:
        tools = tomllib.load(f).get("workspace", {}).get("lints", {})
    lints = []
    for tool, table in tools.items():
        for name, spec in table.items():
            if isinstance(spec, str):
                level, prio = spec, 0
            else:
                level, prio = spec["level"], spec.get("priority", 0)
            lint = name.replace("-", "_")
            lints.append((prio, lint if tool == "rust" else f"{tool}::{lint}", LEVELS[level]))
    return [f"{flag}{lint}" for _, lint, flag in sorted(lints)]


def is_lint_flag(f):
    """-Wfoo, -Dclippy::bar, ... (the kernel passes every lint level in this joined form)."""
    return len(f) > 2 and f[0] == "-" and f[1] in "WADF" and (f[2].islower() or f[2] == "_")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="the pvops checkout")
    ap.add_argument("--print-lints", action="store_true",
                    help="print the workspace's lints as rustc flags and exit")
    ap.add_argument("--out", help="output stem: OUT/ and OUT.o")
    ap.add_argument("--rustc")
    ap.add_argument("--clippy", help="clippy-driver for the workspace's crates (Kbuild CLIPPY=1)")
    ap.add_argument("--ld")
    ap.add_argument("--cfg", action="append", default=[], help="extra --cfg for pvops crates")
    ap.add_argument("flags", nargs=argparse.REMAINDER, help="-- then the kernel's rustc flags")
    a = ap.parse_args()
    if a.print_lints:
        print(" ".join(workspace_lints(a.root)))
        return
    if not (a.out and a.rustc and a.ld):
        ap.error("--out, --rustc and --ld are required")
    flags = [f for f in a.flags if f != "--"]
    # each crate brings its own edition; the kernel's crate-type and emit are replaced below
    flags = [f for f in flags if not f.startswith("--edition")]

    meta = json.loads(run(
        ["cargo", "metadata", "--format-version", "1", "--locked", "--offline",
         "--manifest-path", os.path.join(a.root, "Cargo.toml")],
        capture_output=True, text=True, env={**os.environ, "RUSTC": "rustc"}).stdout)
    pkgs = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = next(p["id"] for p in meta["packages"] if p["name"] == ROOT_CRATE)

    order, seen = [], set()

    def visit(pid):
        if pid in seen:
            return
        seen.add(pid)
        for d in nodes[pid]["deps"]:
            if any(k["kind"] is None for k in d["dep_kinds"]):  # normal deps only
                visit(d["pkg"])
        order.append(pid)

    visit(root)
    out = a.out
    os.makedirs(out, exist_ok=True)
    # a failed run must not leave the previous OUT.o behind for make to take as up to date
    if os.path.exists(f"{out}.o"):
        os.remove(f"{out}.o")
    objs = []
    lints = workspace_lints(a.root)
    local = {p["id"] for p in meta["packages"] if p.get("source") is None}
    for pid in order:
        p, n = pkgs[pid], nodes[pid]
        lib = next(t for t in p["targets"] if "lib" in t["kind"])
        name = lib["name"].replace("-", "_")
        linted = a.clippy and pid in local
        if linted:
            # the host's policy, not the kernel's: clippy's defaults, the workspace's lints and
            # every warning an error (as scripts/test runs cargo clippy)
            cmd = [a.clippy] + [f for f in flags if not is_lint_flag(f)] + lints + ["-Dwarnings"]
        else:
            cmd = [a.rustc] + flags
        cmd += [
            "-Zunstable-options",  # the kernel's JSON target, as Kbuild passes it
            f"--edition={lib.get('edition') or p.get('edition') or '2015'}",
            "--crate-type=rlib", f"--crate-name={name}",
            f"-Cmetadata=pvops-kmod-{name}-{p['version']}",
            f"--emit=obj={out}/{name}.o,metadata={out}/lib{name}.rmeta",
            f"-Ldependency={out}",
        ]
        for feat in n["features"]:
            cmd.append(f'--cfg=feature="{feat}"')
        for d in n["deps"]:
            if any(k["kind"] is None for k in d["dep_kinds"]):
                dname = d["name"]
                cmd.append(f"--extern={dname}={out}/lib{dname}.rmeta")
        if pid in local:
            cmd += [f"--cfg={c}" for c in a.cfg]
        else:
            cmd.append("--cap-lints=allow")
        cmd.append(lib["src_path"])
        # rustc would try (and fail) to join make's jobserver through fds this script closed
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "CARGO_MAKEFLAGS")}
        env["RUSTC_BOOTSTRAP"] = "1"
        if linted:
            # no clippy.toml of the kernel's (its msrv, check-private-items): the workspace's
            # settings, as cargo clippy sees them (the MSRV from rust-version)
            env["CLIPPY_CONF_DIR"] = a.root
            if p.get("rust_version"):
                env["CARGO_PKG_RUST_VERSION"] = p["rust_version"]
        run(cmd, env=env)
        objs.append(f"{out}/{name}.o")
    run([a.ld, "-r", "-o", f"{out}.o"] + objs)


if __name__ == "__main__":
    main()
