// SPDX-License-Identifier: GPL-2.0
/*
 * The benchmark's one harness (bench.rs drives it; shim.h declares it).
 *
 * Every path of every row is a loop made by BENCH_LOOP below, compiled by the kernel's gcc:
 *
 *   - raw:   the bare instruction(s), inline asm;
 *   - pvops: a pvops call site emitted from C exactly as pvops::pv_site! emits it (PV_SITE:
 *            `call *table+slot(%rip)`, NOP padding to the op's site length, the retpoline-safe
 *            annotation, the 8-byte record), which bench.rs patches with the pvops engine
 *            (inline, direct, or left indirect) before timing it;
 *   - linux: Linux's own path for the operation (arch_local_save_flags(), read_cr2(), ...), in
 *            this kernel (PARAVIRT_XXL) a pv_ops call site the module loader patched for the
 *            running hypervisor, or native code where Linux has no pv op;
 *   - linux_indirect: an indirect call through Linux's own pv_ops slot, as an unpatched Linux
 *            site would make it (this kernel's retpoline settings).
 *
 * So the pvops and Linux columns come out of the same loop code: where their bytes are the
 * same (the control rows), so is their cost.
 *
 * The pvops sites call through pvops_bench_pv_ops (bench.rs), a copy of the installed PV_OPS:
 * C cannot name PV_OPS itself (a mangled Rust symbol of another object), so these sites are
 * recorded in their own section, .pvops_bench_sites, not in the module's site table; bench.rs
 * patches them with the same engine, under the same stop_machine writer, as the module's.
 */
#include <linux/irqflags.h>
#include <linux/objtool.h>
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

/* Keep a result: an empty asm statement that takes it in a register. */
#define KEEP(x) asm volatile("" : : "r"(x))
/* Make a value opaque (the compiler must assume the asm changed it). */
#define OPAQUE(x) asm volatile("" : "+r"(x))

/*
 * The loop every path is measured with: `reps` (>= 1) iterations of the body between two
 * serialised TSC reads. The counter goes through OPAQUE each iteration (and so does `arg` in
 * the bodies that use it), so the compiler can neither unroll the loop nor hoist anything out
 * of the body; the counter lives in
 * R12, a register no call site or call uses, so every loop ends in the same `sub $1, %r12d;
 * jne` (in a register of the compiler's choice, it shuffled the counter around sites that take
 * fixed argument registers); an empty body gives the loop's own cost (pvops_linux_empty),
 * subtracted from every path.
 */
#define BENCH_LOOP(name, ...)						\
	static noinline notrace u64 bench_##name(u32 reps, u64 arg)	\
	{								\
		u64 t0, t1;						\
		register u32 i asm("r12") = reps;			\
									\
		t0 = rdtsc_ordered();					\
		do {							\
			__VA_ARGS__;					\
			OPAQUE(i);					\
		} while (--i);						\
		t1 = rdtsc_ordered();					\
		return t1 - t0;						\
	}

/* The records' section; its bounds are subsections 0 and 2 (pvops_linux_bench_sites). */
#define BENCH_SITES ".pvops_bench_sites"

/*
 * One pvops call site, as pv_site! emits it (pvops/src/site.rs), with a label naming its first
 * byte. `.discard.noendbr`: the record (and the row table) point at the site, which is no
 * indirect-branch target; objtool only exempts .parainstructions from that check by name.
 */
#define PV_SITE(label)							\
	label ":\n"							\
	"771:\n\t"							\
	"call *pvops_bench_pv_ops+%c[slot](%%rip)\n\t"			\
	".if %c[len] > %c[icl]\n\t.skip %c[len] - %c[icl], 0x90\n\t.endif\n\t" \
	".pushsection .discard.retpoline_safe\n\t.long 771b\n\t.popsection\n\t" \
	".pushsection .discard.noendbr\n\t.long 771b\n\t.popsection\n\t" \
	".pushsection " BENCH_SITES ", \"a\"\n\t.subsection 1\n\t.balign 4\n\t" \
	".long 771b - .\n\t.byte %c[op], %c[len]\n\t.short %c[clob]\n\t" \
	".popsection\n"
