/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The project's VMI ROM: API 3.1, the 64-bit variant of VMware's VMI API 3.0 (see
 * backends/src/VMI-64.md). Built by scripts/vmi-rom (GNU as, objcopy, then the checksum byte).
 *
 * These are the native implementations: what a VMI ROM does on hardware with nothing to
 * virtualise, the real instruction for each call. Each routine is a body that falls through its
 * end (no ret, no branch out, no RIP-relative operand, no stack use unless its mask says so);
 * the guest frames it with its own entry (endbr64) and return. The relocation table says, per
 * call number, how the guest reaches it (CALL, NOP, NONE), whether the body may be copied into a
 * call site (INLINE), and which registers it changes (the mask, RAX = bit 0 … FLAGS = bit 9).
 */
	.intel_syntax noprefix
	.text

/* relocation types */
	.equ NONE, 0
	.equ CALL, 1
	.equ JUMP, 2
	.equ NOP,  3
/* entry flags */
	.equ INLINE, 1
/* clobber mask bits */
	.equ M_RAX, 0x001
	.equ M_RCX, 0x002
	.equ M_RDX, 0x004
	.equ M_RSI, 0x008
	.equ M_RDI, 0x010
	.equ M_R8,  0x020
	.equ M_R9,  0x040
	.equ M_R10, 0x080
	.equ M_R11, 0x100
	.equ M_FL,  0x200

rom_start:
/* 0x00 */	.byte 0x55, 0xaa
/* 0x02 */	.byte (rom_end - rom_start) / 512	/* rom_length, 512-byte units */
/* 0x03 */	.code16
		lret			/* 16-bit init vector for the BIOS: nothing to set up */
		.code64
		.byte 0x90, 0x90, 0x90	/* rest of rom_entry[4] */
/* 0x07 */	.byte 0			/* rom_pad0 */
/* 0x08 */	.ascii "cVmi"		/* vrom_signature 0x696d5663 */
/* 0x0c */	.byte 1			/* api_version_min: 1 = the 64-bit variant */
/* 0x0d */	.byte 3			/* api_version_maj */
/* 0x0e */	.byte 0			/* jump_slots */
/* 0x0f */	.byte 0			/* reserved1 */
/* 0x10 */	.long 0			/* virtual_top: no hypervisor hole in the 64-bit variant */
/* 0x14 */	.word 0			/* reserved2 */
/* 0x16 */	.word license - rom_start
/* 0x18 */	.word pcir - rom_start
/* 0x1a */	.word 0			/* pnp_header_offs: no $PnP header */
/* 0x1c */	.long 0			/* rom_pad3 */
/* 0x20 */	.fill 0x60, 1, 0	/* reserved */
/* 0x80: the 64-bit variant's table header, where API 3.0 had the VMI_Init and
 * VMI_GetRelocationInfo entry points */
/* 0x80 */	.word reloc - rom_start	/* relocation table */
/* 0x82 */	.word (reloc_end - reloc) / 16	/* entries */
/* 0x84 */	.word 16		/* entry size */
/* 0x86 */	.word vmi_init - rom_start	/* VMI_Init body */
/* 0x88 */	.word vmi_init_end - vmi_init
/* 0x8a */	.word 0
/* 0x8c */	.long 0

license:	.asciz "GPL"

	.balign 4
pcir:	.ascii "PCIR"
	.word 0x15ad			/* PCI_VENDOR_ID_VMWARE */
	.word 0x0801			/* PCI_DEVICE_ID_VMWARE_VMI */
	.word 0				/* vpd */
	.word 24			/* structure length */
	.byte 0				/* structure revision */
	.byte 0x00, 0x80, 0x08		/* class code: interface, subclass, class (other system peripheral) */
	.word (rom_end - rom_start) / 512	/* image length */
	.word 0x0301			/* revision level: 3.1 */
	.byte 0				/* code type: x86 PC-AT */
	.byte 0x80			/* last image */
	.word 0

/* relocation table: call, type, flags, body, mask */
.macro reloc call, type, flags, body, mask
	.word \call
	.byte \type, \flags
	.long \body - rom_start
	.word \body\()_end - \body
	.word \mask
	.long 0
.endm
.macro absent call, type
	.word \call
	.byte \type, 0
	.long 0
	.word 0, 0
	.long 0
.endm

	.balign 16
