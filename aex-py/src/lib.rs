//! The native module `aex._aex`. It converts types and errors and holds no rules; the pure-Python
//! package in `python/aex` re-exports it.

use pyo3::prelude::*;

/// The native module.
#[pymodule]
fn _aex(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", aex_core::VERSION)?;
    Ok(())
}
