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
unsigned long pvops_shim_tsc_khz(void);
void *pvops_shim_alias_text(unsigned long start, unsigned long end);
void pvops_shim_unalias_text(void *alias);
int pvops_shim_stop_machine(int (*fn)(void *), void *data);
void pvops_shim_sync_core(void);
void pvops_shim_set_report(const char *backend, const char *hypervisor, const char *sites,
			   const char *selftest, const char *checks);
int pvops_shim_sysfs_create(void);
void pvops_shim_sysfs_remove(void);

/* linux_peer.c: Linux's own paravirt path, one loop per operation (ids shared with bench.rs). */
enum pvops_linux_loop {
	PVOPS_LINUX_EMPTY,
	PVOPS_LINUX_SAVE_FL,
	PVOPS_LINUX_RESTORE_FL,
	PVOPS_LINUX_IRQ_DISABLE,
	PVOPS_LINUX_IRQ_ENABLE_DISABLE,
	PVOPS_LINUX_READ_CR0,
	PVOPS_LINUX_READ_CR2,
	PVOPS_LINUX_WRITE_CR2,
	PVOPS_LINUX_READ_CR3,
	PVOPS_LINUX_READ_CR4,
	PVOPS_LINUX_CPUID,
	PVOPS_LINUX_READ_MSR,
	PVOPS_LINUX_FLUSH_TLB_ONE_USER,
	PVOPS_LINUX_STORE_TR,
	PVOPS_LINUX_LOAD_IDT,
	PVOPS_LINUX_IO_DELAY,
	PVOPS_LINUX_SET_PTE,
	PVOPS_LINUX_SCHED_CLOCK,
	PVOPS_LINUX_TSC_KHZ,
	PVOPS_LINUX_WRITE_CR3,
	PVOPS_LINUX_SAVE_FL_INDIRECT,
	PVOPS_LINUX_KVM_HYPERCALL,
};
void pvops_linux_set_hypercall(u64 nr, u64 a0);
u64 pvops_linux_loop(enum pvops_linux_loop which, u32 reps);

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

/*
 * Built into the kernel only (not in the module): pvops as the kernel's paravirt layer
 * (guest-kmod/kernel.rs, kernel/pvops-early.patch).
 */
int pvops_shim_kernel_param(void);
const char *pvops_shim_pv_member(unsigned int i, unsigned int *offset);
unsigned long pvops_shim_pv_ops(unsigned long *size);
void pvops_shim_set_pv_op(unsigned int offset, unsigned long fn);
void pvops_shim_poke_early(unsigned long addr, const u8 *bytes, unsigned int len);
void pvops_shim_set_kernel_report(const char *text);

#endif /* PVOPS_SHIM_H */
