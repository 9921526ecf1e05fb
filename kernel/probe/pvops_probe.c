// SPDX-License-Identifier: GPL-2.0
/*
 * pvops_probe: loaded after boot into a kernel with pvops built in. Linux's module loader
 * patched this module's pv call sites from pv_ops as it is now; with pvops.kernel=on and the
 * backend serving the kernel, pv_ops' members pvops serves hold pvops's functions, so this
 * module's sites call pvops wherever Linux makes them calls.
 *
 * Reports one line per site: where its call leads (or that it is inline), what pv_ops holds,
 * and the value read through it. The rig's check compares them (guest-init.sh, module-sites).
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <asm/paravirt.h>
#include <asm/special_insns.h>

/* Two pv call sites: read_cr0() (a direct call: Linux has no inline replacement for it) and
 * arch_local_save_flags() (Linux's inline pushf; pop where not Xen PV, a call under Xen PV). */
static noinline unsigned long probe_read_cr0(void)
{
	return read_cr0();
}

static noinline unsigned long probe_save_fl(void)
{
	return arch_local_save_flags();
}

/* The target of the first `call rel32` (e8) in the first bytes of fn, or 0 (inline). */
static unsigned long first_call(const u8 *fn, unsigned int n)
{
	unsigned int i;

	/* endbr64, then the site: a direct call once patched (the indirect call is ff 15) */
	for (i = 0; i + 5 <= n; i++)
		if (fn[i] == 0xe8)
			return (unsigned long)(fn + i + 5) + *(const s32 *)(fn + i + 1);
	return 0;
}

/* One line per site: where its call leads (or inline), what pv_ops holds, and the value. */
static void report(const char *name, unsigned long (*fn)(void), void *slot)
{
	unsigned long target = first_call((const u8 *)fn, 16);
	unsigned long value = fn();

	if (target)
		pr_info("pvops_probe: %s site calls %pS, pv_ops holds %pS, %s, value=%#lx\n", name,
			(void *)target, slot, target == (unsigned long)slot ? "same" : "DIFFERENT",
			value);
	else
		pr_info("pvops_probe: %s site inline, pv_ops holds %pS, value=%#lx\n", name, slot,
			value);
}

static int __init pvops_probe_init(void)
{
	report("cpu.read_cr0", probe_read_cr0, pv_ops.cpu.read_cr0);
	report("irq.save_fl", probe_save_fl, pv_ops.irq.save_fl.func);
	return 0;
}
static void __exit pvops_probe_exit(void)
{
}

module_init(pvops_probe_init);
module_exit(pvops_probe_exit);
MODULE_DESCRIPTION("pvops: where a module's pv call site leads");
MODULE_LICENSE("GPL");
