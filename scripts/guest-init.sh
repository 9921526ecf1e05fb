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
check() { # name, condition result (0 = ok), detail
	if [ "$2" = 0 ]; then echo "RIG-CHECK $1 ok $3"; else echo "RIG-CHECK $1 FAIL $3"; fi
}
loaded() { grep -q '^pvops_guest ' /proc/modules; }
last_dmesg() { dmesg | grep 'pvops_guest:' | tail -n "${1:-1}"; }

report() { # read /sys/kernel/pvops and check it: the expected backend, every site patched
	backend=$(cat /sys/kernel/pvops/backend 2>/dev/null)
	hypervisor=$(cat /sys/kernel/pvops/hypervisor 2>/dev/null)
	sites=$(cat /sys/kernel/pvops/sites 2>/dev/null)
	selftest=$(cat /sys/kernel/pvops/selftest 2>/dev/null)
	echo "RIG-SYSFS backend=$backend"
	echo "RIG-SYSFS hypervisor=$hypervisor"
	echo "RIG-SYSFS sites=$sites"
	echo "RIG-SYSFS selftest=$selftest"
	check backend "$( [ "$backend" = "$expect" ]; echo $?)" "got '$backend', expected '$expect'"
	p=${sites%%/*}; t=${sites#*/}; t=${t%% *}
	check all-sites-patched "$( [ -n "$p" ] && [ "$p" -gt 0 ] && [ "$p" = "$t" ]; echo $?)" "$sites"
	check selftest "$(echo "$selftest" | grep -q '^ok bytes=verified'; echo $?)" "$selftest"
	report_line=$(dmesg | grep 'pvops_guest: backend=' | tail -1)
	check dmesg-report "$(echo "$report_line" | grep -q "backend=$expect .*sites=$p/$t"; echo $?)" "$report_line"
	if [ "$expect" != native ] && [ "$want_hypercall" != none ]; then
		# a real hypercall was made and answered as the hypervisor documents
		check hypercall "$(echo "$selftest" | grep -q " hypercall=${want_hypercall:-}"; echo $?)" "$selftest"
	fi
	if [ -n "$detail" ]; then
		check detail "$(echo "$report_line" | grep -q "$detail"; echo $?)" "want /$detail/"
	fi
}

if grep -q 'rig_mode=builtin' /proc/cmdline; then
	# Built into the kernel: the report was made at boot.
	check no-module-file "$( [ ! -e $ko ]; echo $?)" ""
	report
	echo "RIG-RESULT backend=$backend sites=$p/$t builtin"
	echo "RIG-DONE"
	poweroff -f
fi

# 1. A refused parameter patches nothing and leaves nothing loaded.
out=$(insmod $ko backend=bogus 2>&1); rc=$?
! loaded; nl=$?
check refuse-unknown-name "$( [ $rc != 0 ] && [ $nl = 0 ] && echo "$out" | grep -q 'Invalid argument' && last_dmesg | grep -q "unknown backend 'bogus'"; echo $?)" "$(last_dmesg)"

# 2. A backend whose hypervisor is absent (or that this build lacks) is refused with -ENODEV.
for b in kvm xen vmi lguest; do
	[ "$b" = "$expect" ] && continue
	out=$(insmod $ko backend=$b 2>&1); rc=$?
	check refuse-$b "$( [ $rc != 0 ] && ! loaded && echo "$out" | grep -q 'No such device'; echo $?)" "$(last_dmesg)"
done

# 3. auto: the expected backend, every site patched and verified, the self-test passed.
insmod $ko; rc=$?
check load-auto "$rc" "$(last_dmesg)"
if [ -n "$want_dmesg" ]; then
	check dmesg-message "$(dmesg | grep -qE "$want_dmesg"; echo $?)" "want /$want_dmesg/: $(dmesg | grep 'pvops_guest: vmi' | tail -1)"
fi
report

# The benchmark, when asked for (scripts/bench): root-only debugfs file, JSON back.
if grep -q 'rig_bench=1' /proc/cmdline; then
	mount -t debugfs debugfs /sys/kernel/debug
	echo run > /sys/kernel/debug/pvops/bench; rc=$?
	if [ -n "$(arg rig_pv)" ]; then
		# its raw paths are ring-0 instructions: refused in a deprivileged kernel, no fault
		check bench-refused "$( [ $rc != 0 ] && last_dmesg | grep -q 'not available in a Xen PV domain'; echo $?)" "$(last_dmesg)"
	else
		check bench "$rc" ""
		echo RIG-BENCH-BEGIN
		cat /sys/kernel/debug/pvops/bench
		echo RIG-BENCH-END
	fi
fi

# 4. Unload restores every site byte for byte (the module verifies each one after writing).
rmmod pvops_guest; rc=$?
check unload "$( [ $rc = 0 ] && ! loaded && dmesg | grep -q "pvops_guest: unload: $t sites restored byte-exact"; echo $?)" "$(last_dmesg 2)"
[ -d /sys/kernel/pvops ]; check sysfs-removed "$( [ $? != 0 ]; echo $?)" ""
if [ -n "$release" ]; then
	check released "$(dmesg | grep 'unload: backend' | tail -1 | grep -qE "$release"; echo $?)" "$(last_dmesg)"
fi

# 5. Forcing native works wherever the kernel runs in ring 0; a Xen PV kernel (deprivileged)
#    refuses it. A second load after unload patches again.
if [ -n "$(arg rig_pv)" ]; then
	out=$(insmod $ko backend=native 2>&1); rc=$?
	check refuse-native "$( [ $rc != 0 ] && ! loaded && echo "$out" | grep -q 'No such device' && last_dmesg | grep -q 'runs deprivileged'; echo $?)" "$(last_dmesg)"
	insmod $ko; rc=$?
	check reload-auto "$( [ $rc = 0 ] && [ "$(cat /sys/kernel/pvops/backend)" = "$expect" ] && grep -q '^ok' /sys/kernel/pvops/selftest; echo $?)" "$(cat /sys/kernel/pvops/selftest 2>&1)"
else
	insmod $ko backend=native; rc=$?
	check load-native "$( [ $rc = 0 ] && [ "$(cat /sys/kernel/pvops/backend)" = native ] && grep -q '^ok' /sys/kernel/pvops/selftest; echo $?)" "$(cat /sys/kernel/pvops/selftest 2>&1)"
fi
rmmod pvops_guest
check no-fault "$(dmesg | grep -qE 'Oops|general protection|BUG:'; [ $? != 0 ]; echo $?)" "$(dmesg | grep -E 'Oops|general protection|BUG:' | head -1)"

echo "RIG-RESULT backend=$backend sites=$p/$t"
echo "RIG-DONE"
poweroff -f