#define PV_SITE_IN(OP)							\
	[slot] "i"(PVOPS_OP_##OP * PVOPS_ABI_SLOT_SIZE), [len] "i"(PVOPS_LEN_##OP), \
	[icl] "i"(PVOPS_ABI_INDIRECT_CALL_LEN), [op] "i"(PVOPS_OP_##OP),	\
	[clob] "i"(PVOPS_CLOB_##OP)

/* Callee-save ops (only RAX and the flags change): arguments in RDI, RSI, result in RAX. */
#define CS(OP) BUILD_BUG_ON(PVOPS_CLOB_##OP != PVOPS_ABI_CLOB_CALLEE_SAVE)
#define PV_CS0(lbl, OP) ({ u64 __r; CS(OP);				\
	asm volatile(PV_SITE(lbl) : "=a"(__r) : PV_SITE_IN(OP) : "memory", "cc"); __r; })
#define PV_CS1(lbl, OP, a) ({ u64 __r; CS(OP);				\
	asm volatile(PV_SITE(lbl) : "=a"(__r) : "D"((u64)(a)), PV_SITE_IN(OP) : "memory", "cc"); \
	__r; })
#define PV_CS2(lbl, OP, a, b) ({ u64 __r; CS(OP);			\
	asm volatile(PV_SITE(lbl) : "=a"(__r) : "D"((u64)(a)), "S"((u64)(b)), PV_SITE_IN(OP) \
		     : "memory", "cc"); __r; })
/* C-convention ops: arguments in RDI, RSI, RDX, RCX, R8, result in RAX, every caller-saved
 * register changed. */
#define C(OP) BUILD_BUG_ON(PVOPS_CLOB_##OP != PVOPS_ABI_CLOB_C)
#define PV_C0(lbl, OP) ({ u64 __r; C(OP);				\
	asm volatile(PV_SITE(lbl) : "=a"(__r) : PV_SITE_IN(OP)		\
		     : "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "memory", "cc"); __r; })
#define PV_C1(lbl, OP, a) ({ u64 __r, __a = (u64)(a); C(OP);		\
	asm volatile(PV_SITE(lbl) : "=a"(__r), "+D"(__a) : PV_SITE_IN(OP) \
		     : "rcx", "rdx", "rsi", "r8", "r9", "r10", "r11", "memory", "cc"); __r; })
#define PV_C2(lbl, OP, a, b) ({ u64 __r, __a = (u64)(a), __b = (u64)(b); C(OP); \
	asm volatile(PV_SITE(lbl) : "=a"(__r), "+D"(__a), "+S"(__b) : PV_SITE_IN(OP) \
		     : "rcx", "rdx", "r8", "r9", "r10", "r11", "memory", "cc"); __r; })
#define PV_C3(lbl, OP, a, b, c) ({ u64 __r, __a = (u64)(a), __b = (u64)(b), __c = (u64)(c); \
	C(OP);								\
	asm volatile(PV_SITE(lbl) : "=a"(__r), "+D"(__a), "+S"(__b), "+d"(__c) : PV_SITE_IN(OP) \
		     : "rcx", "r8", "r9", "r10", "r11", "memory", "cc"); __r; })
#define PV_C5(lbl, OP, a, b, c, d, e) ({ u64 __r, __a = (u64)(a), __b = (u64)(b);	\
	u64 __c = (u64)(c), __d = (u64)(d); register u64 __e asm("r8") = (u64)(e); C(OP); \
	asm volatile(PV_SITE(lbl) : "=a"(__r), "+D"(__a), "+S"(__b), "+d"(__c), "+c"(__d), \
		     "+r"(__e) : PV_SITE_IN(OP) : "r9", "r10", "r11", "memory", "cc"); __r; })

/* What the rows operate on: a scratch "page-table entry" (written, and flushed from the TLB),
 * the IDT register as SIDT found it (loaded again), the backend's harmless hypercall. */