reloc:
	reloc  0, CALL, 0,      cpuid,       M_RAX|M_RCX|M_RDX|M_R8|M_R9
	reloc  1, CALL, 0,      wrmsr,       M_RAX|M_RCX|M_RDX|M_FL
	reloc  2, CALL, 0,      rdmsr,       M_RAX|M_RCX|M_RDX|M_FL
	reloc  3, CALL, INLINE, set_gdt,     0
	reloc  5, CALL, INLINE, set_idt,     0
	reloc 10, CALL, INLINE, get_tr,      M_RAX
	reloc 15, CALL, INLINE, set_cr0,     0
	reloc 16, CALL, INLINE, set_cr2,     0
	reloc 17, CALL, INLINE, set_cr3,     0
	reloc 18, CALL, INLINE, set_cr4,     0
	reloc 19, CALL, INLINE, get_cr0,     M_RAX
	reloc 20, CALL, INLINE, get_cr2,     M_RAX
	reloc 21, CALL, INLINE, get_cr3,     M_RAX
	reloc 22, CALL, INLINE, get_cr4,     M_RAX
	reloc 23, CALL, INLINE, wbinvd,      0
	reloc 27, CALL, INLINE, rdtsc,       M_RAX|M_RDX|M_FL
	reloc 28, CALL, INLINE, clts,        0
	reloc 29, CALL, INLINE, sti,         0
	reloc 30, CALL, INLINE, cli,         0
	reloc 31, CALL, INLINE, get_if,      M_RAX
	reloc 32, CALL, INLINE, set_if,      M_FL
	reloc 35, CALL, INLINE, halt,        0
	reloc 38, CALL, INLINE, set_pxe,     0
	absent 44, NOP				/* AllocatePage: nothing to pin on hardware */
	absent 45, NOP				/* ReleasePage */
	reloc 46, CALL, INLINE, invlpg,      0
	reloc 47, CALL, 0,      flush_tlb,   M_RAX|M_FL
	reloc 65, CALL, INLINE, io_delay,    0
	absent 66, NONE				/* GetCycleFrequency: a ROM cannot know the TSC rate */
	reloc 67, CALL, 0,      cycles,      M_RAX|M_RDX|M_FL
	reloc 70, CALL, 0,      wallclock,   M_RAX|M_RCX|M_RDX|M_RSI|M_RDI|M_R8|M_R9|M_R10|M_R11|M_FL
	absent 73, NOP				/* SetLazyMode: nothing to batch */
reloc_end:

/* VMI_Init: RAX = 0, ready */
vmi_init:	xor eax, eax
vmi_init_end:

/* 0 CPUID(EDI leaf, ESI subleaf, RDX out: eax, ebx, ecx, edx); RBX kept */
cpuid:	mov r8, rdx
	mov r9, rbx
	mov eax, edi
	mov ecx, esi
	cpuid
	mov [r8], eax
	mov [r8 + 4], ebx
	mov [r8 + 8], ecx
	mov [r8 + 12], edx
	mov rbx, r9
cpuid_end:

/* 1 WRMSR(EDI msr, RSI value) */
wrmsr:	mov ecx, edi
	mov eax, esi
	mov rdx, rsi
	shr rdx, 32
	wrmsr
wrmsr_end:

/* 2 RDMSR(EDI msr) -> RAX */
rdmsr:	mov ecx, edi
	rdmsr
	shl rdx, 32
	or rax, rdx
rdmsr_end:

set_gdt:	lgdt [rdi]
set_gdt_end:
set_idt:	lidt [rdi]
set_idt_end:
get_tr:		.byte 0x48, 0x0f, 0x00, 0xc8	/* str rax */
get_tr_end:
set_cr0:	mov cr0, rdi
set_cr0_end:
set_cr2:	mov cr2, rdi
set_cr2_end:
set_cr3:	mov cr3, rdi
set_cr3_end:
set_cr4:	mov cr4, rdi
set_cr4_end:
get_cr0:	mov rax, cr0
get_cr0_end:
get_cr2:	mov rax, cr2
get_cr2_end:
get_cr3:	mov rax, cr3
get_cr3_end:
get_cr4:	mov rax, cr4
get_cr4_end:
wbinvd:		wbinvd
wbinvd_end:
/* 27 RDTSC -> RAX */
rdtsc:		rdtsc
		shl rdx, 32
		or rax, rdx
rdtsc_end:
clts:		clts
clts_end:
sti:		sti
sti_end:
cli:		cli
cli_end:
/* 31 GetInterruptMask -> RAX: RFLAGS, bit 9 meaningful */
get_if:		pushfq
		pop rax
get_if_end:
/* 32 SetInterruptMask(RDI: bit 9) */
set_if:		push rdi
		popfq
set_if_end:
/* 35 Halt: enable interrupts and halt, atomically */
halt:		sti
		hlt
