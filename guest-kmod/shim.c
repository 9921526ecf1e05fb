// SPDX-License-Identifier: GPL-2.0
/*
 * The C side of the pvops guest module: the few kernel facilities Rust-for-Linux 6.12 does not
 * wrap (module parameters, sysfs attributes, a writable alias of module text, stop_machine,
 * sync_core). Everything here is a thin pass-through; the logic lives in pvops_kmod.rs.
 */
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/kobject.h>
#include <linux/sysfs.h>
#include <linux/mm.h>
#include <linux/gfp.h>
#include <linux/vmalloc.h>
#include <linux/slab.h>
#include <linux/stop_machine.h>
#include <linux/string.h>
#include <linux/debugfs.h>
#include <linux/mutex.h>
#include <linux/fs.h>
#include <linux/atomic.h>
#include <linux/preempt.h>
#include <linux/kallsyms.h>
#include <linux/static_call.h>
#include <linux/once_lite.h>
#include <asm/paravirt.h>
#include <asm/sync_core.h>
#include <asm/tsc.h>
#include <asm/msr.h>
#include <asm/io.h>
#include <asm/pvclock.h>
#include <asm/hypervisor.h>
#include <xen/xen-ops.h>
#include <asm/xen/page.h>
#include <asm/fixmap.h>
#include <asm/paravirt.h>
#include <asm/pgtable.h>
#include <asm/special_insns.h>
#include <asm/percpu.h>
#include <linux/irqflags.h>
#include <linux/delay.h>
#include <linux/ktime.h>
#include <linux/timekeeping.h>
#include <linux/err.h>
#include <asm/bootparam.h>
#include <asm/setup.h>
#include <asm/smp.h>
#include <asm/tlbflush.h>
#include <asm/qspinlock.h>
#include <asm/apic.h>
#include <asm/hardirq.h>
#include <asm/irq_vectors.h>
#include <linux/cpu.h>

#include "shim.h"

static char *backend = "auto";
module_param(backend, charp, 0444);
/* its description (modinfo) is written by pvops_kmod.rs, from the backend registry */

const char *pvops_shim_backend_param(void)
{
	return backend;
}

/*
 * fault=: a debug knob (faults.rs): one step of a load, or of a live switch, fails as the
 * kernel's own would. Root may change it at run time (/sys/module/pvops_guest/parameters/fault).
 */
static char fault[32];
module_param_string(fault, fault, sizeof(fault), 0644);
MODULE_PARM_DESC(fault, "debug: make one step fail: platform:N (a backend's N-th fallible call of the kernel), alias, stop-machine, site, kernel-site (built in, a switch), alloc; empty: nothing");

/* A copy of fault= (at most len - 1 bytes and a NUL), taken under the parameters' lock. */
void pvops_shim_fault_param(char *buf, size_t len)
{
	kernel_param_lock(THIS_MODULE);
	strscpy(buf, fault, len);
	kernel_param_unlock(THIS_MODULE);
}

unsigned long pvops_shim_tsc_khz(void)
{
	return tsc_khz;
}

/*
 * Map the pages holding [start, end) a second time, writable and not executable: module text
 * and kernel text are read-only and text_poke() is not exported, so call sites are written
 * through this alias. Module text is vmalloc memory; built into the kernel, the sites are in
 * the kernel image, whose pages virt_to_page() finds. Returns the alias of the first page
 * (start rounded down), or NULL.
 */
void *pvops_shim_alias_text(unsigned long start, unsigned long end)
{
	unsigned long first = start & PAGE_MASK;
	unsigned int n = (PAGE_ALIGN(end) - first) >> PAGE_SHIFT, i;
	struct page **pages;
	void *alias;

	if (!n)
		return NULL;
	pages = kcalloc(n, sizeof(*pages), GFP_KERNEL);
	if (!pages)
		return NULL;
	for (i = 0; i < n; i++) {
		void *p = (void *)(first + i * PAGE_SIZE);

		pages[i] = is_vmalloc_or_module_addr(p) ? vmalloc_to_page(p) : virt_to_page(p);
		if (!pages[i]) {
			kfree(pages);
			return NULL;
		}
	}
	alias = vmap(pages, n, VM_MAP, PAGE_KERNEL);
	kfree(pages);
	return alias;
}

void pvops_shim_unalias_text(void *alias)
{
	vunmap(alias);
}

/* One stop_machine: fn runs on the CPU that takes the lead, the others wait for it. */
struct pvops_stop {
	int (*fn)(void *);
	void *data;
	atomic_t leader;
	atomic_t done;
	int rc;
};

static int pvops_stop_cpu(void *arg)
{
	struct pvops_stop *s = arg;

	if (atomic_cmpxchg(&s->leader, 0, 1) == 0) {
		s->rc = s->fn(s->data);
		atomic_set_release(&s->done, 1);
	} else {
		while (!atomic_read_acquire(&s->done))
			cpu_relax();
	}
	/* every CPU serialises before it runs the text that changed (cross-modifying code) */
	sync_core();
	return 0;
}

/*
 * Run fn(data) on one CPU while every other online CPU waits, interrupts off, in the same
 * stop_machine callback (executing none of the text fn changes), then serialises. Returns
 * stop_machine's error, else fn's result.
 */
int pvops_shim_stop_machine(int (*fn)(void *), void *data)
{
	struct pvops_stop s = {
		.fn = fn, .data = data, .leader = ATOMIC_INIT(0), .done = ATOMIC_INIT(0),
	};
	int err = stop_machine(pvops_stop_cpu, &s, cpu_online_mask);

	return err ? err : s.rc;
}

/* Serialise this CPU after its text changed. */
void pvops_shim_sync_core(void)
{
	sync_core();
}

