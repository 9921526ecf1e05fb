#!/bin/busybox sh
# /init of every rig's guest: load the module the ways a user would, check what it reports,
# unload it, power off (or, with rig_mode=builtin, check the report the built-in code made at
# boot). Each check prints "RIG-CHECK <name> ok|FAIL <detail>"; the host side (scripts/rig)
# reads them. rig_expect= (the backend auto must pick) comes from the kernel command line.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null

arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -1; }
expect=$(arg rig_expect)
detail=$(arg rig_detail)
release=$(arg rig_release)
want_hypercall=$(arg rig_hypercall)
want_dmesg=$(arg rig_dmesg)
ko=/pvops_guest.ko
check() { # NAME DETAIL -- CMD...: run CMD (its stdout dropped), print RIG-CHECK NAME ok|FAIL DETAIL
	check_name=$1 check_detail=$2
	if [ "$3" != -- ]; then echo "RIG-CHECK $check_name FAIL (guest-init.sh: check without --)"; return; fi
	shift 3
	if "$@" >/dev/null; then echo "RIG-CHECK $check_name ok $check_detail"; else echo "RIG-CHECK $check_name FAIL $check_detail"; fi
}
# Conditions for check's CMD. DETAIL is computed before CMD runs: neither changes what the other reads.
not() { ! "$@"; }
has() { # [-E] TEXT PATTERN: TEXT matches PATTERN (grep's basic regex; extended with -E)
	if [ "$1" = -E ]; then echo "$2" | grep -qE "$3"; else echo "$1" | grep -q "$2"; fi
}
in_dmesg() { dmesg | grep -qE "$1"; } # PATTERN (extended regex)
loaded() { grep -q '^pvops_guest ' /proc/modules; }
last_dmesg() { dmesg | grep 'pvops_guest:' | tail -n "${1:-1}"; }
refused() { # RC OUT ERROR [DMESG]: insmod failed with ERROR in its output (and DMESG in the last
	# pvops_guest line), and no module is loaded
	[ "$1" != 0 ] && ! loaded && has "$2" "$3" && { [ -z "$4" ] || last_dmesg | grep -q "$4"; }
}
failed_saying() { # RC PATTERN: RC is not 0 and the last pvops_guest line of dmesg matches PATTERN
	[ "$1" != 0 ] && last_dmesg | grep -q "$2"
}
unloaded() { # RC TOTAL: rmmod succeeded, nothing is loaded, and all TOTAL sites were restored
	[ "$1" = 0 ] && ! loaded && dmesg | grep -q "pvops_guest: unload: $2 sites restored byte-exact"
}
loaded_as() { # RC BACKEND: insmod succeeded, sysfs names BACKEND and the self-test passed
	[ "$1" = 0 ] && [ "$(cat /sys/kernel/pvops/backend)" = "$2" ] && grep -q '^ok' /sys/kernel/pvops/selftest
}

all_patched() { [ -n "$1" ] && [ "$1" -gt 0 ] && [ "$1" = "$2" ]; } # PATCHED TOTAL
report() { # read /sys/kernel/pvops and check it: the expected backend, every site patched
	backend=$(cat /sys/kernel/pvops/backend 2>/dev/null)
	hypervisor=$(cat /sys/kernel/pvops/hypervisor 2>/dev/null)
	sites=$(cat /sys/kernel/pvops/sites 2>/dev/null)
	selftest=$(cat /sys/kernel/pvops/selftest 2>/dev/null)
	echo "RIG-SYSFS backend=$backend"
	echo "RIG-SYSFS hypervisor=$hypervisor"
	echo "RIG-SYSFS sites=$sites"
	echo "RIG-SYSFS selftest=$selftest"
	check backend "got '$backend', expected '$expect'" -- [ "$backend" = "$expect" ]
	p=${sites%%/*}; t=${sites#*/}; t=${t%% *}
	check all-sites-patched "$sites" -- all_patched "$p" "$t"
	check selftest "$selftest" -- has "$selftest" '^ok bytes=verified'
	report_line=$(dmesg | grep 'pvops_guest: backend=' | tail -1)
	check dmesg-report "$report_line" -- has "$report_line" "backend=$expect .*sites=$p/$t"
	if [ "$expect" != native ] && [ "$want_hypercall" != none ]; then
		# a real hypercall was made and answered as the hypervisor documents
		check hypercall "$selftest" -- has "$selftest" " hypercall=${want_hypercall:-}"
	fi
	if [ -n "$detail" ]; then
		check detail "want /$detail/" -- has "$report_line" "$detail"
	fi
}

