//! `lguest-host`: the lguest host pvops ships, for its 64-bit lguest port
//! (`backends/src/lguest.md`). A small launcher on KVM: it boots the guest kernel (a bzImage,
//! an initramfs, a command line) in long mode, announces lguest in the boot data
//! (`hardware_subarch` = 1, `hardware_subarch_data` = the port's signature), and services the
//! guest's hypercalls: KVM's Xen-HVM hypercall interception
//! (`KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL`) hands every `vmcall`/`vmmcall` to this process as a
//! `KVM_EXIT_XEN` exit, and [`host::Host`] answers it.
//!
//! The machine: one vCPU, RAM from 0, KVM's in-kernel interrupt controllers (PIC, IO-APIC,
//! local APIC) and PIT, a 16550A on COM1 for the console ([`serial`]), a CMOS clock
//! ([`rtc`]); nothing else (no ACPI, no PCI devices). The guest's reset (keyboard controller
//! 0xfe, port 0xcf9, a triple fault) ends the launcher, as QEMU's `-no-reboot` does.
//!
//! ```text
//! lguest-host --kernel bzImage --initrd initramfs.cpio.gz --cmdline "console=ttyS0" [--mem MiB]
//! ```

mod host;
mod rtc;
mod serial;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, kvm_xen_hvm_config, Msrs, KVM_EXIT_XEN,
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_HALTED, KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use pvops_backends::lguest::abi::{boot_signature, ABI_VERSION, X86_SUBARCH_LGUEST};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

/// Where the boot structures go (the classic layout of small launchers).
const GDT: u64 = 0x500;
const IDT: u64 = 0x520;
const BOOT_PARAMS: u64 = 0x7000;
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000;
const CMDLINE: u64 = 0x2_0000;
const KERNEL: u64 = 0x10_0000;
/// End of low RAM (the EBDA would start here on a PC).
const LOW_RAM_END: u64 = 0x9_fc00;
const E820_RAM: u32 = 1;
/// `KVM_XEN_HVM_CONFIG` (`_IOW(KVMIO, 0x7a, struct kvm_xen_hvm_config)`).
const KVM_XEN_HVM_CONFIG: u64 =
    (1 << 30) | ((std::mem::size_of::<kvm_xen_hvm_config>() as u64) << 16) | (0xae << 8) | 0x7a;
/// `KVM_CAP_XEN_HVM`.
const KVM_CAP_XEN_HVM: u64 = 38;
const MSR_IA32_TSC: u32 = 0x10;
/// The hypercall-page MSR KVM's Xen support is configured with (QEMU's choice too).
const XEN_HYPERCALL_MSR: u32 = 0x4000_0000;

type Error = Box<dyn std::error::Error>;

struct Args {
    kernel: String,
    initrd: Option<String>,
    cmdline: String,
    mem_mib: u64,
}

fn args() -> Result<Args, Error> {
    let mut a = Args {
        kernel: String::new(),
        initrd: None,
        cmdline: String::new(),
        mem_mib: 256,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{k} needs a value"));
        match k.as_str() {
            "--kernel" => a.kernel = v()?,
            "--initrd" => a.initrd = Some(v()?),
            "--cmdline" => a.cmdline = v()?,
            "--mem" => a.mem_mib = v()?.parse()?,
            _ => return Err(format!("unknown argument {k}").into()),
        }
    }
    if a.kernel.is_empty() {
        return Err(
            "usage: lguest-host --kernel bzImage [--initrd file] [--cmdline text] [--mem MiB]"
                .into(),
        );
    }
    Ok(a)
}

/// The vCPU as the lguest host sees it.
struct KvmVcpu<'a>(&'a VcpuFd);