/*
 * The lock over the running backend: a benchmark run (/sys/kernel/debug/pvops/bench) and a
 * live switch (a write to /sys/kernel/pvops/backend) each hold it throughout.
 */
static DEFINE_MUTEX(bench_lock);
#ifndef MODULE
/*
 * Built in: the lock over the kernel's sites, pv_ops and the census (builtin.rs): a hand-back
 * (/sys/kernel/pvops/kernel_holder) and a live switch hold it throughout, a read of the census
 * or the counters while it reads. Taken after bench_lock.
 */
static DEFINE_MUTEX(holder_lock);
#endif

/*
 * The report under /sys/kernel/pvops/: filled by Rust before the files appear, and again by a
 * live switch (under report_lock, so a read sees one report whole).
 */
static DEFINE_MUTEX(report_lock);
static char report_backend[64], report_hypervisor[96], report_sites[96], report_selftest[256];
/* the self-test's checks, one per line: NAME ok | NAME FAIL | NAME n/a REASON */
static char report_checks[2048];

void pvops_shim_set_report(const char *backend, const char *hypervisor, const char *sites,
			   const char *selftest, const char *checks)
{
	mutex_lock(&report_lock);
	strscpy(report_checks, checks, sizeof(report_checks));
	strscpy(report_backend, backend, sizeof(report_backend));
	strscpy(report_hypervisor, hypervisor, sizeof(report_hypervisor));
	strscpy(report_sites, sites, sizeof(report_sites));
	strscpy(report_selftest, selftest, sizeof(report_selftest));
	mutex_unlock(&report_lock);
}

#define PVOPS_SHOW(name)                                                              \
	static ssize_t name##_show(struct kobject *k, struct kobj_attribute *a, char *buf) \
	{                                                                             \
		ssize_t n;                                                            \
		mutex_lock(&report_lock);                                             \
		n = sysfs_emit(buf, "%s\n", report_##name);                           \
		mutex_unlock(&report_lock);                                           \
		return n;                                                             \
	}
#define PVOPS_ATTR(name) \
	PVOPS_SHOW(name)  \
	static struct kobj_attribute name##_attr = __ATTR_RO(name)

/* pvops_kmod.rs: a live switch to the backend named in buf (count bytes); 0 or -errno */
int pvops_switch_backend(const char *buf, size_t count);

/*
 * /sys/kernel/pvops/backend: the running backend; root writes a backend's name (or auto) to
 * switch to it live. One switch at a time, none during a benchmark: a write that finds either
 * running is refused with -EBUSY, changing nothing.
 */
static ssize_t backend_store(struct kobject *k, struct kobj_attribute *a, const char *buf,
			     size_t count)
{
	int err;

	if (!mutex_trylock(&bench_lock)) {
		pr_warn("pvops_guest: switch: a benchmark or another switch is running; nothing changed\n");
		return -EBUSY;
	}
#ifndef MODULE
	mutex_lock(&holder_lock);
#endif
	err = pvops_switch_backend(buf, count);
#ifndef MODULE
	mutex_unlock(&holder_lock);
#endif
	mutex_unlock(&bench_lock);
	return err ? err : count;
}
PVOPS_SHOW(backend)
static struct kobj_attribute backend_attr = __ATTR_RW_MODE(backend, 0644);
PVOPS_ATTR(hypervisor);
PVOPS_ATTR(sites);
PVOPS_ATTR(selftest);
PVOPS_ATTR(checks);
#ifndef MODULE
/*
 * Built in: /sys/kernel/pvops/kernel, the census of the kernel's own pv call sites (filled at
 * boot, see the end of this file); a binary attribute, since it is longer than a page.
 */
static char report_kernel[4 * PAGE_SIZE];

static ssize_t kernel_report_read(struct file *f, struct kobject *k, struct bin_attribute *a, char *buf,
				  loff_t off, size_t count)
{
	ssize_t n;

	mutex_lock(&holder_lock);
	n = memory_read_from_buffer(buf, count, &off, report_kernel, strlen(report_kernel));
	mutex_unlock(&holder_lock);
	return n;
}
static struct bin_attribute bin_attr_kernel =
	__BIN_ATTR(kernel, 0444, kernel_report_read, NULL, sizeof(report_kernel));
static struct bin_attribute *pvops_bin_attrs[] = { &bin_attr_kernel, NULL };

/*
 * Built in: /sys/kernel/pvops/kernel_holder, who holds the kernel's pv sites: "pvops" or
 * "linux", with the hand-backs and take-backs done so far. Root writes "linux" to hand every
 * site (and pv_ops) back to what Linux's own pv layer would hold, "pvops" to take them back
 * (pvops_kernel_hand(), builtin.rs). One write at a time (holder_lock).
 */
/* builtin.rs: hand the kernel's sites to Linux (to_linux) or take them back; 0 or -errno */
int pvops_kernel_hand(int to_linux);
static char report_holder[128];

static ssize_t kernel_holder_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	ssize_t n;

	mutex_lock(&holder_lock);
	n = sysfs_emit(buf, "%s\n", report_holder);
	mutex_unlock(&holder_lock);
	return n;
}

static ssize_t kernel_holder_store(struct kobject *k, struct kobj_attribute *a, const char *buf,
				   size_t count)
{
	int to_linux, err;

	if (sysfs_streq(buf, "linux"))
		to_linux = 1;
	else if (sysfs_streq(buf, "pvops"))
		to_linux = 0;
	else
		return -EINVAL;
	mutex_lock(&holder_lock);
	err = pvops_kernel_hand(to_linux);
	mutex_unlock(&holder_lock);
	return err ? err : count;
}
static struct kobj_attribute kernel_holder_attr = __ATTR_RW_MODE(kernel_holder, 0644);