static u64 scratch_pte __aligned(8);
static struct desc_ptr idt_now;
static unsigned long hc_nr, hc_a0;
static bool hc_kvm, hc_vmmcall;
struct bench_cpuid { u32 eax, ebx, ecx, edx; };

BENCH_LOOP(empty, )

BENCH_LOOP(raw_save_fl, { u64 f; asm volatile("pushfq; pop %0" : "=r"(f)); KEEP(f); })
BENCH_LOOP(pv_save_fl, KEEP(PV_CS0("pvops_bench_save_fl_0", SAVE_FL)))
BENCH_LOOP(linux_save_fl, KEEP(arch_local_save_flags()))
BENCH_LOOP(linux_ind_save_fl, KEEP(((unsigned long (*)(void))pv_ops.irq.save_fl.func)()))

/* arg: the flags with IF clear (row restore_fl_off) or set (restore_fl_on) */
BENCH_LOOP(raw_restore_fl, OPAQUE(arg); asm volatile("push %0; popfq" : : "r"(arg) : "memory", "cc"))
BENCH_LOOP(pv_restore_fl, OPAQUE(arg); PV_CS1("pvops_bench_restore_fl_0", RESTORE_FL, arg))
BENCH_LOOP(linux_restore_fl, OPAQUE(arg); arch_local_irq_restore(arg))
BENCH_LOOP(raw_restore_fl_on, OPAQUE(arg); asm volatile("push %0; popfq; cli" : : "r"(arg) : "memory", "cc"))
BENCH_LOOP(pv_restore_fl_on, OPAQUE(arg); PV_CS1("pvops_bench_restore_fl_on_0", RESTORE_FL, arg);
	   PV_CS0("pvops_bench_restore_fl_on_1", IRQ_DISABLE))
BENCH_LOOP(linux_restore_fl_on, OPAQUE(arg); arch_local_irq_restore(arg); arch_local_irq_disable())

BENCH_LOOP(raw_irq_disable, asm volatile("cli" : : : "memory"))
BENCH_LOOP(pv_irq_disable, PV_CS0("pvops_bench_irq_disable_0", IRQ_DISABLE))
BENCH_LOOP(linux_irq_disable, arch_local_irq_disable())

BENCH_LOOP(raw_irq_enable, asm volatile("sti; cli" : : : "memory"))
BENCH_LOOP(pv_irq_enable, PV_CS0("pvops_bench_irq_enable_0", IRQ_ENABLE);
	   PV_CS0("pvops_bench_irq_enable_1", IRQ_DISABLE))
BENCH_LOOP(linux_irq_enable, arch_local_irq_enable(); arch_local_irq_disable())

BENCH_LOOP(raw_read_cr0, { u64 v; asm volatile("mov %%cr0, %0" : "=r"(v)); KEEP(v); })
BENCH_LOOP(pv_read_cr0, KEEP(PV_CS0("pvops_bench_read_cr0_0", READ_CR0)))
BENCH_LOOP(linux_read_cr0, KEEP(read_cr0()))

BENCH_LOOP(raw_read_cr2, { u64 v; asm volatile("mov %%cr2, %0" : "=r"(v)); KEEP(v); })
BENCH_LOOP(pv_read_cr2, KEEP(PV_CS0("pvops_bench_read_cr2_0", READ_CR2)))
BENCH_LOOP(linux_read_cr2, KEEP(read_cr2()))

BENCH_LOOP(raw_write_cr2,
	   { u64 v; asm volatile("mov %%cr2, %0; mov %0, %%cr2" : "=r"(v) : : "memory"); })
BENCH_LOOP(pv_write_cr2, PV_CS1("pvops_bench_write_cr2_1", WRITE_CR2,
				PV_CS0("pvops_bench_write_cr2_0", READ_CR2)))
BENCH_LOOP(linux_write_cr2, write_cr2(read_cr2()))

BENCH_LOOP(raw_read_cr3, { u64 v; asm volatile("mov %%cr3, %0" : "=r"(v)); KEEP(v); })
BENCH_LOOP(pv_read_cr3, KEEP(PV_CS0("pvops_bench_read_cr3_0", READ_CR3)))
BENCH_LOOP(linux_read_cr3, KEEP(__read_cr3()))