impl host::Vcpu for KvmVcpu<'_> {
    fn guest_tsc(&self) -> Option<u64> {
        let mut msrs = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        }])
        .ok()?;
        (self.0.get_msrs(&mut msrs).ok()? == 1).then(|| msrs.as_slice()[0].data)
    }
    fn translate(&self, va: u64) -> Option<u64> {
        let t = self.0.translate_gva(va).ok()?;
        (t.valid != 0).then_some(t.physical_address)
    }
    fn cr3(&self) -> Option<u64> {
        self.0.get_sregs().ok().map(|s| s.cr3)
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("lguest-host: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Error> {
    let a = args()?;
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    let vm = kvm.create_vm()?;
    let size = a.mem_mib << 20;
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])?;
    let base = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| format!("guest RAM: {e}"))? as usize;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: base as u64,
        flags: 0,
    };
    // SAFETY: the mapping belongs to `mem`, which lives until the process exits.
    unsafe { vm.set_user_memory_region(region)? };
    vm.set_tss_address(0xfffb_d000)?;
    vm.set_identity_map_address(0xfffb_c000)?;
    vm.create_irq_chip()?;
    // the PIT with its speaker port (0x61) in the kernel too: Linux calibrates the TSC with
    // channel 2, gated and read through that port
    vm.create_pit2(kvm_pit_config::default())?;
    intercept_hypercalls(&kvm, &vm)?;

    let vcpu = vm.create_vcpu(0)?;
    // The guest kernel has no clock to calibrate its TSC against (no HPET or ACPI PM timer,
    // and PIT calibration fails when every port read is a nested exit): tell it, as lguest
    // told its guests `tsc_khz`.
    let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
    let mut a = a;
    if tsc_khz != 0 && !a.cmdline.contains("tsc_early_khz=") {
        a.cmdline = format!("{} tsc_early_khz={tsc_khz}", a.cmdline)
            .trim()
            .to_string();
    }
    let setup = load(&a, &mem, size)?;
    configure_vcpu(&kvm, &vcpu, &mem, setup)?;

    eprintln!(
        "lguest-host: {} MiB, kernel {}, lguest ABI {ABI_VERSION} announced (hardware_subarch {X86_SUBARCH_LGUEST}), TSC {tsc_khz} kHz, hypercalls intercepted",
        a.mem_mib, a.kernel
    );
    let clock = host::Clockevent::spawn();
    let mut lg = host::Host::new(host::GuestRam { base, size }, tsc_khz, clock.clone());
    let kicker = kick_periodically();
    let outcome = run_vcpu(&vm, vcpu, &mut lg);
    kicker.store(true, Ordering::Relaxed);
    clock.shutdown();
    eprintln!("lguest-host: {}", lg.summary());
    match outcome {
        Ok(why) => {
            eprintln!("lguest-host: guest ended: {why}");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Interrupt this thread's `KVM_RUN` twice a second (SIGUSR1, handled by doing nothing), so the
/// run loop can see a guest that halted for good: with the in-kernel interrupt controller a
/// `hlt` never exits to user space, and Linux without ACPI "powers off" by halting with
/// interrupts off. Returns the flag that stops the kicking.
fn kick_periodically() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    // SAFETY: installs a handler that does nothing (async-signal-safe), without SA_RESTART so
    // that KVM_RUN returns EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
    // SAFETY: no precondition.
    let me = unsafe { libc::pthread_self() };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(500));
            // SAFETY: `me` is the run loop's thread, alive until `stop` is set (then the
            // signal is ignored by the handler anyway).
            unsafe { libc::pthread_kill(me, libc::SIGUSR1) };
        }
    });
    stop
}

/// Every `vmcall`/`vmmcall` exits to us (`KVM_EXIT_XEN`, type `KVM_EXIT_XEN_HCALL`).
fn intercept_hypercalls(kvm: &Kvm, vm: &VmFd) -> Result<(), Error> {
    let caps = kvm.check_extension_raw(KVM_CAP_XEN_HVM);
    if caps < 0 || caps as u32 & KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL == 0 {
        return Err("this KVM cannot hand hypercalls to user space (KVM_CAP_XEN_HVM lacks INTERCEPT_HCALL: a kernel without CONFIG_KVM_XEN?)".into());
    }
    // KVM turns its Xen support on only with a hypercall-page MSR named (any in the range it
    // reserves for this); the guest never writes it. Without one, the flag is silently ignored
    // and KVM's own hypercalls answer (LHCALL_LGUEST_INIT = 1 would be KVM_HC_VAPIC_POLL_IRQ,
    // answered 0: the backend's "host did not fill lguest_data" check caught exactly that).
    let cfg = kvm_xen_hvm_config {
        flags: KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL,
        msr: XEN_HYPERCALL_MSR,
        ..Default::default()
    };
    // SAFETY: the ioctl reads one `kvm_xen_hvm_config` from the pointer, which lives across it.
    let rc = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_XEN_HVM_CONFIG as _, &cfg) };
    if rc != 0 {
        return Err(format!("KVM_XEN_HVM_CONFIG: {}", std::io::Error::last_os_error()).into());
    }
    Ok(())
}