/*
 * Built in: /sys/kernel/pvops/counters, what the backend counted of its work so far ("backend=
 * NAME" and its counters: KVM's lock waits, halts, kicks, preempted vCPUs seen), read live.
 */
/* builtin.rs: the line, at most len bytes of buf; its length */
size_t pvops_kernel_counters(char *buf, size_t len);

static ssize_t counters_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	size_t n;

	mutex_lock(&holder_lock);
	n = pvops_kernel_counters(buf, PAGE_SIZE - 1);
	mutex_unlock(&holder_lock);
	buf[n] = '\n';
	return n + 1;
}
static struct kobj_attribute counters_attr = __ATTR_RO_MODE(counters, 0444);

/* The holder line, set by Rust (under holder_lock when a write runs). */
void pvops_shim_set_kernel_holder(const char *text)
{
	strscpy(report_holder, text, sizeof(report_holder));
}

/* pv_sched_clock, the static call behind the kernel's sched_clock(): its function, a reading
 * through it, and a new function for it (static_call_update patches its call sites). */
unsigned long pvops_shim_sched_clock_fn(void)
{
	return (unsigned long)static_call_query(pv_sched_clock);
}

u64 pvops_shim_sched_clock(void)
{
	return static_call(pv_sched_clock)();
}

void pvops_shim_set_sched_clock(unsigned long fn)
{
	static_call_update(pv_sched_clock, (u64 (*)(void))fn);
}

/* pv_steal_clock likewise, and whether Linux accounts steal time at all (its own backend found
 * some: paravirt_steal_enabled). */
unsigned long pvops_shim_steal_clock_fn(void)
{
	return (unsigned long)static_call_query(pv_steal_clock);
}

void pvops_shim_set_steal_clock(unsigned long fn)
{
	static_call_update(pv_steal_clock, (u64 (*)(int))fn);
}

int pvops_shim_steal_enabled(void)
{
	return static_key_false(&paravirt_steal_enabled);
}

/* What Linux chose for its lock group (paravirt_set_cap() has asked the same before
 * apply_alternatives()): the native qspinlock unlock, the native vcpu_is_preempted. */
int pvops_shim_native_spin_unlock(void)
{
#ifdef CONFIG_PARAVIRT_SPINLOCKS
	return pv_is_native_spin_unlock();
#else
	return 1;
#endif
}

int pvops_shim_native_vcpu_is_preempted(void)
{
#ifdef CONFIG_PARAVIRT_SPINLOCKS
	return pv_is_native_vcpu_is_preempted();
#else
	return 1;
#endif
}

/* io_delay.c's IO_DELAY_TYPE_0X80 and _NONE (private to it) */
#define PVOPS_LINUX_IO_DELAY_0X80 0
#define PVOPS_LINUX_IO_DELAY_NONE 3

/* What Linux's cpu.io_delay does: native_io_delay follows io_delay= (set before
 * apply_alternatives, by its parameter and DMI quirks); a hypervisor's (KVM's with
 * NOP_IO_DELAY, VMware's) does nothing. */
enum pvops_io_delay pvops_shim_io_delay(void)
{
	if (pv_ops.cpu.io_delay != native_io_delay)
		return PVOPS_IO_DELAY_NOTHING;
	switch (io_delay_type) {
	case PVOPS_LINUX_IO_DELAY_0X80:
		return PVOPS_IO_DELAY_PORT80;
	case PVOPS_LINUX_IO_DELAY_NONE:
		return PVOPS_IO_DELAY_NOTHING;
	default:
		return PVOPS_IO_DELAY_OTHER;
	}
}

/* native_read_msr's and native_write_msr's tracepoints (msr:read_msr, msr:write_msr). */
void pvops_shim_trace_msr(int write, u32 msr, u64 val, int failed)
{
	if (write) {
		if (tracepoint_enabled(write_msr))
			do_trace_write_msr(msr, val, failed);
	} else if (tracepoint_enabled(read_msr)) {
		do_trace_read_msr(msr, val, failed);
	}
}

/* What Linux's exception handler says for a faulting unchecked MSR access (ex_handler_msr):
 * once for reads, once for writes, with the stack. */
void pvops_shim_msr_fault(int write, u32 msr, u64 val)
{
	if (write) {
		if (!__ONCE_LITE_IF(true))
			return;
		pr_warn("unchecked MSR access error: WRMSR to 0x%x (tried to write 0x%016llx) through pvops\n",
			msr, val);
	} else {
		if (!__ONCE_LITE_IF(true))
			return;
		pr_warn("unchecked MSR access error: RDMSR from 0x%x through pvops\n", msr);
	}
	dump_stack();
}

/* The flush_tlb_multi adapter's mask, one per CPU (it runs with preemption off): copied from
 * the caller's only once the backend takes a CPU's flush over, so a backend that never does
 * (native's) costs no copy. */
static DEFINE_PER_CPU(struct cpumask, pvops_flush_mask);

void pvops_shim_flush_tlb_multi(const void *cpus, const void *info, bool (*defer)(u32 cpu))
{
	struct cpumask *mask = this_cpu_ptr(&pvops_flush_mask);
	const struct cpumask *flush = cpus;
	int cpu;

	for_each_cpu(cpu, (const struct cpumask *)cpus) {
		if (!defer(cpu))
			continue;
		if (flush != mask) {
			cpumask_copy(mask, cpus);
			flush = mask;
		}
		__cpumask_clear_cpu(cpu, mask);
	}
	native_flush_tlb_multi(flush, info);
}

int pvops_shim_native_rdmsr_safe(u32 msr, u64 *val)
{
	int err;

	*val = native_read_msr_safe(msr, &err);
	return err;
}

