#!/usr/bin/env python3
"""Compile pvops, its backends and their crates.io dependencies with the kernel's own rustc
flags, for linking into the guest module (Linux 6.12 has no multi-crate module build).

Called by the top-level Kbuild with the flags Kbuild uses for a module's Rust object. The
crate graph, source paths, editions and enabled features come from `cargo metadata` on the
workspace's Cargo.lock, so the module is built from exactly the sources `cargo test` checks.
Each crate becomes OUT/lib<name>.rmeta (for --extern) and OUT/<name>.o; all objects are then
joined with `ld -r` into OUT.o.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys

ROOT_CRATE = "pvops-backends"


def run(cmd, **kw):
    r = subprocess.run(cmd, **kw)
    if r.returncode != 0:
        sys.exit(f"kbuild-crates: failed ({r.returncode}): {' '.join(map(shlex.quote, cmd))}")
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="the pvops checkout")
    ap.add_argument("--out", required=True, help="output stem: OUT/ and OUT.o")
    ap.add_argument("--rustc", required=True)
    ap.add_argument("--ld", required=True)
    ap.add_argument("--cfg", action="append", default=[], help="extra --cfg for pvops crates")
    ap.add_argument("flags", nargs=argparse.REMAINDER, help="-- then the kernel's rustc flags")
    a = ap.parse_args()
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
    objs = []
    local = {p["id"] for p in meta["packages"] if p.get("source") is None}
    for pid in order:
        p, n = pkgs[pid], nodes[pid]
        lib = next(t for t in p["targets"] if "lib" in t["kind"])
        name = lib["name"].replace("-", "_")
        cmd = [a.rustc] + flags + [
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
        run(cmd, env={**env, "RUSTC_BOOTSTRAP": "1"})
        objs.append(f"{out}/{name}.o")
    run([a.ld, "-r", "-o", f"{out}.o"] + objs)


if __name__ == "__main__":
    main()