/// Where the kernel was loaded.
#[derive(Clone, Copy)]
struct Setup {
    entry: u64,
}

/// Load the kernel, initramfs and command line; write the boot parameters.
fn load(a: &Args, mem: &GuestMemoryMmap, size: u64) -> Result<Setup, Error> {
    let mut f = std::fs::File::open(&a.kernel).map_err(|e| format!("{}: {e}", a.kernel))?;
    let k = BzImage::load(
        mem,
        Some(GuestAddress(KERNEL)),
        &mut f,
        Some(GuestAddress(KERNEL)),
    )?;
    let hdr = k.setup_header.ok_or("not a bzImage")?;
    let mut bp = boot_params {
        hdr,
        ..Default::default()
    };
    bp.hdr.type_of_loader = 0xff;
    bp.hdr.boot_flag = 0xaa55;
    bp.hdr.header = 0x5372_6448; // "HdrS"
    let cmdline = a.cmdline.as_bytes();
    mem.write_slice(cmdline, GuestAddress(CMDLINE))?;
    mem.write_obj(0u8, GuestAddress(CMDLINE + cmdline.len() as u64))?;
    bp.hdr.cmd_line_ptr = CMDLINE as u32;
    bp.hdr.cmdline_size = cmdline.len() as u32 + 1;
    if let Some(path) = &a.initrd {
        let data = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        let top = size.min(u64::from(bp.hdr.initrd_addr_max) + 1);
        let at = top.checked_sub(data.len() as u64).ok_or("initrd too big")? & !0xfff;
        if at < k.kernel_end {
            return Err("initrd does not fit above the kernel".into());
        }
        mem.write_slice(&data, GuestAddress(at))?;
        bp.hdr.ramdisk_image = at as u32;
        bp.hdr.ramdisk_size = data.len() as u32;
    }
    // lguest is announced by the boot data: the subarch Linux reserves for it, and the port's
    // signature with its ABI version.
    bp.hdr.hardware_subarch = X86_SUBARCH_LGUEST;
    bp.hdr.hardware_subarch_data = boot_signature(ABI_VERSION);
    bp.e820_table[0] = boot_e820_entry {
        addr: 0,
        size: LOW_RAM_END,
        type_: E820_RAM,
    };
    bp.e820_table[1] = boot_e820_entry {
        addr: KERNEL,
        size: size - KERNEL,
        type_: E820_RAM,
    };
    bp.e820_entries = 2;
    mem.write_obj(bp, GuestAddress(BOOT_PARAMS))?;
    // the 64-bit entry point is 0x200 past the protected-mode kernel's start
    Ok(Setup {
        entry: k.kernel_load.raw_value() + 0x200,
    })
}

/// CPUID, long mode with identity-mapped page tables, registers, FPU, local APIC lines.
fn configure_vcpu(kvm: &Kvm, vcpu: &VcpuFd, mem: &GuestMemoryMmap, s: Setup) -> Result<(), Error> {
    // CPUID: what KVM supports, without KVM's own leaves: lguest is announced by boot data,
    // and the guest should not find (and use) a KVM interface.
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    let mut entries: Vec<_> = supported
        .as_slice()
        .iter()
        .filter(|e| !(0x4000_0000..=0x4fff_ffff).contains(&e.function))
        .copied()
        .collect();
    for e in &mut entries {
        match e.function {
            1 => e.ebx &= 0x00ff_ffff, // APIC ID 0
            0xb | 0x1f => e.edx = 0,   // x2APIC ID 0
            _ => {}
        }
    }
    vcpu.set_cpuid2(&kvm_bindings::CpuId::from_entries(&entries)?)?;

    // GDT: null, code (64-bit), data, TSS
    let gdt: [u64; 4] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x008f_8b00_0000_ffff,
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT))?;
    // page tables: 1 GiB identity-mapped with 2 MiB pages
    mem.write_obj(PDPT | 3, GuestAddress(PML4))?;
    mem.write_obj(PD | 3, GuestAddress(PDPT))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD + 8 * i))?;
    }

    let mut sregs = vcpu.get_sregs()?;
    let seg = |selector: u16, type_: u8, l: u8, db: u8, s: u8| kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = seg(0x08, 0xb, 1, 0, 1);
    let data = seg(0x10, 0x3, 0, 1, 1);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = seg(0x18, 0xb, 0, 0, 0);
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT;
    sregs.idt.limit = 7;
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8000_0011; // PG, ET, PE
    sregs.efer = 0x500; // LMA, LME
    vcpu.set_sregs(&sregs)?;

    let mut regs = vcpu.get_regs()?;
    regs.rflags = 2;
    regs.rip = s.entry;
    regs.rsi = BOOT_PARAMS;
    vcpu.set_regs(&regs)?;

    let fpu = kvm_bindings::kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)?;

    // local APIC: LINT0 ExtINT (the PIC), LINT1 NMI, as firmware leaves them
    let mut lapic = vcpu.get_lapic()?;
    for (off, mode) in [(0x350usize, 7u32), (0x360, 4)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as i8;
        }
    }
    vcpu.set_lapic(&lapic)?;
    Ok(())
}

