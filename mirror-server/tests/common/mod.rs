//! What the mirror-server test crates share.

// Each test crate uses a different part of it, or none.
#[allow(dead_code)]
pub mod prom;
#[allow(dead_code)]
pub mod seaweed;

/// `len` bytes that do not compress, from `seed` (xorshift).
pub fn noise(mut seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}