if grep -q 'rig_mode=builtin' /proc/cmdline; then
	# Built into the kernel: the report was made at boot.
	check no-module-file "" -- [ ! -e $ko ]
	report
	echo "RIG-RESULT backend=$backend sites=$p/$t builtin"
	echo "RIG-DONE"
	poweroff -f
fi

# 1. A refused parameter patches nothing and leaves nothing loaded.
out=$(insmod $ko backend=bogus 2>&1); rc=$?
check refuse-unknown-name "$(last_dmesg)" -- refused $rc "$out" 'Invalid argument' "unknown backend 'bogus'"

# 2. A backend whose hypervisor is absent (or that this build lacks) is refused with -ENODEV:
#    every backend the module names in its modinfo (`backends`), but native (step 5) and the
#    expected one. busybox modinfo wants a modules.dep, even for a file path.
mkdir -p "/lib/modules/$(uname -r)" && : >> "/lib/modules/$(uname -r)/modules.dep"
backends=$(modinfo -F backends $ko | head -1)
check backends-listed "modinfo -F backends $ko: '$backends'" -- [ -n "$backends" ]
for b in $backends; do
	case "$b" in native | "$expect") continue ;; esac
	out=$(insmod $ko backend="$b" 2>&1); rc=$?
	check "refuse-$b" "$(last_dmesg)" -- refused $rc "$out" 'No such device'
done

# 3. auto: the expected backend, every site patched and verified, the self-test passed.
insmod $ko; rc=$?
check load-auto "$(last_dmesg)" -- [ $rc = 0 ]
if [ -n "$want_dmesg" ]; then
	check dmesg-message "want /$want_dmesg/: $(dmesg | grep 'pvops_guest: vmi' | tail -1)" -- in_dmesg "$want_dmesg"
fi
report

# The benchmark, when asked for (scripts/bench): root-only debugfs file, JSON back.
if grep -q 'rig_bench=1' /proc/cmdline; then
	mount -t debugfs debugfs /sys/kernel/debug
	bench_t0=$(cut -d' ' -f1 /proc/uptime)
	echo run > /sys/kernel/debug/pvops/bench; rc=$?
	bench_t1=$(cut -d' ' -f1 /proc/uptime)
	if [ -n "$(arg rig_pv)" ]; then
		# its raw paths are ring-0 instructions: refused in a deprivileged kernel, no fault
		check bench-refused "$(last_dmesg)" -- failed_saying $rc 'not available in a Xen PV domain'
	else
		# every row's paths, the whole table several times (bench.rs); the uptime it took
		check bench "ran from ${bench_t0}s to ${bench_t1}s of uptime" -- [ $rc = 0 ]
		echo RIG-BENCH-BEGIN
		cat /sys/kernel/debug/pvops/bench
		echo RIG-BENCH-END
	fi
fi

# 4. Unload restores every site byte for byte (the module verifies each one after writing).
rmmod pvops_guest; rc=$?
check unload "$(last_dmesg 2)" -- unloaded $rc "$t"
check sysfs-removed "" -- [ ! -d /sys/kernel/pvops ]
if [ -n "$release" ]; then
	check released "$(last_dmesg)" -- has -E "$(dmesg | grep 'unload: backend' | tail -1)" "$release"
fi

# 5. Forcing native works wherever the kernel runs in ring 0; a Xen PV kernel (deprivileged)
#    refuses it. A second load after unload patches again.
if [ -n "$(arg rig_pv)" ]; then
	out=$(insmod $ko backend=native 2>&1); rc=$?
	check refuse-native "$(last_dmesg)" -- refused $rc "$out" 'No such device' 'runs deprivileged'
	insmod $ko; rc=$?
	check reload-auto "$(cat /sys/kernel/pvops/selftest 2>&1)" -- loaded_as $rc "$expect"
else
	insmod $ko backend=native; rc=$?
	check load-native "$(cat /sys/kernel/pvops/selftest 2>&1)" -- loaded_as $rc native
fi
rmmod pvops_guest
check no-fault "$(dmesg | grep -E 'Oops|general protection|BUG:' | head -1)" -- not in_dmesg 'Oops|general protection|BUG:'

echo "RIG-RESULT backend=$backend sites=$p/$t"
echo "RIG-DONE"
poweroff -f