BENCH_LOOP(raw_read_cr4, { u64 v; asm volatile("mov %%cr4, %0" : "=r"(v)); KEEP(v); })
BENCH_LOOP(pv_read_cr4, KEEP(PV_CS0("pvops_bench_read_cr4_0", READ_CR4)))
BENCH_LOOP(linux_read_cr4, KEEP(__read_cr4()))

BENCH_LOOP(raw_cpuid, { u32 a, b, c, d;
	   asm volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0), "c"(0)); KEEP(a); })
BENCH_LOOP(pv_cpuid, { struct bench_cpuid r;
	   PV_C3("pvops_bench_cpuid_0", CPUID, 0, 0, &r); KEEP(r.eax); })
BENCH_LOOP(linux_cpuid, { unsigned int a = 0, b, c = 0, d; __cpuid(&a, &b, &c, &d); KEEP(a); })

BENCH_LOOP(raw_read_msr, { u32 lo, hi;
	   asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(MSR_EFER)); KEEP(lo); KEEP(hi); })
BENCH_LOOP(pv_read_msr, KEEP(PV_C1("pvops_bench_read_msr_0", READ_MSR, MSR_EFER)))
BENCH_LOOP(linux_read_msr, { u64 v; rdmsrl(MSR_EFER, v); KEEP(v); })

BENCH_LOOP(pv_read_msr_safe, { u64 v;
	   KEEP(PV_C2("pvops_bench_read_msr_safe_0", READ_MSR_SAFE, MSR_EFER, &v)); KEEP(v); })
BENCH_LOOP(linux_read_msr_safe, { u64 v; KEEP(rdmsrl_safe(MSR_EFER, &v)); KEEP(v); })

BENCH_LOOP(raw_flush_tlb_one_user, asm volatile("invlpg (%0)" : : "r"(&scratch_pte) : "memory"))
BENCH_LOOP(pv_flush_tlb_one_user,
	   PV_CS1("pvops_bench_flush_tlb_one_user_0", FLUSH_TLB_ONE_USER, &scratch_pte))
BENCH_LOOP(linux_flush_tlb_one_user, __flush_tlb_one_user((unsigned long)&scratch_pte))

BENCH_LOOP(raw_store_tr, { u64 v; asm volatile("str %0" : "=r"(v)); KEEP(v); })
BENCH_LOOP(pv_store_tr, KEEP(PV_CS0("pvops_bench_store_tr_0", STORE_TR)))
BENCH_LOOP(linux_store_tr, { unsigned long tr; store_tr(tr); KEEP(tr); })

BENCH_LOOP(raw_load_idt, asm volatile("lidt %0" : : "m"(idt_now) : "memory"))
BENCH_LOOP(pv_load_idt, PV_CS1("pvops_bench_load_idt_0", LOAD_IDT, &idt_now))
BENCH_LOOP(linux_load_idt, load_idt(&idt_now))

BENCH_LOOP(raw_io_delay, asm volatile("outb %%al, $0x80" : : : "memory"))
BENCH_LOOP(pv_io_delay, PV_CS0("pvops_bench_io_delay_0", IO_DELAY))
BENCH_LOOP(linux_io_delay, slow_down_io())

/* arg: the value written (1) */
BENCH_LOOP(raw_set_pte, OPAQUE(arg); asm volatile("movq %1, %0" : "=m"(scratch_pte) : "r"(arg) : "memory"))
BENCH_LOOP(pv_set_pte, OPAQUE(arg); PV_CS2("pvops_bench_set_pte_0", SET_PTE, &scratch_pte, arg))
/* (pte_t){} rather than __pte(), itself a pv op (mmu.make_pte) under PARAVIRT_XXL */
BENCH_LOOP(linux_set_pte, OPAQUE(arg); set_pte((pte_t *)&scratch_pte, (pte_t){ .pte = arg }))