halt_end:
/* 38 SetPxE(RDI entry pointer, RSI value): one 64-bit store, any level */
set_pxe:	mov [rdi], rsi
set_pxe_end:
/* 46 InvalPage(RDI address) */
invlpg:		invlpg [rdi]
invlpg_end:
/* 47 FlushTLB(EDI flags: 1 = TLB, 2 = GLOBAL): reload CR3, or toggle CR4.PGE for global
 * entries, interrupts off around the two CR4 writes */
flush_tlb:	test edi, 2
		jnz 1f
		mov rax, cr3
		mov cr3, rax
		jmp 2f
1:		pushfq
		cli
		mov rax, cr4
		xor rax, 0x80
		mov cr4, rax
		xor rax, 0x80
		mov cr4, rax
		popfq
2:
flush_tlb_end:
/* 65 IODelay: a write to port 0x80 (AL is whatever it is) */
io_delay:	out 0x80, al
io_delay_end:
/* 67 GetCycleCounter(EDI: 0 REAL, 1 AVAILABLE, 2 STOLEN) -> RAX. On hardware REAL and
 * AVAILABLE are the TSC (ordered), nothing is ever stolen, other counters read 0. */
cycles:		xor eax, eax
		cmp edi, 1
		ja 1f
		lfence
		rdtsc
		shl rdx, 32
		or rax, rdx
1:
cycles_end:

/* 70 GetWallclockTime -> RAX: ns since the epoch, from the CMOS clock (ports 0x70/0x71):
 * wait for "update in progress" to clear (bounded), read seconds … year and status B, again if
 * the seconds moved meanwhile; BCD or binary, 12- or 24-hour as status B says; years 2000–2099;
 * days from the civil date (era/year-of-era arithmetic). */
.macro cmos reg, dst
	mov al, \reg
	out 0x70, al
	in al, 0x71
	movzx \dst, al
.endm
.macro bcd r
	mov eax, \r
	shr eax, 4
	imul eax, eax, 10
	and \r, 15
	add \r, eax
.endm
wallclock:
	mov ecx, 1000000
1:	mov al, 0x0a
	out 0x70, al
	in al, 0x71
	test al, 0x80
	jz 2f
	dec ecx
	jnz 1b
2:	cmos 0x00, r8d			/* seconds */
	cmos 0x02, r9d			/* minutes */
	cmos 0x04, r10d			/* hours (bit 7: PM in 12-hour mode) */
	cmos 0x07, r11d			/* day of month */
	cmos 0x08, esi			/* month */
	cmos 0x09, ecx			/* year of the century */
	cmos 0x0b, edi			/* status B: bit 2 binary, bit 1 24-hour */
	cmos 0x00, eax
	cmp eax, r8d
	jne wallclock			/* a second passed while reading: again */
	mov edx, r10d			/* the PM bit */
	and r10d, 0x7f
	test edi, 4
	jnz 3f
	bcd r8d
	bcd r9d
	bcd r10d
	bcd r11d
	bcd esi
	bcd ecx
3:	test edi, 2
	jnz 4f
	test edx, 0x80
	jz 4f
	cmp r10d, 12			/* 12 PM is 12, 1 PM is 13 */
	jne 5f
	xor r10d, r10d
5:	add r10d, 12
4:	imul r9d, r9d, 60		/* r8 = seconds of the day */
	add r8d, r9d
	imul r10d, r10d, 3600
	add r8d, r10d
	add ecx, 2000			/* y, counted from March */
	cmp esi, 2
	ja 6f
	dec ecx
6:	add esi, 9			/* mp = (month + 9) mod 12 */
	cmp esi, 12
	jb 7f
	sub esi, 12
7:	imul eax, esi, 153		/* day of the year = (153 mp + 2) / 5 + day - 1 */
	add eax, 2
	xor edx, edx
	mov r9d, 5
	div r9d
	lea r11d, [r11 + rax - 1]
	mov eax, ecx			/* era = y / 400, yoe = y mod 400 */
	xor edx, edx
	mov r9d, 400
	div r9d
	imul r10, rax, 146097
	mov ecx, edx
	imul edi, ecx, 365		/* day of the era = 365 yoe + yoe/4 - yoe/100 + doy */
	add edi, r11d
	mov eax, ecx
	shr eax, 2
	add edi, eax
	mov eax, ecx
	xor edx, edx
	mov r9d, 100
	div r9d
	sub edi, eax
	add r10, rdi
	sub r10, 719468			/* days since 1970-01-01 */
	imul rax, r10, 86400
	add rax, r8
	imul rax, rax, 1000000000
wallclock_end:

/* the last byte of the image is padding: scripts/vmi-rom sets it so the bytes sum to 0 */
	.byte 0
	.balign 512, 0
rom_end:
