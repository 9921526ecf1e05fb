/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The C functions the Rust side of the module calls (shim.c, linux_peer.c), and the one it
 * provides (pvops_bench_run). Kbuild generates the Rust declarations from this file with
 * bindgen (guest-kmod/shim_bindings.rs in the build folder), so this is the only list.
 */
#ifndef PVOPS_SHIM_H
#define PVOPS_SHIM_H

#include <linux/types.h>

const char *pvops_shim_backend_param(void);
void pvops_shim_fault_param(char *buf, size_t len);
unsigned long pvops_shim_tsc_khz(void);
void *pvops_shim_alias_text(unsigned long start, unsigned long end);
void pvops_shim_unalias_text(void *alias);
int pvops_shim_stop_machine(int (*fn)(void *), void *data);
void pvops_shim_sync_core(void);
void pvops_shim_set_report(const char *backend, const char *hypervisor, const char *sites,
			   const char *selftest, const char *checks);
int pvops_shim_sysfs_create(void);
void pvops_shim_sysfs_remove(void);

/*
 * linux_peer.c: the benchmark's one harness. Every path of every row (the raw instruction,
 * the pvops call site, Linux's own paravirt path) is a loop of the same C macro, so identical
 * bytes cost the same. The pvops sites are emitted from C exactly as pvops::pv_site! emits
 * them, calling through pvops_bench_pv_ops (bench.rs) and recorded in the section
 * .pvops_bench_sites (pvops_linux_bench_sites).
 */
enum pvops_linux_loop { /* which loop of a row */
	PVOPS_LINUX_LOOP_RAW,
	PVOPS_LINUX_LOOP_PVOPS,
	PVOPS_LINUX_LOOP_LINUX,
	PVOPS_LINUX_LOOP_LINUX_INDIRECT,
};

/* What Linux has for a row's operation. */
enum pvops_linux_kind {
	/* a pv op: the path is Linux's call site, patched by the kernel for this hypervisor */
	PVOPS_LINUX_KIND_PV,
	/* no pv op: Linux runs the native code inline (compared only as a control) */
	PVOPS_LINUX_KIND_NATIVE,
	/* no pv op and nothing comparable: no Linux path, the row's note says why */
	PVOPS_LINUX_KIND_NONE,
};

/*
 * What the C sites record, per op: the op number (PVOPS_OP_*), the site length (PVOPS_LEN_*)
 * and the clobber bits (PVOPS_CLOB_*). Copied from pvops/src/ops/mod.rs and checked against it
 * at compile time (bench.rs, `abi!`): a drift breaks the build. Slots are op * SLOT_SIZE.
 */
#define PVOPS_ABI_OP(name, op, len, clob) \
	PVOPS_OP_##name = (op), PVOPS_LEN_##name = (len), PVOPS_CLOB_##name = (clob)
enum pvops_linux_abi {
	PVOPS_ABI_SLOT_SIZE = 8,
	PVOPS_ABI_INDIRECT_CALL_LEN = 6,
	PVOPS_ABI_CLOB_CALLEE_SAVE = 0x201, /* RAX | FLAGS */
	PVOPS_ABI_CLOB_C = 0x3ff, /* every caller-saved register and the flags */
	PVOPS_ABI_OP(CPUID, 0, 6, 0x3ff),
	PVOPS_ABI_OP(READ_CR0, 1, 6, 0x201),
	PVOPS_ABI_OP(READ_CR4, 3, 6, 0x201),
	PVOPS_ABI_OP(READ_MSR, 5, 6, 0x3ff),
	PVOPS_ABI_OP(READ_MSR_SAFE, 7, 6, 0x3ff),
	PVOPS_ABI_OP(LOAD_IDT, 10, 6, 0x201),
	PVOPS_ABI_OP(STORE_TR, 12, 6, 0x201),
	PVOPS_ABI_OP(IO_DELAY, 13, 6, 0x201),
	PVOPS_ABI_OP(HYPERCALL, 14, 6, 0x3ff),
	PVOPS_ABI_OP(SAVE_FL, 15, 6, 0x201),
	PVOPS_ABI_OP(RESTORE_FL, 16, 6, 0x201),
	PVOPS_ABI_OP(IRQ_DISABLE, 17, 6, 0x201),
	PVOPS_ABI_OP(IRQ_ENABLE, 18, 6, 0x201),
	PVOPS_ABI_OP(READ_CR2, 22, 6, 0x201),
	PVOPS_ABI_OP(WRITE_CR2, 23, 6, 0x201),
	PVOPS_ABI_OP(READ_CR3, 24, 6, 0x201),
	PVOPS_ABI_OP(WRITE_CR3, 25, 6, 0x201),
	PVOPS_ABI_OP(FLUSH_TLB_USER, 26, 6, 0x201),
	PVOPS_ABI_OP(FLUSH_TLB_ONE_USER, 28, 6, 0x201),
	PVOPS_ABI_OP(SET_PTE, 29, 6, 0x201),
	PVOPS_ABI_OP(ALLOC_PT, 32, 6, 0x3ff),
	PVOPS_ABI_OP(LAZY_MODE_ENTER, 34, 6, 0x3ff),
	PVOPS_ABI_OP(LAZY_MODE_LEAVE, 35, 6, 0x3ff),
	PVOPS_ABI_OP(SCHED_CLOCK, 51, 6, 0x3ff),
	PVOPS_ABI_OP(STEAL_CLOCK, 52, 6, 0x3ff),
	PVOPS_ABI_OP(TSC_KHZ, 53, 6, 0x3ff),
};
/* C's own view of one constant (bench.rs checks it at run time too). */
u32 pvops_linux_abi(enum pvops_linux_abi which);

