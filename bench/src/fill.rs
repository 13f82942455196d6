//! Deterministic data: a byte pattern for buffers and a small, fast random number generator for
//! offsets. Neither is cryptographic; both only need to be cheap and reproducible from a seed.

/// A deterministic, non-repeating-per-sector byte pattern.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    fill_pattern(seed, &mut b);
    b
}

/// Fills `buf` with [`pattern`]`(seed, buf.len())`, without allocating.
pub fn fill_pattern(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in buf {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 24) as u8;
    }
}

/// xorshift64*: a small generator whose low bits are good enough for picking blocks.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // SplitMix64 of the seed, so nearby seeds (one per queue) give unrelated streams, and
        // never zero (xorshift's fixed point).
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0), without modulo bias worth caring about for `n` < 2^32.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_seed_dependent() {
        assert_eq!(pattern(7, 4096), pattern(7, 4096));
        assert_ne!(pattern(7, 4096), pattern(8, 4096));
        let mut b = vec![0u8; 100];
        fill_pattern(7, &mut b);
        assert_eq!(b, pattern(7, 100));
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = Rng::new(1);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            let v = r.below(10);
            assert!(v < 10);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|&s| s), "every value drawn: {seen:?}");
    }
}
