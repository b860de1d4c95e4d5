//! Records the compiler's version for the report card (`tinygpt::report::Environment`): the
//! `rustc` that builds the crate is the one cargo names in `RUSTC`, which a `rustc` found on
//! the `PATH` at run time need not be (or be there at all).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TINYGPT_RUSTC_VERSION={version}");
}
