//! Money and prices as integers.
//!
//! Money is micro-USD in an `i64` (1 USD = 1,000,000). Prices are micro-USD per million tokens,
//! so a price of $0.075 per million tokens is the exact integer 75,000. The cost of `n` tokens at
//! price `p` is `ceil(n * p / 1_000_000)`: rounding is always up, so aex never under-charges.
//! No float ever enters the engine; [`usd_from_f64`] exists for language edges that hand one in.

use crate::error::{Error, Result};

/// Micro-USD in one USD.
pub const MICROS_PER_USD: i64 = 1_000_000;

/// The largest amount aex accepts as a budget or a price: one billion USD, in micro-USD. Far
/// below `i64::MAX`, so sums of many amounts cannot overflow.
pub const MAX_MICRO: i64 = 1_000_000_000 * MICROS_PER_USD;

/// Parses a USD amount written as decimal text (`"5"`, `"0.01"`, `"12.345678"`) into micro-USD,
/// exactly.
///
/// # Errors
/// [`Error::InvalidRequest`] naming `field` when the text is not a plain non-negative decimal, has
/// more than six decimal places (it would not be exact), or exceeds [`MAX_MICRO`].
pub fn parse_usd(field: &str, text: &str) -> Result<i64> {
    let t = text.trim();
    let t = t.strip_prefix('$').unwrap_or(t);
    if t.starts_with('-') {
        return Err(Error::invalid(field, format!("must not be negative, got '{text}'")));
    }
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !digits_ok(whole) || !digits_ok(frac) {
        return Err(Error::invalid(field, format!("must be a decimal USD amount like \"0.01\", got '{text}'")));
    }
    if frac.len() > 6 {
        return Err(Error::invalid(field, format!("has more than 6 decimal places (micro-USD), got '{text}'")));
    }
    let too_large = || Error::invalid(field, format!("must be at most {} USD, got '{text}'", MAX_MICRO / MICROS_PER_USD));
    let whole: i64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| too_large())? };
    let frac_micro: i64 = if frac.is_empty() { 0 } else { format!("{frac:0<6}").parse().map_err(|_| too_large())? };
    let micro = whole.checked_mul(MICROS_PER_USD).and_then(|w| w.checked_add(frac_micro)).ok_or_else(too_large)?;
    check_amount(field, micro)
}

/// Converts a float USD amount (from a language edge or a YAML number) to micro-USD. The float
/// must denote a decimal with at most six places (`0.1`, `12.345678`): its nearest micro-USD is
/// then exact. A float with more places (`0.0000001`) is refused rather than silently rounded.
///
/// # Errors
/// [`Error::InvalidRequest`] naming `field` for NaN, infinities, negatives, more than six
/// decimal places, and amounts over [`MAX_MICRO`].
pub fn usd_from_f64(field: &str, usd: f64) -> Result<i64> {
    if !usd.is_finite() {
        return Err(Error::invalid(field, format!("must be a finite number, got {usd}")));
    }
    let scaled = usd * MICROS_PER_USD as f64;
    let micro = scaled.round();
    // A decimal with at most 6 places lands within float rounding error of an integer after
    // scaling (relative 1e-12 is thousands of ulps); one with more places lands further off.
    if (micro - scaled).abs() > (scaled.abs() * 1e-12).max(1e-9) {
        return Err(Error::invalid(field, format!("has more than 6 decimal places (micro-USD), got {usd}")));
    }
    if micro < 0.0 {
        return Err(Error::invalid(field, format!("must not be negative, got {usd}")));
    }
    if micro > MAX_MICRO as f64 {
        return Err(Error::invalid(field, format!("must be at most {} USD, got {usd}", MAX_MICRO / MICROS_PER_USD)));
    }
    Ok(micro as i64)
}

/// Checks that a micro-USD amount is within `0..=MAX_MICRO`.
///
/// # Errors
/// [`Error::InvalidRequest`] naming `field` otherwise.
pub fn check_amount(field: &str, micro: i64) -> Result<i64> {
    if micro < 0 {
        return Err(Error::invalid(field, format!("must not be negative, got {micro} micro-USD")));
    }
    if micro > MAX_MICRO {
        return Err(Error::invalid(field, format!("must be at most {MAX_MICRO} micro-USD (1e9 USD), got {micro}")));
    }
    Ok(micro)
}

