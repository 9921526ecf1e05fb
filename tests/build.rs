//! Builds the project's VMI ROM (`backends/vmi-rom/vmi.S`, through `scripts/vmi-rom`) so the
//! host tests parse, corrupt and execute the real bytes.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let top = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap())
        .parent()
        .unwrap()
        .to_path_buf();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("vmi.bin");
    println!(
        "cargo:rerun-if-changed={}",
        top.join("backends/vmi-rom/vmi.S").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        top.join("scripts/vmi-rom").display()
    );
    let status = Command::new("python3")
        .arg(top.join("scripts/vmi-rom"))
        .arg(&out)
        .status()
        .expect("python3 runs scripts/vmi-rom");
    assert!(status.success(), "scripts/vmi-rom failed");
}
