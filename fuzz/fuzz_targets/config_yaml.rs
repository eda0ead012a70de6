//! `models.yaml` parsing: any text gives a config or an error naming what is wrong; a config it
//! accepts is valid, and so is the same text handed to the C ABI.
#![no_main]

use std::ffi::CString;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match aex_core::Config::from_yaml(text) {
        Ok(config) => config.validate().expect("a parsed config is valid"),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let Ok(c_text) = CString::new(text) else { return };
    // SAFETY: live options, a NUL-terminated string, and an error out-pointer we free.
    unsafe {
        let opts = aex::aex_options_new();
        let mut err = std::ptr::null_mut();
        let status = aex::aex_options_set_config_yaml(opts, c_text.as_ptr(), &mut err);
        assert_eq!(status == aex::AEX_OK, err.is_null());
        aex::aex_error_free(err);
        aex::aex_options_free(opts);
    }
});
