//! A seeded xorshift generator and the environment knobs of the fuzz test.

pub const DEFAULT_SEED: u64 = 0x6879_7065_7273_7461;

/// xorshift64*: small, fast, and the same sequence for the same seed everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn one_in(&mut self, n: u64) -> bool {
        self.next_u64().is_multiple_of(n.max(1))
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }

    /// Mostly short lengths, sometimes long ones.
    pub fn size(&mut self) -> usize {
        match self.below(16) {
            0..=5 => self.below(9),
            6..=10 => self.below(65),
            11..=13 => self.below(513),
            14 => self.below(4097),
            _ => self.below(65_537),
        }
    }
}

pub fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={text:?} is not a number")))
}

pub fn base_seed() -> u64 {
    env_u64("HYPERNETES_FUZZ_SEED").unwrap_or(DEFAULT_SEED)
}

/// Frames of cases 1-3 together.
pub fn total_iters() -> usize {
    env_u64("HYPERNETES_FUZZ_ITERS").map_or(2000, |n| n as usize)
}
