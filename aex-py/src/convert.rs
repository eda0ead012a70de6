//! Python values in, Python values and exceptions out.

use aex_core::{Error, money};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyAny, PyBool, PyDict, PyFloat, PyInt, PyList, PyString};

static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// The exception class of `aex.errors` for a status (exhaustive over the error table).
fn class_name(e: &Error) -> &'static str {
    match e {
        Error::InvalidRequest { .. } => "InvalidRequest",
        Error::Unauthenticated { .. } => "Unauthenticated",
        Error::InsufficientBudget { .. } => "InsufficientBudget",
        Error::PolicyDenied { .. } => "PolicyDenied",
        Error::NotFound { .. } => "NotFound",
        Error::Conflict { .. } => "Conflict",
        Error::RateLimited { .. } => "RateLimited",
        Error::Internal(_) => "Internal",
        Error::Unavailable(_) | Error::Tampered { .. } => "Unavailable",
    }
}

/// Converts an aex error into the matching `aex.errors` exception, with its data as attributes.
pub fn err(py: Python<'_>, e: &Error) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let module = ERRORS.get_or_try_init(py, || py.import("aex.errors").map(Bound::unbind))?.bind(py);
        let class = module.getattr(class_name(e))?;
        let kwargs = PyDict::new(py);
        let data = aex_core::wire::error_json(e);
        for (k, v) in data.as_object().into_iter().flatten() {
            if k != "message" {
                kwargs.set_item(k, v.to_py(py)?)?;
            }
        }
        Ok(PyErr::from_value(class.call((e.to_string(),), Some(&kwargs))?))
    };
    build().unwrap_or_else(|failure| PyRuntimeError::new_err(format!("{e} (and aex.errors failed: {failure})")))
}

/// `InvalidRequest` naming `field`.
pub fn invalid(py: Python<'_>, field: &str, rule: impl Into<String>) -> PyErr {
    err(py, &Error::invalid(field, rule))
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// An integer argument: a Python `int` (not a bool) that fits `T`.
pub fn int<T: TryFrom<i64>>(py: Python<'_>, field: &str, obj: &Bound<'_, PyAny>) -> PyResult<T> {
    if obj.is_instance_of::<PyBool>() || !obj.is_instance_of::<PyInt>() {
        return Err(invalid(py, field, format!("must be an int, got {}", type_name(obj))));
    }
    let v: i64 = obj.extract().map_err(|_| invalid(py, field, "is too large"))?;
    T::try_from(v).map_err(|_| invalid(py, field, format!("is out of range: {v}")))
}

/// An optional integer argument (`None` is absent).
pub fn opt_int<T: TryFrom<i64>>(py: Python<'_>, field: &str, obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<T>> {
    match obj {
        None => Ok(None),
        Some(o) if o.is_none() => Ok(None),
        Some(o) => int(py, field, o).map(Some),
    }
}

/// A USD amount that may be negative (a budget change): text, int, float or Decimal.
pub fn signed_amount_micro(py: Python<'_>, field: &str, obj: &Bound<'_, PyAny>) -> PyResult<i64> {
    let negative = obj.lt(0).unwrap_or(false) && !obj.is_instance_of::<PyString>()
        || obj.is_instance_of::<PyString>() && obj.extract::<String>().is_ok_and(|s| s.trim_start().starts_with('-'));
    if !negative {
        return amount_micro(py, field, obj);
    }
    let positive = if obj.is_instance_of::<PyString>() {
        PyString::new(py, obj.extract::<String>()?.trim_start().trim_start_matches('-')).into_any()
    } else {
        obj.neg()?
    };
    amount_micro(py, field, &positive).map(|m| -m)
}

/// A non-negative USD amount: exact text ("5.00"), an int of dollars, a float with at most six
/// decimal places, or a `decimal.Decimal`.
pub fn amount_micro(py: Python<'_>, field: &str, obj: &Bound<'_, PyAny>) -> PyResult<i64> {
    let core = |r: aex_core::Result<i64>| r.map_err(|e| err(py, &e));
    if obj.is_none() {
        return Err(invalid(py, field, "must not be None"));
    }
    if obj.is_instance_of::<PyBool>() {
        return Err(invalid(py, field, "must be a USD amount, not a bool"));
    }
    if obj.is_instance_of::<PyString>() {
        return core(money::parse_usd(field, &obj.extract::<String>()?));
    }
    if obj.is_instance_of::<PyInt>() {
        let whole: i64 = obj.extract().map_err(|_| invalid(py, field, "is too large"))?;
        if whole < 0 {
            return Err(invalid(py, field, format!("must not be negative, got {whole}")));
        }
        let micro = whole.checked_mul(money::MICROS_PER_USD).ok_or_else(|| invalid(py, field, "is too large"))?;
        return core(money::check_amount(field, micro));
    }
    if obj.is_instance_of::<PyFloat>() {
        return core(money::usd_from_f64(field, obj.extract()?));
    }
    if type_name(obj) == "Decimal" {
        // Plain notation (`1E+1` is 10), without trailing zeros (`0.0000010` is 0.000001).
        let text: String = obj.call_method1("__format__", ("f",))?.extract()?;
        let text = if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.') } else { text.as_str() };
        return core(money::parse_usd(field, text));
    }
    Err(invalid(py, field, format!("must be a USD amount (str, int, float or Decimal), got {}", type_name(obj))))
}

/// JSON values to Python objects.
pub trait ToPy {
    /// The Python object.
    fn to_py(&self, py: Python<'_>) -> PyResult<Py<PyAny>>;
}

impl ToPy for serde_json::Value {
    fn to_py(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        use serde_json::Value;
        Ok(match self {
            Value::Null => py.None(),
            Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any().unbind(),
            Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => i.into_pyobject(py)?.into_any().unbind(),
                (None, Some(u)) => u.into_pyobject(py)?.into_any().unbind(),
                _ => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any().unbind(),
            },
            Value::String(s) => PyString::new(py, s).into_any().unbind(),
            Value::Array(items) => {
                let list = PyList::empty(py);
                for item in items {
                    list.append(item.to_py(py)?)?;
                }
                list.into_any().unbind()
            }
            Value::Object(map) => {
                let dict = PyDict::new(py);
                for (k, v) in map {
                    dict.set_item(k, v.to_py(py)?)?;
                }
                dict.into_any().unbind()
            }
        })
    }
}