BENCH_LOOP(raw_sched_clock, KEEP(rdtsc_ordered()))
BENCH_LOOP(pv_sched_clock, KEEP(PV_C0("pvops_bench_sched_clock_0", SCHED_CLOCK)))
BENCH_LOOP(linux_sched_clock, KEEP(sched_clock()))

BENCH_LOOP(pv_tsc_khz, KEEP(PV_C0("pvops_bench_tsc_khz_0", TSC_KHZ)))
BENCH_LOOP(pv_steal_clock, KEEP(PV_C1("pvops_bench_steal_clock_0", STEAL_CLOCK, 0)))

BENCH_LOOP(raw_write_cr3,
	   { u64 v; asm volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(v) : : "memory"); })
BENCH_LOOP(pv_write_cr3, PV_CS1("pvops_bench_write_cr3_1", WRITE_CR3,
				PV_CS0("pvops_bench_write_cr3_0", READ_CR3)))
BENCH_LOOP(linux_write_cr3, write_cr3(__read_cr3()))

BENCH_LOOP(pv_flush_tlb_user, PV_CS0("pvops_bench_flush_tlb_user_0", FLUSH_TLB_USER))
BENCH_LOOP(linux_flush_tlb_user, __flush_tlb_local())

BENCH_LOOP(pv_lazy_mode, PV_C0("pvops_bench_lazy_mode_0", LAZY_MODE_ENTER);
	   PV_C0("pvops_bench_lazy_mode_1", LAZY_MODE_LEAVE))
BENCH_LOOP(linux_lazy_mode, arch_enter_lazy_mmu_mode(); arch_leave_lazy_mmu_mode())

/* KVM's register layout: nr in RAX, a0 in RBX; the raw loop is picked by vendor */
BENCH_LOOP(raw_hypercall_vmcall, { long r;
	   asm volatile("vmcall" : "=a"(r) : "a"(hc_nr), "b"(hc_a0) : "memory"); KEEP(r); })
BENCH_LOOP(raw_hypercall_vmmcall, { long r;
	   asm volatile("vmmcall" : "=a"(r) : "a"(hc_nr), "b"(hc_a0) : "memory"); KEEP(r); })
BENCH_LOOP(pv_hypercall, KEEP(PV_C5("pvops_bench_hypercall_0", HYPERCALL, hc_nr, hc_a0, 0, 0, 0)))
BENCH_LOOP(linux_hypercall, KEEP(kvm_hypercall1(hc_nr, hc_a0)))

BENCH_LOOP(pv_alloc_pt, PV_C2("pvops_bench_alloc_pt_0", ALLOC_PT, 1, 1))
/* Linux's mmu.alloc_pte wants an mm; init_mm is not exported to modules. On every rig the
 * benchmark runs on (not Xen PV: refused) the slot is Linux's nop, which ignores it. */
BENCH_LOOP(linux_alloc_pt, paravirt_alloc_pte(NULL, 1))

/* The site labels (defined by PV_SITE's asm above). */
#define SITE(name) extern const u8 pvops_bench_##name[]
SITE(save_fl_0); SITE(restore_fl_0); SITE(restore_fl_on_0); SITE(restore_fl_on_1);
SITE(irq_disable_0); SITE(irq_enable_0); SITE(irq_enable_1); SITE(read_cr0_0);
SITE(read_cr2_0); SITE(write_cr2_0); SITE(write_cr2_1); SITE(read_cr3_0); SITE(read_cr4_0);
SITE(cpuid_0); SITE(read_msr_0); SITE(read_msr_safe_0); SITE(flush_tlb_one_user_0);
SITE(store_tr_0); SITE(load_idt_0); SITE(io_delay_0); SITE(set_pte_0); SITE(sched_clock_0);
SITE(tsc_khz_0); SITE(steal_clock_0); SITE(write_cr3_0); SITE(write_cr3_1);
SITE(flush_tlb_user_0); SITE(lazy_mode_0); SITE(lazy_mode_1); SITE(hypercall_0);
SITE(alloc_pt_0);

/* The records' bounds: subsection 0 opens the section, subsection 2 closes it, so every
 * record (subsection 1) lies between them whatever order gcc emits the functions in. */