/// Run the vCPU until the guest resets or powers off; says how it ended.
fn run_vcpu(vm: &VmFd, mut vcpu: VcpuFd, lg: &mut host::Host) -> Result<String, Error> {
    let mut com1 = serial::Serial::default();
    let mut cmos = rtc::Rtc::default();
    let mut out = std::io::stdout().lock();
    loop {
        let mut hcall = None;
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let v = data[0];
                match port {
                    serial::COM1..=0x3ff => {
                        let e = com1.write(port - serial::COM1, v);
                        if let Some(c) = e.out {
                            out.write_all(&[c])?;
                            if c == b'\n' {
                                out.flush()?;
                            }
                        }
                        if e.irq {
                            vm.set_irq_line(serial::COM1_IRQ, true)?;
                            vm.set_irq_line(serial::COM1_IRQ, false)?;
                        }
                    }
                    rtc::INDEX | rtc::DATA => cmos.write(port, v),
                    0x64 if v == 0xfe => return Ok("reset (keyboard controller)".into()),
                    0xcf9 if v & 0x04 != 0 => return Ok("reset (port 0xcf9)".into()),
                    _ => {}
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                let v = match port {
                    serial::COM1..=0x3ff => com1.read(port - serial::COM1),
                    rtc::INDEX | rtc::DATA => {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_secs();
                        cmos.read(port, now)
                    }
                    0x64 => 0, // keyboard controller: never busy
                    _ => 0xff,
                };
                data.fill(v);
            }
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(VcpuExit::MmioWrite(..)) | Ok(VcpuExit::Hlt) => {}
            Ok(VcpuExit::Shutdown) => return Ok("triple fault (shutdown)".into()),
            Ok(VcpuExit::SystemEvent(t, _)) => return Ok(format!("system event {t}")),
            Ok(VcpuExit::Unsupported(KVM_EXIT_XEN)) => {
                // SAFETY: the exit reason says the `xen` member of the union is the live one.
                let x = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.xen };
                // SAFETY: type KVM_EXIT_XEN_HCALL (the only one KVM reports) uses `hcall`.
                let h = unsafe { x.u.hcall };
                hcall = Some((h.cpl, h.input));
            }
            Ok(e) => return Err(format!("unexpected exit {e:?}").into()),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // kicked: a vCPU halted with interrupts off has stopped for good
                let halted = vcpu.get_mp_state()?.mp_state == KVM_MP_STATE_HALTED;
                if halted && vcpu.get_regs()?.rflags & 0x200 == 0 {
                    out.flush()?;
                    return Ok("halted with interrupts off (power off)".into());
                }
            }
            Err(e) => return Err(format!("KVM_RUN: {e}").into()),
        }
        if let Some((cpl, nr)) = hcall {
            // the 4.x registers, widened: RAX = nr, RBX, RCX, RDX, RSI
            let r = vcpu.get_regs()?;
            let rc = lg.hypercall(&KvmVcpu(&vcpu), cpl, nr, [r.rbx, r.rcx, r.rdx, r.rsi]);
            // KVM puts `result` in RAX when the vCPU resumes.
            vcpu.get_kvm_run().__bindgen_anon_1.xen.u.hcall.result = rc as u64;
            if let Some(msg) = lg.shutdown.take() {
                out.flush()?;
                return Ok(format!("LHCALL_SHUTDOWN: {msg}"));
            }
        }
    }
}