/// Formats micro-USD as a USD decimal with at least two and at most six decimals:
/// `10_000 -> "0.01"`, `1 -> "0.000001"`, `-2_500 -> "-0.0025"`.
pub fn format_usd(micro: i64) -> String {
    let sign = if micro < 0 { "-" } else { "" };
    let abs = micro.unsigned_abs();
    let whole = abs / MICROS_PER_USD as u64;
    let frac = format!("{:06}", abs % MICROS_PER_USD as u64);
    let frac = frac.trim_end_matches('0');
    let frac = if frac.len() < 2 { format!("{frac:0<2}") } else { frac.to_string() };
    format!("{sign}{whole}.{frac}")
}

/// The cost of `tokens` at `price` micro-USD per million tokens: `ceil(tokens * price / 1e6)`.
/// Both inputs are validated non-negative and bounded by the callers; the product is taken in
/// `i128`, so it cannot overflow, and the result saturates at `i64::MAX`.
pub fn cost(tokens: i64, price_micro_per_mtok: i64) -> i64 {
    let product = i128::from(tokens.max(0)) * i128::from(price_micro_per_mtok.max(0));
    let micro = (product + 999_999) / 1_000_000;
    i64::try_from(micro).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(parse_usd("b", "0.01").unwrap(), 10_000);
        assert_eq!(parse_usd("b", "5").unwrap(), 5_000_000);
        assert_eq!(parse_usd("b", "$1.5").unwrap(), 1_500_000);
        assert_eq!(parse_usd("b", ".000001").unwrap(), 1);
        assert_eq!(parse_usd("b", "12.345678").unwrap(), 12_345_678);
        assert_eq!(parse_usd("b", "1000000000").unwrap(), MAX_MICRO);
    }

    #[test]
    fn refuses_inexact_negative_and_absurd_amounts() {
        for bad in ["", ".", "-1", "1.0000001", "abc", "1e3", "1,5", "1000000000.000001", "99999999999999999999"] {
            let e = parse_usd("budget_usd", bad).unwrap_err();
            assert_eq!(e.status(), 400, "{bad}");
            assert!(e.to_string().contains("budget_usd"), "{e}");
        }
    }

    #[test]
    fn floats_must_be_six_place_decimals() {
        assert_eq!(usd_from_f64("b", 0.1).unwrap(), 100_000);
        assert_eq!(usd_from_f64("b", 0.15).unwrap(), 150_000);
        assert_eq!(usd_from_f64("b", 12.345678).unwrap(), 12_345_678);
        assert_eq!(usd_from_f64("b", 999_999_999.999999).unwrap(), 999_999_999_999_999);
        assert!(usd_from_f64("b", 0.0000014).is_err());
        assert!(usd_from_f64("b", 0.1234567).is_err());
        assert!(usd_from_f64("b", 1.23456789).is_err());
        assert!(usd_from_f64("b", f64::NAN).is_err());
        assert!(usd_from_f64("b", -0.5).is_err());
        assert!(usd_from_f64("b", 2e9).is_err());
    }

    #[test]
    fn formats() {
        assert_eq!(format_usd(10_000), "0.01");
        assert_eq!(format_usd(1), "0.000001");
        assert_eq!(format_usd(5_000_000), "5.00");
        assert_eq!(format_usd(-2_500), "-0.0025");
    }

    #[test]
    fn cost_rounds_up_and_is_exact_for_small_prices() {
        assert_eq!(cost(1_000_000, 150_000), 150_000);
        assert_eq!(cost(1, 150_000), 1); // 0.15 micro rounds up to 1
        assert_eq!(cost(7, 75_000), 1); // 0.525 -> 1
        assert_eq!(cost(20, 75_000), 2); // 1.5 -> 2
        assert_eq!(cost(0, 10_000_000), 0);
        assert_eq!(cost(i64::MAX, i64::MAX), i64::MAX);
    }
}
