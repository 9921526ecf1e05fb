// SPDX-License-Identifier: GPL-2.0
/*
 * pvops_probe: loaded after boot into a kernel with pvops built in. Linux's module loader
 * patched this module's pv call sites from pv_ops as it is now; with pvops.kernel=on and the
 * native backend, pv_ops' members pvops serves hold pvops's functions, so the read_cr0() below
 * (a direct-call pv site: Linux has no inline replacement for it) must call pvops.
 *
 * Reports one line: where the site's call leads, what pv_ops.cpu.read_cr0 holds, and the value
 * read through the site. The rig's check compares them (guest-init.sh, module-sites).
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <asm/paravirt.h>
#include <asm/special_insns.h>

/* One pv call site: read_cr0() (PVOP_CALL0 of cpu.read_cr0). */
static noinline unsigned long probe_read_cr0(void)
{
	return read_cr0();
}

/* The target of the first `call rel32` (e8) in the first bytes of fn, or 0. */
static unsigned long first_call(const u8 *fn, unsigned int n)
{
	unsigned int i;

	/* endbr64, then the site: a direct call once patched (the indirect call is ff 15) */
	for (i = 0; i + 5 <= n; i++)
		if (fn[i] == 0xe8)
			return (unsigned long)(fn + i + 5) + *(const s32 *)(fn + i + 1);
	return 0;
}

static int __init pvops_probe_init(void)
{
	unsigned long target = first_call((const u8 *)probe_read_cr0, 16);
	unsigned long slot = (unsigned long)pv_ops.cpu.read_cr0;
	unsigned long cr0 = probe_read_cr0();

	pr_info("pvops_probe: cpu.read_cr0 site calls %pS, pv_ops holds %pS, %s, read_cr0=%#lx\n",
		(void *)target, (void *)slot, target == slot ? "same" : "DIFFERENT", cr0);
	return 0;
}

static void __exit pvops_probe_exit(void)
{
}

module_init(pvops_probe_init);
module_exit(pvops_probe_exit);
MODULE_DESCRIPTION("pvops: where a module's pv call site leads");
MODULE_LICENSE("GPL");