asm(".pushsection " BENCH_SITES ", \"a\"\n\t.subsection 0\n\t.balign 4\n"
    "pvops_bench_sites_start:\n\t.subsection 2\n\t.balign 4\n"
    "pvops_bench_sites_end:\n\t.popsection\n");
extern const u8 pvops_bench_sites_start[], pvops_bench_sites_end[];

typedef u64 (*bench_fn)(u32 reps, u64 arg);

enum bench_arg { ARG_ONE, ARG_IF_OFF, ARG_IF_ON };

struct bench_row {
	const char *name;
	bench_fn raw, pvops, peer, peer_indirect;
	enum pvops_linux_kind kind;
	const char *note;
	bool control;
	enum bench_arg arg;
	const u8 *site[2];
};

#define ROW(n, r, p, l, li, k, no, c, a, s) \
	{ .name = n, .raw = r, .pvops = p, .peer = l, .peer_indirect = li, .kind = k, \
	  .note = no, .control = c, .arg = a, .site = s }
#define SITES(...) { __VA_ARGS__ }
#define PV PVOPS_LINUX_KIND_PV
#define NATIVE PVOPS_LINUX_KIND_NATIVE
#define NONE PVOPS_LINUX_KIND_NONE

static const struct bench_row rows[] = {
	ROW("irq.save_fl", bench_raw_save_fl, bench_pv_save_fl, bench_linux_save_fl,
	  bench_linux_ind_save_fl, PV, "arch_local_save_flags()", true, ARG_ONE,
	  SITES(pvops_bench_save_fl_0)),
	ROW("irq.restore_fl(IF=0)", bench_raw_restore_fl, bench_pv_restore_fl, bench_linux_restore_fl,
	  NULL, PV, "arch_local_irq_restore(): IF off in the flags, so no popf (a test and a branch)",
	  false, ARG_IF_OFF, SITES(pvops_bench_restore_fl_0)),
	ROW("irq.restore_fl(IF=1)+irq_disable", bench_raw_restore_fl_on, bench_pv_restore_fl_on,
	  bench_linux_restore_fl_on, NULL, PV,
	  "arch_local_irq_restore() (IF on: the pv irq_enable) + arch_local_irq_disable()", false,
	  ARG_IF_ON, SITES(pvops_bench_restore_fl_on_0, pvops_bench_restore_fl_on_1)),
	ROW("irq.irq_disable", bench_raw_irq_disable, bench_pv_irq_disable, bench_linux_irq_disable,
	  NULL, PV, "arch_local_irq_disable()", true, ARG_ONE, SITES(pvops_bench_irq_disable_0)),
	ROW("irq.irq_enable+irq_disable", bench_raw_irq_enable, bench_pv_irq_enable,
	  bench_linux_irq_enable, NULL, PV, "arch_local_irq_enable() + arch_local_irq_disable()",
	  false, ARG_ONE, SITES(pvops_bench_irq_enable_0, pvops_bench_irq_enable_1)),
	ROW("cpu.read_cr0", bench_raw_read_cr0, bench_pv_read_cr0, bench_linux_read_cr0, NULL, PV,
	  "read_cr0()", false, ARG_ONE, SITES(pvops_bench_read_cr0_0)),
	ROW("mmu.read_cr2", bench_raw_read_cr2, bench_pv_read_cr2, bench_linux_read_cr2, NULL, PV,
	  "read_cr2()", true, ARG_ONE, SITES(pvops_bench_read_cr2_0)),
	ROW("mmu.write_cr2(read_cr2)", bench_raw_write_cr2, bench_pv_write_cr2, bench_linux_write_cr2,
	  NULL, PV, "write_cr2(read_cr2())", false, ARG_ONE,
	  SITES(pvops_bench_write_cr2_0, pvops_bench_write_cr2_1)),
	ROW("mmu.read_cr3", bench_raw_read_cr3, bench_pv_read_cr3, bench_linux_read_cr3, NULL, PV,
	  "__read_cr3()", false, ARG_ONE, SITES(pvops_bench_read_cr3_0)),
	ROW("cpu.read_cr4", bench_raw_read_cr4, bench_pv_read_cr4, bench_linux_read_cr4, NULL, NATIVE,
	  "no pv op in 6.12: __read_cr4() is mov %cr4 inline", true, ARG_ONE,
	  SITES(pvops_bench_read_cr4_0)),
	ROW("cpu.cpuid", bench_raw_cpuid, bench_pv_cpuid, bench_linux_cpuid, NULL, PV, "__cpuid()",
	  false, ARG_ONE, SITES(pvops_bench_cpuid_0)),
	ROW("cpu.read_msr", bench_raw_read_msr, bench_pv_read_msr, bench_linux_read_msr, NULL, PV,
	  "rdmsrl(MSR_EFER)", false, ARG_ONE, SITES(pvops_bench_read_msr_0)),
	ROW("cpu.read_msr_safe", NULL, bench_pv_read_msr_safe, bench_linux_read_msr_safe, NULL, PV,
	  "rdmsrl_safe(MSR_EFER)", false, ARG_ONE, SITES(pvops_bench_read_msr_safe_0)),
	ROW("mmu.flush_tlb_one_user", bench_raw_flush_tlb_one_user, bench_pv_flush_tlb_one_user,
	  bench_linux_flush_tlb_one_user, NULL, PV, "__flush_tlb_one_user()", false, ARG_ONE,
	  SITES(pvops_bench_flush_tlb_one_user_0)),
	ROW("cpu.store_tr", bench_raw_store_tr, bench_pv_store_tr, bench_linux_store_tr, NULL, NATIVE,
	  "no pv op: store_tr() is str inline", false, ARG_ONE, SITES(pvops_bench_store_tr_0)),
	ROW("cpu.load_idt", bench_raw_load_idt, bench_pv_load_idt, bench_linux_load_idt, NULL, PV,
	  "load_idt()", false, ARG_ONE, SITES(pvops_bench_load_idt_0)),
	ROW("cpu.io_delay", bench_raw_io_delay, bench_pv_io_delay, bench_linux_io_delay, NULL, PV,
	  "slow_down_io()", false, ARG_ONE, SITES(pvops_bench_io_delay_0)),
	ROW("mmu.set_pte", bench_raw_set_pte, bench_pv_set_pte, bench_linux_set_pte, NULL, PV,
	  "set_pte() (its pv op)", false, ARG_ONE, SITES(pvops_bench_set_pte_0)),
	ROW("timer.sched_clock", bench_raw_sched_clock, bench_pv_sched_clock, bench_linux_sched_clock,
	  NULL, PV, "sched_clock() (a function around the pv_sched_clock static call); raw: rdtsc",
	  false, ARG_ONE, SITES(pvops_bench_sched_clock_0)),
	ROW("timer.tsc_khz", NULL, bench_pv_tsc_khz, NULL, NULL, NONE,
	  "no pv op: Linux reads the exported tsc_khz variable", false, ARG_ONE,
	  SITES(pvops_bench_tsc_khz_0)),
	ROW("timer.steal_clock", NULL, bench_pv_steal_clock, NULL, NULL, NONE,
	  "Linux's paravirt_steal_clock() is a static call not exported to modules", false, ARG_ONE,
	  SITES(pvops_bench_steal_clock_0)),
	ROW("mmu.write_cr3(read_cr3)", bench_raw_write_cr3, bench_pv_write_cr3, bench_linux_write_cr3,
	  NULL, PV, "write_cr3(__read_cr3())", false, ARG_ONE,
	  SITES(pvops_bench_write_cr3_0, pvops_bench_write_cr3_1)),
	ROW("mmu.flush_tlb_user", bench_raw_write_cr3, bench_pv_flush_tlb_user,
	  bench_linux_flush_tlb_user, NULL, PV, "__flush_tlb_local(); raw: a CR3 reload", false,
	  ARG_ONE, SITES(pvops_bench_flush_tlb_user_0)),
	ROW("mmu.lazy_mode_enter+leave", NULL, bench_pv_lazy_mode, bench_linux_lazy_mode, NULL, PV,
	  "arch_enter_lazy_mmu_mode() + arch_leave_lazy_mmu_mode()", false, ARG_ONE,
	  SITES(pvops_bench_lazy_mode_0, pvops_bench_lazy_mode_1)),
	ROW("cpu.hypercall", bench_raw_hypercall_vmcall, bench_pv_hypercall, bench_linux_hypercall,
	  NULL, NATIVE, "no pv op: kvm_hypercall1() is the instruction (an alternative)", false,
	  ARG_ONE, SITES(pvops_bench_hypercall_0)),
	ROW("mmu.alloc_pt", NULL, bench_pv_alloc_pt, bench_linux_alloc_pt, NULL, PV,
	  "paravirt_alloc_pte()", false, ARG_ONE, SITES(pvops_bench_alloc_pt_0)),
};

