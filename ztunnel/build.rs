//! Link options for the ztunnel binary.
//!
//! Release builds for glibc pack the binary's relative relocations
//! (`-z pack-relative-relocs`, `DT_RELR`: LLD 15 or GNU ld 2.38 to link,
//! glibc 2.36 to run). A PIE Rust binary holds one relative relocation for
//! every pointer in its data (vtables, string slices): 11 000 in the
//! ztunnel, 24 bytes each in `.rela.dyn`, 260 KiB that the dynamic loader
//! reads at every start, so they were resident in every ztunnel. Packed as
//! bitmaps they take 3 KiB (docs/performance.md, issue 27). Debug builds and
//! other targets (the image's musl build) link as before.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let var = |k: &str, v: &str| std::env::var(k).is_ok_and(|x| x == v);
    if var("PROFILE", "release")
        && var("CARGO_CFG_TARGET_OS", "linux")
        && var("CARGO_CFG_TARGET_ENV", "gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
