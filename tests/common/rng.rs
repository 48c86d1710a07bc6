//! Seeded randomness for tests that must replay a failure.

/// A small seeded generator (xorshift), so a run can be replayed.
pub struct Rng(pub u64);

impl Rng {
    /// A generator from any seed (zero included), its bits spread out.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// The seed of a run: `TIDEMARK_SEED` if set (to replay one), else the
/// test's own `default`.
pub fn seed(default: u64) -> u64 {
    std::env::var("TIDEMARK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