int pvops_shim_native_wrmsr_safe(u32 msr, u64 val)
{
	return native_write_msr_safe(msr, (u32)val, (u32)(val >> 32));
}

int pvops_shim_native_flush_tlb_multi(void)
{
	return pv_ops.mmu.flush_tlb_multi == native_flush_tlb_multi;
}

/*
 * PV send-IPI through the kernel's APIC callbacks (built in): send_IPI_mask and
 * send_IPI_mask_allbutself go to pvops's irq.send_ipi (send), and to Linux's own callbacks,
 * kept, when it sends nothing or once the kernel's sites are handed back to Linux (ipi_to_linux,
 * flipped under stop_machine: the callbacks themselves are static calls, which cannot be
 * re-patched there).
 */
static void (*linux_send_IPI_mask)(const struct cpumask *mask, int vector);
static void (*linux_send_IPI_mask_allbutself)(const struct cpumask *mask, int vector);
static u64 (*pvops_send)(const unsigned long *mask, unsigned int nbits, unsigned int vector);
static bool ipi_to_linux;
/* the allbutself mask, one per CPU (interrupts are off while it is used) */
static DEFINE_PER_CPU(struct cpumask, pvops_ipi_mask);

static void pvops_send_IPI_mask(const struct cpumask *mask, int vector)
{
	unsigned long flags;
	u64 sent;

	if (READ_ONCE(ipi_to_linux)) {
		linux_send_IPI_mask(mask, vector);
		return;
	}
	local_irq_save(flags);
	sent = pvops_send(cpumask_bits(mask), nr_cpu_ids, vector);
	local_irq_restore(flags);
	if (!sent)
		linux_send_IPI_mask(mask, vector);
}

static void pvops_send_IPI_mask_allbutself(const struct cpumask *mask, int vector)
{
	struct cpumask *others;
	unsigned long flags;
	u64 sent;

	if (READ_ONCE(ipi_to_linux)) {
		linux_send_IPI_mask_allbutself(mask, vector);
		return;
	}
	local_irq_save(flags);
	others = this_cpu_ptr(&pvops_ipi_mask);
	cpumask_copy(others, mask);
	__cpumask_clear_cpu(smp_processor_id(), others);
	sent = cpumask_empty(others) || pvops_send(cpumask_bits(others), nr_cpu_ids, vector);
	local_irq_restore(flags);
	if (!sent)
		linux_send_IPI_mask_allbutself(mask, vector);
}

/* At the initcall: the two callbacks become pvops's (Linux's kept); 0, or -errno. */
int pvops_shim_ipi_install(u64 (*send)(const unsigned long *mask, unsigned int nbits,
				       unsigned int vector))
{
	if (!apic || !apic->send_IPI_mask || !apic->send_IPI_mask_allbutself)
		return -ENODEV;
	linux_send_IPI_mask = apic->send_IPI_mask;
	linux_send_IPI_mask_allbutself = apic->send_IPI_mask_allbutself;
	pvops_send = send;
	/* apic_update_callback() without its boot-time override record (init data: the APIC
	 * driver is chosen long before initcalls, and never again) */
	apic->send_IPI_mask = pvops_send_IPI_mask;
	static_call_update(apic_call_send_IPI_mask, pvops_send_IPI_mask);
	apic->send_IPI_mask_allbutself = pvops_send_IPI_mask_allbutself;
	static_call_update(apic_call_send_IPI_mask_allbutself, pvops_send_IPI_mask_allbutself);
	pr_info("pvops: APIC send_IPI_mask and send_IPI_mask_allbutself through pvops\n");
	return 0;
}

/* Under stop_machine (the hand-back): whose IPIs the callbacks send. */
void pvops_shim_ipi_to_linux(int to_linux)
{
	WRITE_ONCE(ipi_to_linux, to_linux);
}

/* Who sends the kernel's IPIs: 0 pvops, 1 Linux (through pvops's callbacks, handed back), -1
 * Linux's callbacks alone (pvops's are not in the APIC driver). */
int pvops_shim_ipi_holder(void)
{
	if (apic->send_IPI_mask != pvops_send_IPI_mask ||
	    apic->send_IPI_mask_allbutself != pvops_send_IPI_mask_allbutself)
		return -1;
	return READ_ONCE(ipi_to_linux) ? 1 : 0;
}

/* Whether every possible CPU is online (none can come up later with state not read yet). */
int pvops_shim_all_cpus_online(void)
{
	return num_online_cpus() == num_possible_cpus();
}

int pvops_shim_cpu_online(unsigned int cpu)
{
	return cpu < nr_cpu_ids && cpu_online(cpu);
}

/* Whether addr is in the kernel's init text (freed, and poisoned, once boot is over). */
int pvops_shim_is_init_text(unsigned long addr)
{
	return is_kernel_inittext(addr);
}

/* Whether this kernel preempts kernel code (a task could then be stopped inside a site). */
int pvops_shim_preemptible(void)
{
	return preempt_model_preemptible();
}

/*
 * Modules loaded after boot and still loaded: Linux's loader turned their pv calls into direct
 * calls to what pv_ops held then, the running backend's functions, which a live switch would
 * stop (builtin.rs, prepare_switch). Counted from the initcall on: no module loads before it.
 */
static atomic_t late_modules = ATOMIC_INIT(0);
static bool late_modules_counted;

static int late_module_event(struct notifier_block *nb, unsigned long state, void *data)
{
	if (state == MODULE_STATE_COMING)
		atomic_inc(&late_modules);
	else if (state == MODULE_STATE_GOING)
		atomic_dec(&late_modules);
	return NOTIFY_DONE;
}
static struct notifier_block late_module_nb = { .notifier_call = late_module_event };

