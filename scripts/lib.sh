# Shared settings for the scripts. Sourced, not run.
# shellcheck shell=bash

# Everything built outside the clone lives here, so a fresh clone reuses a kernel built before.
PVOPS_CACHE=${PVOPS_CACHE:-/var/cache/pvops}
TOOLS=$PVOPS_CACHE/tools
# The kernel must be built (and modules compiled) by Debian's rustc: it ships rust-src.
KRUSTC=${KRUSTC:-/usr/bin/rustc}
KRUSTDOC=${KRUSTDOC:-/usr/bin/rustdoc}
BINDGEN=${BINDGEN:-$TOOLS/bin/bindgen}
KVER_PKG=linux-source-6.12

say() { printf '[pvops] %s\n' "$*" >&2; }
die() { printf '[pvops] error: %s\n' "$*" >&2; exit 1; }