/* The rows: how many, each one's name, what Linux has for it and why (or NULL), whether it is
 * a control (identical bytes on the pvops and Linux paths: they must measure the same). */
u32 pvops_linux_rows(void);
const char *pvops_linux_row_name(u32 row);
enum pvops_linux_kind pvops_linux_row_kind(u32 row);
const char *pvops_linux_row_note(u32 row);
int pvops_linux_row_control(u32 row);
/* The row's pvops call sites (their first byte), `n` < 2; 0 when the row has fewer. */
unsigned long pvops_linux_row_site(u32 row, u32 n);
/* Whether the row has the path (the hypercall rows only on KVM, see pvops_linux_setup). */
int pvops_linux_has(u32 row, enum pvops_linux_loop path);
/* One timed loop of `reps` iterations: TSC cycles, interrupts already off. The empty loop
 * (the same macro, no body) is pvops_linux_empty. */
u64 pvops_linux_run(u32 row, enum pvops_linux_loop path, u32 reps);
u64 pvops_linux_empty(u32 reps);
/* Before measuring: the backend's harmless hypercall (nr, a0), whether the KVM instruction
 * paths exist (kvm) and which instruction the CPU uses (vmmcall). */
void pvops_linux_setup(u64 nr, u64 a0, int kvm, int vmmcall);
/* The bounds of the benchmark's call-site records. */
void pvops_linux_bench_sites(unsigned long *start, unsigned long *end);

/* Interrupts off/on around a measurement, the kernel's way. */
unsigned long pvops_shim_irq_save(void);
void pvops_shim_irq_restore(unsigned long flags);

/* debugfs: /sys/kernel/debug/pvops/bench (root only). A write runs pvops_bench_run() (Rust),
 * which hands its JSON to pvops_shim_set_bench(); a read returns that JSON. */
int pvops_bench_run(void);
int pvops_shim_set_bench(const char *json, size_t len);
int pvops_shim_debugfs_create(void);
void pvops_shim_debugfs_remove(void);

