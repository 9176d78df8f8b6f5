//! Latency statistics for benchmarks.

/// The nearest-rank percentile of `sorted` (ascending): the smallest sample such that at least `p` percent
/// of the samples are less than or equal to it. `p` is clamped to 0..=100 (0 gives the minimum). None for
/// no samples.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || p.is_nan() {
        return None;
    }
    let n = sorted.len();
    let p = p.clamp(0.0, 100.0);
    // rank = ceil(p/100 * n), in 1..=n; computed in integers where possible to avoid 0.29*100 = 28.999...
    let exact = p / 100.0 * n as f64;
    let mut rank = exact.ceil() as usize;
    if (exact - exact.round()).abs() < 1e-9 {
        rank = exact.round() as usize;
    }
    Some(sorted[rank.clamp(1, n) - 1])
}

/// Summary of one set of samples (milliseconds in the benchmark).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// None when there are no samples.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| !v.is_nan()).collect();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        Some(Summary {
            n,
            min: *sorted.first()?,
            p50: percentile(&sorted, 50.0)?,
            p99: percentile(&sorted, 99.0)?,
            max: *sorted.last()?,
            mean: sorted.iter().sum::<f64>() / n as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 29.0), Some(29.0));
        assert_eq!(percentile(&v, 0.5), Some(1.0));
        assert_eq!(percentile(&v, 150.0), Some(100.0));
        assert_eq!(percentile(&v, -3.0), Some(1.0));
    }

    #[test]
    fn small_sets() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 50.0), Some(7.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        let four = [10.0, 20.0, 30.0, 40.0];
        // ranks: ceil(0.5*4)=2, ceil(0.99*4)=4
        assert_eq!(percentile(&four, 50.0), Some(20.0));
        assert_eq!(percentile(&four, 99.0), Some(40.0));
        assert_eq!(percentile(&four, 75.0), Some(30.0));
        assert_eq!(percentile(&four, 76.0), Some(40.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[1.0, 2.0], f64::NAN), None);
    }

    #[test]
    fn summary_sorts_and_averages() {
        let s = Summary::of(&[30.0, 10.0, 20.0, f64::NAN, 40.0]).unwrap();
        assert_eq!(s.n, 4);
        assert_eq!((s.min, s.p50, s.p99, s.max), (10.0, 20.0, 40.0, 40.0));
        assert!((s.mean - 25.0).abs() < 1e-12);
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN]), None);
    }
}
