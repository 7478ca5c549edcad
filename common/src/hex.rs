//! Lower-case hex, for ids, fingerprints and secrets in files and tokens.

/// `bytes` as lower-case hex.
pub fn encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Exactly `N` bytes from `2 * N` hex digits.
pub fn decode<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    decode_vec(text)?.try_into().ok()
}

/// The bytes of an even number of hex digits (`None` for anything else,
/// never a panic: the text may come from a peer).
pub fn decode_vec(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
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
        assert_eq!(decode_vec("00ab10"), Some(vec![0, 0xab, 0x10]));
        // Not ASCII: refused, whether or not a character boundary falls
        // where a digit pair would be cut.
        assert_eq!(decode_vec("aéa"), None);
        assert_eq!(decode_vec("éé"), None);
    }
}
