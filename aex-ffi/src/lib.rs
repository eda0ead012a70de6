//! The C ABI of aex. This crate converts types and errors and holds no rules; the full surface
//! is built over [`aex_core::Kernel`] (see `include/aex.h`).

use std::ffi::c_char;

/// The library version as a NUL-terminated string with static lifetime. Never free it.
#[unsafe(no_mangle)]
pub extern "C" fn aex_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    #[test]
    fn version_is_the_core_version() {
        // SAFETY: aex_version returns a pointer to a static NUL-terminated string.
        let v = unsafe { CStr::from_ptr(super::aex_version()) };
        assert_eq!(v.to_str().unwrap(), aex_core::VERSION);
    }
}
