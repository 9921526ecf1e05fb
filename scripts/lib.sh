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

# scripts/rig [--bench|--builtin|--debug] NAME, counted for a summary: a line in the caller's
# `summary` array (the rig's last line), one more in its `passed` or `failed`. A rig whose guest
# hung (RIG-TIMEOUT in its log: the nested emulation here, seen about once in ten nested boots,
# can stall an L2 guest before it reaches the checks) is booted once more, and the summary says
# so; a rig whose checks ran and failed is not. Needs the caller's $here and $top.
run_rig() {
  local log=$top/target/rigs/${*: -1} note="" ok=0
  [[ " $* " != *" --builtin "* ]] || log=$log-builtin
  [[ " $* " != *" --debug "* ]] || log=$log-debug
  mkdir -p "$top/target"
  "$here/rig" "$@" > "$top/target/rig.out" && ok=1
  if [ $ok = 0 ] && grep -q '^RIG-TIMEOUT' "$log.log" 2>/dev/null; then
    say "rig $*: the guest hung (RIG-TIMEOUT); booting it once more"
    note="  (booted twice: the first guest hung)"
    "$here/rig" "$@" > "$top/target/rig.out" && ok=1
  fi
  if [ $ok = 1 ]; then
    passed=$((passed + 1)); summary+=("$(tail -1 "$top/target/rig.out")$note")
  else
    failed=$((failed + 1)); summary+=("$(tail -1 "$top/target/rig.out")$note  <- FAILED (see target/rigs/)")
  fi
}
