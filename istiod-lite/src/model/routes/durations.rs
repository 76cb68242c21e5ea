//! Duration strings: Gateway API's (GEP-2257) and Istio's.

use super::errors::DurationError;

/// The unit at the start of `rest` (h, m, s or ms): milliseconds per unit
/// and the unit's length.
fn duration_unit(rest: &str) -> Option<(u64, usize)> {
    if rest.starts_with("ms") {
        Some((1, 2))
    } else {
        match rest.as_bytes().first()? {
            b'h' => Some((3_600_000, 1)),
            b'm' => Some((60_000, 1)),
            b's' => Some((1_000, 1)),
            _ => None,
        }
    }
}

/// A Gateway API `Duration` (GEP-2257): 1 to 4 groups of up to 5 digits
/// followed by h, m, s or ms, e.g. "1m30s", "500ms". Returns milliseconds.
pub fn parse_duration(s: &str) -> Result<u64, DurationError> {
    let bad = || DurationError::GatewayApi(s.to_string());
    let (mut rest, mut total, mut groups) = (s, 0u64, 0);
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = duration_unit(rest).ok_or_else(bad)?;
        rest = &rest[len..];
        total += n * unit;
        groups += 1;
    }
    if groups == 0 || groups > 4 {
        return Err(bad());
    }
    Ok(total)
}

/// An Istio duration as DestinationRules carry them: Go's format limited to
/// h, m, s and ms units with optional fractions ("30s", "1m30s", "0.5s").
pub fn parse_istio_duration(s: &str) -> Result<u64, DurationError> {
    let bad = || DurationError::Istio(s.to_string());
    let (mut rest, mut total) = (s, 0f64);
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let n = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        let v: f64 = rest[..n].parse().map_err(|_| bad())?;
        rest = &rest[n..];
        let (unit, len) = duration_unit(rest).ok_or_else(bad)?;
        rest = &rest[len..];
        total += v * unit as f64;
    }
    if total > u32::MAX as f64 {
        return Err(DurationError::TooLong(s.to_string()));
    }
    Ok(total.round() as u64)
}