/* How many; -1 if they are not counted (the notifier was refused: no switch then). */
int pvops_shim_late_modules(void)
{
	return late_modules_counted ? atomic_read(&late_modules) : -1;
}
#endif

static struct attribute *pvops_attrs[] = {
	&backend_attr.attr, &hypervisor_attr.attr, &sites_attr.attr, &selftest_attr.attr,
	&checks_attr.attr,
#ifndef MODULE
	&kernel_holder_attr.attr,
	&counters_attr.attr,
#endif
	NULL,
};
static const struct attribute_group pvops_group = {
	.attrs = pvops_attrs,
#ifndef MODULE
	.bin_attrs = pvops_bin_attrs,
#endif
};
static struct kobject *pvops_kobj;

int pvops_shim_sysfs_create(void)
{
	int err;

	pvops_kobj = kobject_create_and_add("pvops", kernel_kobj);
	if (!pvops_kobj)
		return -ENOMEM;
	err = sysfs_create_group(pvops_kobj, &pvops_group);
	if (err) {
		kobject_put(pvops_kobj);
		pvops_kobj = NULL;
		return err;
	}
#ifndef MODULE
	/* built in, the sysfs files live as long as the kernel: so does the notifier */
	late_modules_counted = register_module_notifier(&late_module_nb) == 0;
#endif
	return 0;
}

void pvops_shim_sysfs_remove(void)
{
	if (pvops_kobj) {
		sysfs_remove_group(pvops_kobj, &pvops_group);
		kobject_put(pvops_kobj);
		pvops_kobj = NULL;
	}
}

unsigned long pvops_shim_irq_save(void)
{
	unsigned long flags;

	local_irq_save(flags);
	return flags;
}

void pvops_shim_irq_restore(unsigned long flags)
{
	local_irq_restore(flags);
}

/* /sys/kernel/debug/pvops/bench: write anything to run the benchmark, read the JSON back. */
static char *bench_json;
static size_t bench_len;
static struct dentry *pvops_debugfs;

int pvops_shim_set_bench(const char *json, size_t len)
{
	char *copy = kvmemdup(json, len, GFP_KERNEL);

	if (!copy)
		return -ENOMEM;
	kvfree(bench_json);
	bench_json = copy;
	bench_len = len;
	return 0;
}

static ssize_t bench_write(struct file *file, const char __user *buf, size_t len, loff_t *pos)
{
	int err;

	mutex_lock(&bench_lock);
	err = pvops_bench_run();
	mutex_unlock(&bench_lock);
	return err ? err : len;
}

static ssize_t bench_read(struct file *file, char __user *buf, size_t len, loff_t *pos)
{
	ssize_t ret;

	mutex_lock(&bench_lock);
	ret = simple_read_from_buffer(buf, len, pos, bench_json, bench_len);
	mutex_unlock(&bench_lock);
	return ret;
}

static const struct file_operations bench_fops = {
	.owner = THIS_MODULE,
	.read = bench_read,
	.write = bench_write,
	.llseek = default_llseek,
};

int pvops_shim_debugfs_create(void)
{
	pvops_debugfs = debugfs_create_dir("pvops", NULL);
	debugfs_create_file("bench", 0600, pvops_debugfs, NULL, &bench_fops);
	return 0;
}

void pvops_shim_debugfs_remove(void)
{
	debugfs_remove(pvops_debugfs);
	pvops_debugfs = NULL;
	kvfree(bench_json);
	bench_json = NULL;
	bench_len = 0;
}

/* What KVM's ops need of the kernel (pvops_backends::kvm::KvmKernel). A module takes over no
 * lock: nopvspin reads as given there. */
int pvops_shim_nopvspin(void)
{
#if defined(CONFIG_PARAVIRT_SPINLOCKS) && !defined(MODULE)
	return nopvspin;
#else
	return 1;
#endif
}

unsigned int pvops_shim_possible_cpus(void)
{
	return num_possible_cpus();
}

int pvops_shim_in_nmi(void)
{
	return in_nmi() != 0;
}

u32 pvops_shim_apic_id(u32 cpu)
{
	return per_cpu(x86_cpu_to_apicid, cpu);
}

/*
 * The module's send-IPI self-test: a reschedule IPI (harmless: the scheduler looks for work) to
 * every other online CPU through send() (pvops's irq.send_ipi), then up to a second for each of
 * them to count one more in its irq_stat. Returns how many did, with the number sent to in
 * *targets; -1 when send() sent nothing (the backend leaves IPIs to the local APIC).
 */
int pvops_shim_selftest_ipi(u64 (*send)(const unsigned long *mask, unsigned int nbits,
					unsigned int vector),
			    unsigned int *targets)
{
	struct cpumask *mask;
	unsigned int *before;
	unsigned long flags;
	int cpu, i, took = 0;
	u64 sent;

	*targets = 0;
	mask = kzalloc(cpumask_size(), GFP_KERNEL);
	before = kcalloc(nr_cpu_ids, sizeof(*before), GFP_KERNEL);
	if (!mask || !before) {
		kfree(mask);
		kfree(before);
		return -ENOMEM;
	}
	cpus_read_lock();
	preempt_disable();
	cpumask_copy(mask, cpu_online_mask);
	__cpumask_clear_cpu(smp_processor_id(), mask);
	*targets = cpumask_weight(mask);
	for_each_cpu(cpu, mask)
		before[cpu] = READ_ONCE(per_cpu(irq_stat, cpu).irq_resched_count);
	local_irq_save(flags);
	sent = *targets ? send(cpumask_bits(mask), nr_cpu_ids, RESCHEDULE_VECTOR) : 0;
	local_irq_restore(flags);
	preempt_enable();
	for (i = 0; sent && i < 1000; i++) {
		took = 0;
		for_each_cpu(cpu, mask)
			took += READ_ONCE(per_cpu(irq_stat, cpu).irq_resched_count) != before[cpu];
		if (took == *targets)
			break;
		mdelay(1);
	}
	cpus_read_unlock();
	kfree(mask);
	kfree(before);
	return sent ? took : -1;
}

