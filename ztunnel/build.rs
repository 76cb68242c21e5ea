//! Link options for the ztunnel binary.
//!
//! Release builds for glibc pack the binary's relative relocations
//! (`-z pack-relative-relocs`, `DT_RELR`: LLD 15 or GNU ld 2.38 to link,
//! glibc 2.36 to run). A PIE Rust binary holds one relative relocation for
//! every pointer in its data (vtables, string slices): 11 000 in the
//! ztunnel, 24 bytes each in `.rela.dyn`, 260 KiB that the dynamic loader
//! reads at every start, so they were resident in every ztunnel. Packed as
//! bitmaps they take 3 KiB (docs/performance.md, issue 27). Debug builds,
//! other targets (the image's musl build), cross builds and a build on a
//! glibc older than 2.36 link as before.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let var = |k: &str, v: &str| std::env::var(k).is_ok_and(|x| x == v);
    if var("PROFILE", "release")
        && var("CARGO_CFG_TARGET_OS", "linux")
        && var("CARGO_CFG_TARGET_ENV", "gnu")
        && native_glibc_runs_relr()
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// Whether this is a native build on a glibc of 2.36 or later: a binary
/// linked with packed relocations needs `GLIBC_ABI_DT_RELR` to start, so on
/// an older glibc (Ubuntu 22.04's 2.35) or a cross build it links as before.
fn native_glibc_runs_relr() -> bool {
    if std::env::var("HOST").ok() != std::env::var("TARGET").ok() {
        return false;
    }
    let Ok(out) = std::process::Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
    else {
        return false;
    };
    // "glibc 2.36"
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = text
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .split('.')
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    (major, minor) >= (2, 36)
}
