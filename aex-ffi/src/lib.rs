//! The C ABI of aex. This crate converts types and errors and holds no rules; the full surface
//! is built over [`aex_core::Kernel`] (see `include/aex.h`).

use std::ffi::c_char;

/// The library version as a NUL-terminated string with static lifetime. Never free it.
#[unsafe(no_mangle)]
pub extern "C" fn aex_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
