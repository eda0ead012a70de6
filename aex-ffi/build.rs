//! Generates the C header with the pinned cbindgen into `OUT_DIR/aex.h`, with version macros
//! from this build. `include/aex.h` is the committed copy; a test fails when they differ.

use std::env;
use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("aex.h");
    let mut config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("aex-ffi/cbindgen.toml is valid");
    let v = |k: &str| env::var(k).expect("cargo sets the package version");
    config.after_includes = Some(format!(
        "\n#define AEX_VERSION_MAJOR {}\n#define AEX_VERSION_MINOR {}\n#define AEX_VERSION_PATCH {}\n#define AEX_VERSION_STRING \"{}\"\n\n#ifdef __cplusplus\nextern \"C\" {{\n#endif\n",
        v("CARGO_PKG_VERSION_MAJOR"),
        v("CARGO_PKG_VERSION_MINOR"),
        v("CARGO_PKG_VERSION_PATCH"),
        v("CARGO_PKG_VERSION"),
    ));
    cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen can read aex-ffi")
        .write_to_file(&out);
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
}