/* Privileged accesses backends need to set up, the kernel's safe way (see backends' Platform). */
int pvops_shim_rdmsr(u32 msr, u64 *val)
{
	return rdmsrl_safe(msr, val);
}

int pvops_shim_wrmsr(u32 msr, u64 val)
{
	return wrmsrl_safe(msr, val);
}

int pvops_shim_rdmsr_on_cpu(unsigned int cpu, u32 msr, u64 *val)
{
	if (cpu >= nr_cpu_ids || !cpu_online(cpu))
		return -ENODEV;
	return rdmsrl_safe_on_cpu(cpu, msr, val);
}

int pvops_shim_wrmsr_on_cpu(unsigned int cpu, u32 msr, u64 val)
{
	if (cpu >= nr_cpu_ids || !cpu_online(cpu))
		return -ENODEV;
	return wrmsrl_safe_on_cpu(cpu, msr, val);
}

unsigned int pvops_shim_nr_cpus(void)
{
	return nr_cpu_ids;
}

/* The direct-map address of RAM at pa, or 0 if pa is not RAM the kernel maps. */
unsigned long pvops_shim_phys_to_virt(u64 pa)
{
	if (!pfn_valid(PHYS_PFN(pa)))
		return 0;
	return (unsigned long)__va(pa);
}

/* The physical address of kernel memory (direct map, kernel image or vmalloc/module), or 0. */
u64 pvops_shim_virt_to_phys(unsigned long va)
{
	void *p = (void *)va;

	if (is_vmalloc_or_module_addr(p)) {
		struct page *page = vmalloc_to_page(p);

		return page ? page_to_phys(page) + offset_in_page(p) : 0;
	}
	return __pa(va);
}

/* 1 if the kernel runs kvmclock (it published its CPU 0 record), else 0. */
int pvops_shim_kernel_kvmclock(void)
{
	return pvclock_get_pvti_cpu0_va() != NULL;
}

/* The kernel's published pvclock record for CPU 0 (kvmclock's, or Xen's secondary time area). */
unsigned long pvops_shim_kernel_pvclock_cpu0(void)
{
	return (unsigned long)pvclock_get_pvti_cpu0_va();
}

/* 1 in a Xen PV domain. */
int pvops_shim_xen_pv(void)
{
	return x86_hyper_type == X86_HYPER_XEN_PV;
}

/* The Xen vCPU id of a CPU, or -1. */
long pvops_shim_xen_vcpu_id(unsigned int cpu)
{
#ifdef CONFIG_XEN
	if (cpu < nr_cpu_ids && cpu_possible(cpu))
		return per_cpu(xen_vcpu_id, cpu);
#endif
	return -1;
}

/*
 * What a Xen PV kernel shares with the Xen backend (backends/src/xen_pv.rs). Its vcpu_info is
 * per-CPU and unexported: the backend finds it in the PV irq functions pv_ops holds.
 */
unsigned long pvops_shim_xen_pv_irq_fn(int which)
{
#if defined(CONFIG_XEN_PV) && defined(CONFIG_PARAVIRT_XXL)
	if (x86_hyper_type == X86_HYPER_XEN_PV)
		return (unsigned long)(which ? pv_ops.irq.save_fl.func : pv_ops.irq.irq_disable.func);
#endif
	return 0;
}

/* Where a PV kernel maps shared_info (0 elsewhere). */
unsigned long pvops_shim_xen_pv_shared_info(void)
{
#ifdef CONFIG_XEN_PV
	if (x86_hyper_type == X86_HYPER_XEN_PV)
		return fix_to_virt(FIX_PARAVIRT_BOOTMAP);
#endif
	return 0;
}

unsigned long pvops_shim_percpu_base(unsigned int cpu)
{
	return cpu < nr_cpu_ids ? per_cpu_offset(cpu) : 0;
}

/* The kernel's own accessors (on PV they go through its Xen pv_ops or Xen's emulation). */
u64 pvops_shim_read_cr0(void)
{
	return read_cr0();
}

u64 pvops_shim_read_cr3(void)
{
	return __read_cr3();
}

void pvops_shim_write_cr3(u64 cr3)
{
	write_cr3(cr3);
}

u64 pvops_shim_read_cr4(void)
{
	return __read_cr4();
}

/* Machine address of a kernel virtual address (the pseudo-physical one outside PV). */
u64 pvops_shim_virt_to_machine(unsigned long va)
{
#ifdef CONFIG_XEN_PV
	if (x86_hyper_type == X86_HYPER_XEN_PV)
		return arbitrary_virt_to_machine((void *)va).maddr;
#endif
	return 0;
}

/* The kernel's 4 KiB page-table entry for va (0 when va is not mapped by one). */
unsigned long pvops_shim_pte_of(unsigned long va)
{
	unsigned int level;
	pte_t *pte = lookup_address(va, &level);

	return pte && level == PG_LEVEL_4K ? (unsigned long)pte : 0;
}

/* The kernel's own page-table value conversions, through its pv_ops (in a Xen PV domain they
 * turn machine frames into pseudo-physical ones and back through the kernel's p2m). The raw
 * native_* accessors only wrap and unwrap the value. */
