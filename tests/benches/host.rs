//! Host benchmark (criterion): what runs in ring 3 on this machine, itself a KVM guest, through
//! the pvops wrappers (this binary's own call sites, patched for the native backend, then
//! unpatched) and as raw instructions, in one run.
//!
//! `scripts/bench` converts criterion's estimates into `target/pvops-bench/host.json`, with two
//! facts this binary writes to `$PVOPS_BENCH_HOST_INFO`: the TSC rate measured against
//! CLOCK_MONOTONIC, and what the patch engine made of each op's sites (inline or direct).

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use pvops::ops::{cpu, irq, timer};
use pvops::{Backend, Patcher, SiteTable, PV_OPS};
use pvops_backends::native::NATIVE;
use pvops_host_tests::MprotectText;

fn raw_save_fl() -> u64 {
    let f: u64;
    // SAFETY: reads RFLAGS.
    unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) f) };
    f
}

/// Whether this machine answers KVM hypercalls (it does when the CPUID scan finds KVM).
fn kvm() -> Option<pvops::detect::CpuVendor> {
    let d = pvops::detect(&pvops::arch::NativeCpuid);
    d.find(pvops::HypervisorKind::Kvm).map(|_| d.vendor)
}

/// A bare KVM hypercall (`KVM_HC_VAPIC_POLL_IRQ`) from ring 3: a full exit, answered -KVM_EPERM.
fn raw_hypercall(vmmcall: bool) -> i64 {
    let r: i64;
    // SAFETY: only called where KVM answers; from CPL 3 it refuses without side effects. RBX
    // (reserved by LLVM) is saved in another register around the instruction.
    unsafe {
        if vmmcall {
            core::arch::asm!("mov {t}, rbx", "xor ebx, ebx", "vmmcall", "mov rbx, {t}", t = out(reg) _,
                             inlateout("rax") 1i64 => r, in("rcx") 0, in("rdx") 0, in("rsi") 0)
        } else {
            core::arch::asm!("mov {t}, rbx", "xor ebx, ebx", "vmcall", "mov rbx, {t}", t = out(reg) _,
                             inlateout("rax") 1i64 => r, in("rcx") 0, in("rdx") 0, in("rsi") 0)
        }
    };
    r
}

/// The TSC rate in kHz, measured: TSC ticks across 100 ms of CLOCK_MONOTONIC (`Instant`), the
/// median of five; and how it was measured.
fn measured_tsc_khz() -> (u64, String) {
    let mut v: Vec<u64> = (0..5)
        .map(|_| {
            let t0 = std::time::Instant::now();
            let c0 = pvops::arch::rdtsc_ordered();
            while t0.elapsed() < std::time::Duration::from_millis(100) {}
            let c1 = pvops::arch::rdtsc_ordered();
            let ns = t0.elapsed().as_nanos();
            (u128::from(c1.wrapping_sub(c0)) * 1_000_000 / ns) as u64
        })
        .collect();
    v.sort_unstable();
    let how = format!(
        "median of 5 x 100 ms, lowest {} kHz, highest {} kHz",
        v[0], v[4]
    );
    (v[2], how)
}

/// Write the measured TSC rate and each op's patch action (from the engine's plan) where
/// scripts/bench asked for them.
fn write_info(p: &Patcher<'_>) {
    let Ok(path) = std::env::var("PVOPS_BENCH_HOST_INFO") else {
        return;
    };
    let (khz, how) = measured_tsc_khz();
    let mut actions = std::collections::BTreeMap::<&str, &str>::new();
    for site in p.sites() {
        let a = match p.patched(&site).0 {
            pvops::patch::Action::Inline => "inline",
            pvops::patch::Action::DirectCall => "direct",
            pvops::patch::Action::Indirect => "indirect",
        };
        let e = actions.entry(site.op.name()).or_insert(a);
        if *e != a {
            *e = "mixed";
        }
    }
    let actions: Vec<String> = actions
        .iter()
        .map(|(op, a)| format!("\"{op}\":\"{a}\""))
        .collect();
    let doc = format!(
        "{{\"tsc_khz\":{khz},\"calibration\":\"{how}\",\"actions\":{{{}}}}}\n",
        actions.join(",")
    );
    std::fs::write(&path, doc).expect("write PVOPS_BENCH_HOST_INFO");
}

fn paths(c: &mut Criterion, state: &str) {
    let mut g = c.benchmark_group(state);
    if kvm().is_some() {
        g.bench_function("cpu.hypercall", |b| {
            b.iter(|| {
                // SAFETY: KVM answers (see `kvm`); refused from ring 3 without side effects.
                black_box(unsafe { cpu::hypercall(1, 0, 0, 0, 0) })
            })
        });
    }
    g.bench_function("cpu.cpuid", |b| {
        b.iter(|| black_box(cpu::cpuid(black_box(0), 0)))
    });
    g.bench_function("irq.save_fl", |b| b.iter(|| black_box(irq::save_fl())));
    g.bench_function("timer.sched_clock", |b| {
        b.iter(|| black_box(timer::sched_clock()))
    });
    g.finish();
}

fn host(c: &mut Criterion) {
    pvops_backends::native::set_tsc_rate(1_000_000); // scale only; the benchmark measures cost
    let mut ops = NATIVE.ops();
    if let Some(vendor) = kvm() {
        // the KVM backend's hypercall, the rest native (ring 3 has no pvclock to read)
        ops.cpu.hypercall = pvops::Impl::call(pvops_backends::kvm::hypercall_for(vendor));
    }
    // SAFETY: nothing runs ops yet; criterion runs benchmarks on this thread.
    unsafe { PV_OPS.install(&ops.table()) };

    let mut g = c.benchmark_group("raw");
    g.bench_function("cpu.cpuid", |b| {
        b.iter(|| black_box(pvops::arch::raw_cpuid(black_box(0), 0)))
    });
    g.bench_function("irq.save_fl", |b| b.iter(|| black_box(raw_save_fl())));
    g.bench_function("timer.sched_clock", |b| {
        b.iter(|| black_box(pvops::arch::rdtsc_ordered()))
    });
    if let Some(vendor) = kvm() {
        let amd = vendor.uses_vmmcall();
        g.bench_function("cpu.hypercall", |b| {
            b.iter(|| black_box(raw_hypercall(amd)))
        });
    }
    g.finish();

    paths(c, "indirect");
    let p = Patcher::new(SiteTable::of_executable(), PV_OPS.addr(), &ops).unwrap();
    let mut text = MprotectText::default();
    p.apply(&mut text).expect("patch");
    write_info(&p);
    paths(c, "patched");
    p.revert(&mut text).expect("revert");
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    targets = host
}
criterion_main!(benches);
