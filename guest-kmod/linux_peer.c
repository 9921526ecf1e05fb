// SPDX-License-Identifier: GPL-2.0
/*
 * Linux's own paravirt path for the operations pvops benchmarks: each loop calls what the
 * kernel itself uses (arch_local_save_flags(), read_cr2(), __cpuid(), ...). In this kernel
 * (PARAVIRT_XXL) each of those is a pv_ops call site that the module loader patched for the
 * running hypervisor (inline native code, a direct call, or Xen's functions) — the peer a user
 * would otherwise have. The timing harness is in bench.rs; these only run the loops.
 */
#include <linux/irqflags.h>
#include <linux/sched/clock.h>
#include <asm/paravirt.h>
#include <asm/special_insns.h>
#include <asm/processor.h>
#include <asm/msr.h>
#include <asm/desc.h>
#include <asm/io.h>
#include <asm/tlbflush.h>
#include <asm/tsc.h>
#include <asm/kvm_para.h>

#include "shim.h"

/* Keep the compiler from folding a loop body away. */
#define KEEP(x) asm volatile("" : : "r"(x))

/* Each returns the TSC cycles `reps` iterations took (interrupts already off). */
#define LINUX_LOOP(name, ...)                                           \
	static u64 linux_##name(u32 reps)                               \
	{                                                               \
		u64 t0 = rdtsc_ordered(), t1;                           \
		u32 i;                                                  \
		for (i = 0; i < reps; i++) {                            \
			__VA_ARGS__;                                        \
		}                                                       \
		t1 = rdtsc_ordered();                                   \
		return t1 - t0;                                         \
	}

static u64 scratch_pte;
static struct desc_ptr idt_now;

LINUX_LOOP(empty, barrier())
LINUX_LOOP(save_fl, KEEP(arch_local_save_flags()))
LINUX_LOOP(restore_fl, arch_local_irq_restore(arch_local_save_flags()))
LINUX_LOOP(irq_disable, arch_local_irq_disable())
LINUX_LOOP(irq_enable_disable, arch_local_irq_enable(); arch_local_irq_disable())
LINUX_LOOP(read_cr0, KEEP(read_cr0()))
LINUX_LOOP(read_cr2, KEEP(read_cr2()))
LINUX_LOOP(write_cr2, write_cr2(read_cr2()))
LINUX_LOOP(read_cr3, KEEP(__read_cr3()))
LINUX_LOOP(read_cr4, KEEP(__read_cr4()))
LINUX_LOOP(cpuid, { unsigned int a = 0, b, c = 0, d; __cpuid(&a, &b, &c, &d); KEEP(a); })
LINUX_LOOP(read_msr, { u64 v; rdmsrl(MSR_EFER, v); KEEP(v); })
LINUX_LOOP(flush_tlb_one_user, __flush_tlb_one_user((unsigned long)&scratch_pte))
LINUX_LOOP(store_tr, { unsigned long tr; store_tr(tr); KEEP(tr); })
LINUX_LOOP(load_idt, load_idt(&idt_now))
LINUX_LOOP(io_delay, slow_down_io())
LINUX_LOOP(set_pte, WRITE_ONCE(scratch_pte, i))
LINUX_LOOP(sched_clock, KEEP(sched_clock()))
LINUX_LOOP(tsc_khz, KEEP(READ_ONCE(tsc_khz)))
LINUX_LOOP(write_cr3, write_cr3(__read_cr3()))

/* The backend's harmless hypercall, the way Linux makes KVM hypercalls (an ALTERNATIVE between
 * vmcall and vmmcall); only used when the KVM backend is live. */
static unsigned long hc_nr, hc_a0;
void pvops_linux_set_hypercall(u64 nr, u64 a0)
{
	hc_nr = nr;
	hc_a0 = a0;
}
LINUX_LOOP(kvm_hypercall, KEEP(kvm_hypercall1(hc_nr, hc_a0)))

/* Indirect call through Linux's own pv_ops slot, as an unpatched pv call site would make it
 * (compiled with this kernel's retpoline / indirect-branch settings). */
LINUX_LOOP(save_fl_indirect, KEEP(((unsigned long (*)(void))pv_ops.irq.save_fl.func)()))

typedef u64 (*linux_loop_fn)(u32);
static const linux_loop_fn linux_loops[] = {
	[PVOPS_LINUX_EMPTY] = linux_empty,
	[PVOPS_LINUX_SAVE_FL] = linux_save_fl,
	[PVOPS_LINUX_RESTORE_FL] = linux_restore_fl,
	[PVOPS_LINUX_IRQ_DISABLE] = linux_irq_disable,
	[PVOPS_LINUX_IRQ_ENABLE_DISABLE] = linux_irq_enable_disable,
	[PVOPS_LINUX_READ_CR0] = linux_read_cr0,
	[PVOPS_LINUX_READ_CR2] = linux_read_cr2,
	[PVOPS_LINUX_WRITE_CR2] = linux_write_cr2,
	[PVOPS_LINUX_READ_CR3] = linux_read_cr3,
	[PVOPS_LINUX_READ_CR4] = linux_read_cr4,
	[PVOPS_LINUX_CPUID] = linux_cpuid,
	[PVOPS_LINUX_READ_MSR] = linux_read_msr,
	[PVOPS_LINUX_FLUSH_TLB_ONE_USER] = linux_flush_tlb_one_user,
	[PVOPS_LINUX_STORE_TR] = linux_store_tr,
	[PVOPS_LINUX_LOAD_IDT] = linux_load_idt,
	[PVOPS_LINUX_IO_DELAY] = linux_io_delay,
	[PVOPS_LINUX_SET_PTE] = linux_set_pte,
	[PVOPS_LINUX_SCHED_CLOCK] = linux_sched_clock,
	[PVOPS_LINUX_TSC_KHZ] = linux_tsc_khz,
	[PVOPS_LINUX_WRITE_CR3] = linux_write_cr3,
	[PVOPS_LINUX_SAVE_FL_INDIRECT] = linux_save_fl_indirect,
	[PVOPS_LINUX_KVM_HYPERCALL] = linux_kvm_hypercall,
};

u64 pvops_linux_loop(enum pvops_linux_loop which, u32 reps)
{
	if (which >= ARRAY_SIZE(linux_loops) || !linux_loops[which])
		return 0;
	if (which == PVOPS_LINUX_LOAD_IDT)
		store_idt(&idt_now);
	return linux_loops[which](reps);
}
