//! Percentiles of one run's samples, and the median/min/max of a figure over runs.

use serde::{Deserialize, Serialize};

/// The `p`-th percentile (0 < p ≤ 100) of `samples` by nearest rank: the smallest sample
/// with at least p% of the samples at or below it. `NaN` when there are none.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    percentile_sorted(&sorted, p)
}

/// [`percentile`] of samples already sorted ascending.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // (The epsilon keeps 99.9% of 1000 at rank 999 despite binary rounding.)
    let rank = (p / 100.0 * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50, p99 and p99.9 of one run's samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub samples: usize,
}

impl Percentiles {
    pub fn of(samples: &[f64]) -> Self {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Percentiles {
            p50: percentile_sorted(&sorted, 50.0),
            p99: percentile_sorted(&sorted, 99.0),
            p999: percentile_sorted(&sorted, 99.9),
            samples: sorted.len(),
        }
    }
}

/// One figure over repeated runs: the median, the extremes, and every run's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: Vec<f64>,
}

impl Summary {
    /// `NaN`s (a run that produced no value) are left out; all `NaN` when none is left.
    pub fn of(values: &[f64]) -> Self {
        let runs: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Summary {
            median,
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
            runs,
        }
    }

    /// The summary of `f` applied to each run's value.
    pub fn map(&self, f: impl Fn(f64) -> f64) -> Self {
        Summary::of(&self.runs.iter().map(|v| f(*v)).collect::<Vec<_>>())
    }
}

/// Per-run pairs combined run by run (e.g. meshed / unmeshed of the same run).
pub fn paired(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> Summary {
    Summary::of(&a.iter().zip(b).map(|(x, y)| f(*x, *y)).collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 500.0);
        assert_eq!(percentile(&v, 99.0), 990.0);
        assert_eq!(percentile(&v, 99.9), 999.0);
        assert_eq!(percentile(&v, 100.0), 1000.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), 2.0);
        assert_eq!(percentile(&[7.0], 99.9), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
        let p = Percentiles::of(&[5.0, 1.0, 4.0, 2.0, 3.0]);
        assert_eq!((p.p50, p.p99, p.p999, p.samples), (3.0, 5.0, 5.0, 5));
    }

    #[test]
    fn summaries() {
        let s = Summary::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Summary::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
        let s = Summary::of(&[f64::NAN, 2.0]);
        assert_eq!((s.median, s.runs.len()), (2.0, 1));
        assert!(Summary::of(&[]).median.is_nan());
        let r = paired(&[10.0, 20.0], &[2.0, 5.0], |a, b| a / b);
        assert_eq!(r.runs, vec![5.0, 4.0]);
        assert_eq!(s.map(|v| v * 2.0).median, 4.0);
    }
}
