//! Percentiles from histograms the database fills, by the buckets of [`loom_projector::buckets`]:
//! log-spaced, each 2^(1/8) wider than the one before, so that an estimate lies within one bucket
//! (9.1 %) of the exact value.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use loom_projector::buckets::{BOUND_US, FIRST_BOUND_US, PER_DOUBLING, bucket_sql};

pub(super) static LATENCY_BUCKET: LazyLock<String> = LazyLock::new(|| bucket_sql("t.latency_us"));
pub(super) static TTFT_BUCKET: LazyLock<String> = LazyLock::new(|| bucket_sql("t.ttft_us"));

/// Counts of values by bucket, with the smallest and largest value seen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    counts: BTreeMap<usize, u64>,
    min: Option<i64>,
    max: Option<i64>,
}

impl Histogram {
    pub(super) fn add(&mut self, bucket: i64, count: i64, min: Option<i64>, max: Option<i64>) {
        let (Ok(bucket), Ok(count)) = (usize::try_from(bucket), u64::try_from(count)) else {
            return;
        };
        *self.counts.entry(bucket).or_default() += count;
        self.min = min.into_iter().chain(self.min).min();
        self.max = max.into_iter().chain(self.max).max();
    }

    /// Takes in the smallest and largest value of some values counted elsewhere.
    pub(super) fn bound(&mut self, min: Option<i64>, max: Option<i64>) {
        self.min = min.into_iter().chain(self.min).min();
        self.max = max.into_iter().chain(self.max).max();
    }

    pub(super) fn merge(&mut self, other: &Histogram) {
        for (&bucket, &count) in &other.counts {
            *self.counts.entry(bucket).or_default() += count;
        }
        self.min = other.min.into_iter().chain(self.min).min();
        self.max = other.max.into_iter().chain(self.max).max();
    }

    pub fn count(&self) -> u64 {
        self.counts.values().sum()
    }

    /// The `q`-quantile (nearest rank: the value at rank ⌈q·n⌉), estimated by interpolating
    /// within its bucket and kept within the smallest and largest value seen.
    pub fn quantile(&self, q: f64) -> Option<i64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut below = 0;
        for (&bucket, &count) in &self.counts {
            if below + count >= rank {
                let lo = bucket.checked_sub(1).map_or(0, |i| BOUND_US[i]);
                let hi = BOUND_US
                    .get(bucket)
                    .copied()
                    .unwrap_or(self.max.unwrap_or(lo));
                let within = (rank - below) as f64 / count as f64;
                let estimate = (lo as f64 + (hi - lo) as f64 * within).round() as i64;
                let estimate = self.min.map_or(estimate, |min| estimate.max(min));
                return Some(self.max.map_or(estimate, |max| estimate.min(max)));
            }
            below += count;
        }
        self.max
    }
}

/// How far a percentile from a [`Histogram`] may be from the exact one: one bucket.
pub fn percentile_error_bound_us(exact_us: i64) -> i64 {
    let ratio = 2f64.powf(1.0 / PER_DOUBLING) - 1.0;
    ((exact_us as f64 * ratio).ceil() as i64).max(FIRST_BOUND_US as i64) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_percentile_is_within_one_bucket_of_the_exact_one() {
        let mut rng = fastrand::Rng::with_seed(7);
        let values: Vec<i64> = (0..5_000).map(|_| rng.i64(20..90_000_000)).collect();
        let mut sorted = values.clone();
        sorted.sort_unstable();
        let mut histogram = Histogram::default();
        for v in &values {
            let bucket = BOUND_US.partition_point(|b| b < v) as i64;
            histogram.add(bucket, 1, Some(*v), Some(*v));
        }
        for q in [0.01, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0] {
            let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
            let exact = sorted[rank - 1];
            let estimate = histogram.quantile(q).unwrap();
            assert!(
                (estimate - exact).abs() <= percentile_error_bound_us(exact),
                "q={q}: {estimate} vs {exact}"
            );
        }
        assert_eq!(histogram.quantile(1.0), sorted.last().copied());
    }
}