u64 pvops_shim_value(enum pvops_value_op which, u64 v)
{
	switch (which) {
	case PVOPS_PTE_VAL:
		return pte_val(native_make_pte(v));
	case PVOPS_MAKE_PTE:
		return native_pte_val(__pte(v));
	case PVOPS_PMD_VAL:
		return pmd_val(native_make_pmd(v));
	case PVOPS_MAKE_PMD:
		return native_pmd_val(__pmd(v));
	case PVOPS_PUD_VAL:
		return pud_val(native_make_pud(v));
	case PVOPS_MAKE_PUD:
		return native_pud_val(__pud(v));
	case PVOPS_P4D_VAL:
		return p4d_val(native_make_p4d(v));
	case PVOPS_MAKE_P4D:
		return native_p4d_val(__p4d(v));
	case PVOPS_PGD_VAL:
		return pgd_val(native_make_pgd(v));
	case PVOPS_MAKE_PGD:
		return native_pgd_val(__pgd(v));
	}
	return v;
}

/* This CPU's number (the caller keeps it from migrating). */
unsigned int pvops_shim_this_cpu(void)
{
	return raw_smp_processor_id();
}

/* The kernel's view of the interrupt flag and of CPUID, for the module's self-test. */
int pvops_shim_irqs_disabled(void)
{
	return irqs_disabled();
}

void pvops_shim_cpuid(u32 leaf, u32 subleaf, u32 *out)
{
	cpuid_count(leaf, subleaf, &out[0], &out[1], &out[2], &out[3]);
}

/* A page mapped at 4 KiB (vmalloc), for the page-table self-test. */
unsigned long pvops_shim_vmalloc_page(void)
{
	return (unsigned long)vzalloc(PAGE_SIZE);
}

void pvops_shim_vfree(unsigned long va)
{
	vfree((void *)va);
}

unsigned long pvops_shim_alloc_page(void)
{
	return get_zeroed_page(GFP_KERNEL);
}

void pvops_shim_free_page(unsigned long va)
{
	free_page(va);
}

u64 pvops_shim_ktime_ns(void)
{
	return ktime_get_ns();
}

u64 pvops_shim_ktime_real_ns(void)
{
	return ktime_get_real_ns();
}

void pvops_shim_mdelay(unsigned int ms)
{
	mdelay(ms);
}

/*
 * The boot loader's hardware_subarch and hardware_subarch_data (where lguest announces itself).
 * Built into the kernel: from boot_params itself. As a module (boot_params is not exported):
 * from the copy the kernel publishes in /sys/kernel/boot_params/data; -errno when that file
 * cannot be read (sysfs not mounted, or a kernel without it), which the caller treats as "no
 * boot data".
 */
#ifndef MODULE
int pvops_shim_boot_subarch(u32 *subarch, u64 *data)
{
	*subarch = boot_params.hdr.hardware_subarch;
	*data = boot_params.hdr.hardware_subarch_data;
	return 0;
}
#else
int pvops_shim_boot_subarch(u32 *subarch, u64 *data)
{
	struct boot_params *bp;
	struct file *f;
	loff_t pos = 0;
	ssize_t n;

	f = filp_open("/sys/kernel/boot_params/data", O_RDONLY, 0);
	if (IS_ERR(f))
		return PTR_ERR(f);
	bp = kzalloc(sizeof(*bp), GFP_KERNEL);
	if (!bp) {
		filp_close(f, NULL);
		return -ENOMEM;
	}
	n = kernel_read(f, bp, sizeof(*bp), &pos);
	filp_close(f, NULL);
	if (n < (ssize_t)offsetofend(struct boot_params, hdr.hardware_subarch_data)) {
		kfree(bp);
		return n < 0 ? n : -EIO;
	}
	*subarch = bp->hdr.hardware_subarch;
	*data = bp->hdr.hardware_subarch_data;
	kfree(bp);
	return 0;
}
#endif

#ifndef MODULE
/*
 * Built into the kernel: pvops as the kernel's own paravirt layer (guest-kmod/builtin.rs).
 * pvops_kernel_early() runs from alternative_instructions() (kernel/pvops-early.patch).
 */
#include <asm/pvops_early.h>

/* pvops.kernel=on|off (default on); off leaves Linux's own paravirt layer untouched. */
static bool pvops_kernel_on = true;

static int __init pvops_kernel_setup(char *s)
{
	if (s && !strcmp(s, "on"))
		pvops_kernel_on = true;
	else if (s && !strcmp(s, "off"))
		pvops_kernel_on = false;
	else
		pr_warn("pvops: pvops.kernel=%s is neither on nor off; keeping %s\n", s ? s : "",
			pvops_kernel_on ? "on" : "off");
	return 0;
}
early_param("pvops.kernel", pvops_kernel_setup);

int pvops_shim_kernel_param(void)
{
	return pvops_kernel_on;
}

