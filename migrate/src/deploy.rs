//! Deployment's decision step: which disks a sampled `deploy` attaches candidates to. The
//! daemon carries the attaching out.

/// True when `percent` is a sample size `deploy` takes: in (0, 100].
pub fn valid_percent(percent: f64) -> bool {
    percent > 0.0 && percent <= 100.0
}

/// Chooses ⌈`percent` × `n`⌉ of `n` eligible disks (given in name order), reproducibly for
/// `seed`: a Fisher-Yates shuffle driven by the project's seeded generator
/// (`dovetail_store::rng::SplitMix64`). Returns the chosen positions
/// in ascending order (so, in name order again).
pub fn sample(n: usize, percent: f64, seed: u64) -> Vec<usize> {
    let take = ((n as f64 * percent / 100.0).ceil() as usize).min(n);
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = dovetail_store::rng::SplitMix64::new(seed);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order.truncate(take);
    order.sort_unstable();
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_reproducible_and_of_the_asked_size() {
        assert!(valid_percent(100.0) && valid_percent(0.5));
        assert!(!valid_percent(0.0) && !valid_percent(100.1) && !valid_percent(f64::NAN));
        assert_eq!(sample(10, 25.0, 7).len(), 3, "the size is rounded up");
        assert_eq!(sample(10, 100.0, 7), (0..10).collect::<Vec<_>>());
        assert_eq!(sample(0, 50.0, 1), Vec::<usize>::new());
        assert_eq!(sample(10, 30.0, 42), sample(10, 30.0, 42));
        let s = sample(50, 20.0, 3);
        assert!(s.windows(2).all(|w| w[0] < w[1]) && s.iter().all(|&i| i < 50));
        // The choices for these seeds are pinned: a change would pick other disks for the same
        // `deploy` request.
        assert_eq!(sample(5, 40.0, 0), vec![2, 3]);
        assert_eq!(sample(10, 30.0, 42), vec![0, 5, 9]);
        assert_eq!(sample(8, 50.0, 7), vec![1, 2, 4, 5]);
    }
}
