//! Compiles the one C file of the core: the variadic `fcntl` shim that SQLite's unix VFS calls
//! once aex's open-file-description locks are installed (`src/store/ofd.rs`).

fn main() {
    println!("cargo::rerun-if-changed=src/store/ofd.c");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" || os == "android" {
        cc::Build::new().file("src/store/ofd.c").warnings(true).compile("aex_ofd");
    }
}