/* Platform hooks for the backends. */
int pvops_shim_rdmsr(u32 msr, u64 *val);
int pvops_shim_wrmsr(u32 msr, u64 val);
int pvops_shim_rdmsr_on_cpu(unsigned int cpu, u32 msr, u64 *val);
int pvops_shim_wrmsr_on_cpu(unsigned int cpu, u32 msr, u64 val);
unsigned int pvops_shim_nr_cpus(void);
unsigned long pvops_shim_phys_to_virt(u64 pa);
u64 pvops_shim_virt_to_phys(unsigned long va);
int pvops_shim_kernel_kvmclock(void);
unsigned long pvops_shim_kernel_pvclock_cpu0(void);
int pvops_shim_xen_pv(void);
long pvops_shim_xen_vcpu_id(unsigned int cpu);
unsigned long pvops_shim_xen_pv_irq_fn(int which);
unsigned long pvops_shim_xen_pv_shared_info(void);
unsigned long pvops_shim_percpu_base(unsigned int cpu);
u64 pvops_shim_read_cr0(void);
u64 pvops_shim_read_cr3(void);
void pvops_shim_write_cr3(u64 cr3);
u64 pvops_shim_read_cr4(void);
u64 pvops_shim_virt_to_machine(unsigned long va);
unsigned long pvops_shim_pte_of(unsigned long va);
/* The kernel's page-table value conversions (pv_ops.mmu.pte_val, make_pte, ...). */
enum pvops_value_op {
	PVOPS_PTE_VAL,
	PVOPS_MAKE_PTE,
	PVOPS_PMD_VAL,
	PVOPS_MAKE_PMD,
	PVOPS_PUD_VAL,
	PVOPS_MAKE_PUD,
	PVOPS_P4D_VAL,
	PVOPS_MAKE_P4D,
	PVOPS_PGD_VAL,
	PVOPS_MAKE_PGD,
};
u64 pvops_shim_value(enum pvops_value_op which, u64 v);
unsigned int pvops_shim_this_cpu(void);
int pvops_shim_irqs_disabled(void);
void pvops_shim_cpuid(u32 leaf, u32 subleaf, u32 *out);
unsigned long pvops_shim_vmalloc_page(void);
void pvops_shim_vfree(unsigned long va);
unsigned long pvops_shim_alloc_page(void);
void pvops_shim_free_page(unsigned long va);
u64 pvops_shim_ktime_ns(void);
u64 pvops_shim_ktime_real_ns(void);
void pvops_shim_mdelay(unsigned int ms);
int pvops_shim_boot_subarch(u32 *subarch, u64 *data);
/* What KVM's ops need of the kernel (pvops_backends::kvm::KvmKernel). */
int pvops_shim_nopvspin(void);
unsigned int pvops_shim_possible_cpus(void);
int pvops_shim_in_nmi(void);
u32 pvops_shim_apic_id(u32 cpu);
int pvops_shim_selftest_ipi(u64 (*send)(const unsigned long *mask, unsigned int nbits,
					unsigned int vector),
			    unsigned int *targets);

/*
 * Built into the kernel only (not in the module): pvops as the kernel's paravirt layer
 * (guest-kmod/builtin.rs, kernel/pvops-early.patch).
 */
int pvops_shim_kernel_param(void);
const char *pvops_shim_pv_member(unsigned int i, unsigned int *offset);
unsigned long pvops_shim_pv_ops(unsigned long *size);
unsigned long pvops_shim_pv_op(unsigned int offset);
void pvops_shim_set_pv_op(unsigned int offset, unsigned long fn);
void pvops_shim_poke_early(unsigned long addr, const u8 *bytes, unsigned int len);
void pvops_shim_set_kernel_report(const char *text);
void pvops_shim_set_kernel_holder(const char *text);
int pvops_shim_preemptible(void);
int pvops_shim_late_modules(void);
int pvops_shim_is_init_text(unsigned long addr);
unsigned long pvops_shim_sched_clock_fn(void);
u64 pvops_shim_sched_clock(void);
void pvops_shim_set_sched_clock(unsigned long fn);
unsigned long pvops_shim_steal_clock_fn(void);
void pvops_shim_set_steal_clock(unsigned long fn);
int pvops_shim_steal_enabled(void);
int pvops_shim_all_cpus_online(void);
int pvops_shim_native_spin_unlock(void);
int pvops_shim_native_vcpu_is_preempted(void);
int pvops_shim_cpu_online(unsigned int cpu);
int pvops_shim_ipi_install(u64 (*send)(const unsigned long *mask, unsigned int nbits,
				       unsigned int vector));
void pvops_shim_ipi_to_linux(int to_linux);
int pvops_shim_ipi_holder(void);
/* What Linux's cpu.io_delay does on this boot (pvops::linux::LinuxIoDelay). */
enum pvops_io_delay {
	PVOPS_IO_DELAY_PORT80,
	PVOPS_IO_DELAY_OTHER,
	PVOPS_IO_DELAY_NOTHING,
};
enum pvops_io_delay pvops_shim_io_delay(void);
/* The MSR adapters (guest-kmod/adapters.rs): Linux's tracepoints, and its warning for a
 * faulting access through the unchecked accessors. */
void pvops_shim_trace_msr(int write, u32 msr, u64 val, int failed);
void pvops_shim_msr_fault(int write, u32 msr, u64 val);
/* The flush_tlb_multi adapter: native_flush_tlb_multi for the CPUs of `cpus` that `defer`
 * does not take over. */
void pvops_shim_flush_tlb_multi(const void *cpus, const void *info, bool (*defer)(u32 cpu));
/* Linux's own native (not pv) MSR accessors with a fault caught: 0 or -EIO. */
int pvops_shim_native_rdmsr_safe(u32 msr, u64 *val);
int pvops_shim_native_wrmsr_safe(u32 msr, u64 val);
/* Whether Linux's flush_tlb_multi is native_flush_tlb_multi. */
int pvops_shim_native_flush_tlb_multi(void);

#endif /* PVOPS_SHIM_H */