u32 pvops_linux_abi(enum pvops_linux_abi which)
{
	return which;
}

u32 pvops_linux_rows(void)
{
	return ARRAY_SIZE(rows);
}

const char *pvops_linux_row_name(u32 row)
{
	return row < ARRAY_SIZE(rows) ? rows[row].name : NULL;
}

enum pvops_linux_kind pvops_linux_row_kind(u32 row)
{
	return row < ARRAY_SIZE(rows) ? rows[row].kind : PVOPS_LINUX_KIND_NONE;
}

const char *pvops_linux_row_note(u32 row)
{
	return row < ARRAY_SIZE(rows) ? rows[row].note : NULL;
}

int pvops_linux_row_control(u32 row)
{
	return row < ARRAY_SIZE(rows) && rows[row].control;
}

unsigned long pvops_linux_row_site(u32 row, u32 n)
{
	return row < ARRAY_SIZE(rows) && n < 2 ? (unsigned long)rows[row].site[n] : 0;
}

static bench_fn row_fn(u32 row, enum pvops_linux_loop path)
{
	const struct bench_row *r;

	if (row >= ARRAY_SIZE(rows))
		return NULL;
	r = &rows[row];
	if (r->raw == bench_raw_hypercall_vmcall && path != PVOPS_LINUX_LOOP_PVOPS) {
		/* the instruction exists (and is answered harmlessly) on KVM only */
		if (!hc_kvm)
			return NULL;
		if (path == PVOPS_LINUX_LOOP_RAW && hc_vmmcall)
			return bench_raw_hypercall_vmmcall;
	}
	switch (path) {
	case PVOPS_LINUX_LOOP_RAW:
		return r->raw;
	case PVOPS_LINUX_LOOP_PVOPS:
		return r->pvops;
	case PVOPS_LINUX_LOOP_LINUX:
		return r->peer;
	case PVOPS_LINUX_LOOP_LINUX_INDIRECT:
		return r->peer_indirect;
	}
	return NULL;
}

int pvops_linux_has(u32 row, enum pvops_linux_loop path)
{
	return row_fn(row, path) != NULL;
}

u64 pvops_linux_run(u32 row, enum pvops_linux_loop path, u32 reps)
{
	bench_fn f = row_fn(row, path);
	u64 arg = 1;

	if (!f || !reps)
		return 0;
	if (rows[row].arg == ARG_IF_OFF)
		arg = native_save_fl() & ~X86_EFLAGS_IF;
	else if (rows[row].arg == ARG_IF_ON)
		arg = native_save_fl() | X86_EFLAGS_IF;
	return f(reps, arg);
}

u64 pvops_linux_empty(u32 reps)
{
	return reps ? bench_empty(reps, 1) : 0;
}

void pvops_linux_setup(u64 nr, u64 a0, int kvm, int vmmcall)
{
	hc_nr = nr;
	hc_a0 = a0;
	hc_kvm = kvm;
	hc_vmmcall = vmmcall;
	store_idt(&idt_now);
}

void pvops_linux_bench_sites(unsigned long *start, unsigned long *end)
{
	*start = (unsigned long)pvops_bench_sites_start;
	*end = (unsigned long)pvops_bench_sites_end;
}