/* Every member of the kernel's pv_ops, at its offset in this kernel's own layout. */
#define PV_MEMBER(m) { offsetof(struct paravirt_patch_template, m), #m }
static const struct {
	unsigned int offset;
	const char *name;
} pv_members[] = {
	PV_MEMBER(cpu.io_delay),
#ifdef CONFIG_PARAVIRT_XXL
	PV_MEMBER(cpu.get_debugreg), PV_MEMBER(cpu.set_debugreg), PV_MEMBER(cpu.read_cr0),
	PV_MEMBER(cpu.write_cr0), PV_MEMBER(cpu.write_cr4), PV_MEMBER(cpu.load_tr_desc),
	PV_MEMBER(cpu.load_gdt), PV_MEMBER(cpu.load_idt), PV_MEMBER(cpu.set_ldt),
	PV_MEMBER(cpu.store_tr), PV_MEMBER(cpu.load_tls), PV_MEMBER(cpu.load_gs_index),
	PV_MEMBER(cpu.write_ldt_entry), PV_MEMBER(cpu.write_gdt_entry),
	PV_MEMBER(cpu.write_idt_entry), PV_MEMBER(cpu.alloc_ldt), PV_MEMBER(cpu.free_ldt),
	PV_MEMBER(cpu.load_sp0),
#ifdef CONFIG_X86_IOPL_IOPERM
	PV_MEMBER(cpu.invalidate_io_bitmap), PV_MEMBER(cpu.update_io_bitmap),
#endif
	PV_MEMBER(cpu.wbinvd), PV_MEMBER(cpu.cpuid), PV_MEMBER(cpu.read_msr),
	PV_MEMBER(cpu.write_msr), PV_MEMBER(cpu.read_msr_safe), PV_MEMBER(cpu.write_msr_safe),
	PV_MEMBER(cpu.read_pmc), PV_MEMBER(cpu.start_context_switch),
	PV_MEMBER(cpu.end_context_switch),
	PV_MEMBER(irq.save_fl), PV_MEMBER(irq.irq_disable), PV_MEMBER(irq.irq_enable),
#endif
	PV_MEMBER(irq.safe_halt), PV_MEMBER(irq.halt),
	PV_MEMBER(mmu.flush_tlb_user), PV_MEMBER(mmu.flush_tlb_kernel),
	PV_MEMBER(mmu.flush_tlb_one_user), PV_MEMBER(mmu.flush_tlb_multi),
	PV_MEMBER(mmu.tlb_remove_table), PV_MEMBER(mmu.exit_mmap),
	PV_MEMBER(mmu.notify_page_enc_status_changed),
#ifdef CONFIG_PARAVIRT_XXL
	PV_MEMBER(mmu.read_cr2), PV_MEMBER(mmu.write_cr2), PV_MEMBER(mmu.read_cr3),
	PV_MEMBER(mmu.write_cr3), PV_MEMBER(mmu.enter_mmap), PV_MEMBER(mmu.pgd_alloc),
	PV_MEMBER(mmu.pgd_free), PV_MEMBER(mmu.alloc_pte), PV_MEMBER(mmu.alloc_pmd),
	PV_MEMBER(mmu.alloc_pud), PV_MEMBER(mmu.alloc_p4d), PV_MEMBER(mmu.release_pte),
	PV_MEMBER(mmu.release_pmd), PV_MEMBER(mmu.release_pud), PV_MEMBER(mmu.release_p4d),
	PV_MEMBER(mmu.set_pte), PV_MEMBER(mmu.set_pmd), PV_MEMBER(mmu.ptep_modify_prot_start),
	PV_MEMBER(mmu.ptep_modify_prot_commit), PV_MEMBER(mmu.pte_val), PV_MEMBER(mmu.make_pte),
	PV_MEMBER(mmu.pgd_val), PV_MEMBER(mmu.make_pgd), PV_MEMBER(mmu.set_pud),
	PV_MEMBER(mmu.pmd_val), PV_MEMBER(mmu.make_pmd), PV_MEMBER(mmu.pud_val),
	PV_MEMBER(mmu.make_pud), PV_MEMBER(mmu.set_p4d),
#if CONFIG_PGTABLE_LEVELS >= 5
	PV_MEMBER(mmu.p4d_val), PV_MEMBER(mmu.make_p4d), PV_MEMBER(mmu.set_pgd),
#endif
	PV_MEMBER(mmu.lazy_mode.enter), PV_MEMBER(mmu.lazy_mode.leave),
	PV_MEMBER(mmu.lazy_mode.flush), PV_MEMBER(mmu.set_fixmap),
#endif
#ifdef CONFIG_PARAVIRT_SPINLOCKS
	PV_MEMBER(lock.queued_spin_lock_slowpath), PV_MEMBER(lock.queued_spin_unlock),
	PV_MEMBER(lock.wait), PV_MEMBER(lock.kick), PV_MEMBER(lock.vcpu_is_preempted),
#endif
};

/* Member i's name (NULL past the last) and its byte offset in pv_ops. */
const char *pvops_shim_pv_member(unsigned int i, unsigned int *offset)
{
	if (i >= ARRAY_SIZE(pv_members))
		return NULL;
	*offset = pv_members[i].offset;
	return pv_members[i].name;
}

/* The kernel's pv_ops: its address, and its size in *size. */
unsigned long pvops_shim_pv_ops(unsigned long *size)
{
	*size = sizeof(pv_ops);
	return (unsigned long)&pv_ops;
}

/* What the pv_ops member at byte offset `offset` holds (0 past the end). */
unsigned long pvops_shim_pv_op(unsigned int offset)
{
	if (offset + sizeof(void *) > sizeof(pv_ops))
		return 0;
	return READ_ONCE(*(unsigned long *)((char *)&pv_ops + offset));
}

/* Point the pv_ops member at byte offset `offset` at fn (what modules loaded later call). */
void pvops_shim_set_pv_op(unsigned int offset, unsigned long fn)
{
	if (offset + sizeof(void *) <= sizeof(pv_ops))
		WRITE_ONCE(*(unsigned long *)((char *)&pv_ops + offset), fn);
}

/*
 * Write a call site of the kernel image during boot, as text_poke_early() does for vmlinux:
 * only the boot CPU runs and kernel text is still writable (before mark_rodata_ro()).
 */
void pvops_shim_poke_early(unsigned long addr, const u8 *bytes, unsigned int len)
{
	unsigned long flags;

	local_irq_save(flags);
	memcpy((void *)addr, bytes, len);
	sync_core();
	local_irq_restore(flags);
}

/* /sys/kernel/pvops/kernel: the census of the kernel's own pv call sites. */
void pvops_shim_set_kernel_report(const char *text)
{
	strscpy(report_kernel, text, sizeof(report_kernel));
}
#endif
