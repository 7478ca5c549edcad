//! Lower-case hex, for ids, fingerprints and secrets in files and tokens.

/// `bytes` as lower-case hex.
pub fn encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Exactly `N` bytes from `2 * N` hex digits.
pub fn decode<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_bad_lengths_and_digits() {
        assert_eq!(encode(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(decode::<3>("00ab10"), Some([0, 0xab, 0x10]));
        assert_eq!(decode::<3>("00AB10"), Some([0, 0xab, 0x10]));
        assert_eq!(decode::<3>("00ab1"), None);
        assert_eq!(decode::<2>("zzzz"), None);
        assert_eq!(decode::<1>("é"), None);
    }
}
