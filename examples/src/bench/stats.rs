//! Statistics: nearest-rank percentiles inside one repetition, median [min-max] across
//! repetitions.
//!
//! The machine is shared and noisy, so a single run says little: every figure is measured
//! once per repetition (peers interleaved within the repetition) and reported as the median
//! of the repetitions with their range. `scripts/bench/peer.py` uses the same percentile
//! definition, so Python and Rust figures are comparable.

use std::time::Duration;

use serde::Serialize;

/// Nearest-rank percentile of an ascending slice (`p` in 0..=100). NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Latency samples of one measurement segment.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatSummary {
    /// Operations completed.
    pub n: usize,
    /// Operations per second over the whole segment.
    pub ops_per_s: f64,
    /// Median latency.
    pub p50_us: f64,
    /// 99th percentile latency.
    pub p99_us: f64,
}

/// Summarises per-operation latencies in nanoseconds measured over `elapsed`.
pub fn summarize_ns(lat_ns: &[u64], elapsed: Duration) -> LatSummary {
    let mut us: Vec<f64> = lat_ns.iter().map(|&ns| ns as f64 / 1000.0).collect();
    summarize_us(&mut us, elapsed)
}

/// Summarises per-operation latencies in microseconds measured over `elapsed`.
pub fn summarize_us(lat_us: &mut [f64], elapsed: Duration) -> LatSummary {
    lat_us.sort_by(f64::total_cmp);
    LatSummary {
        n: lat_us.len(),
        ops_per_s: lat_us.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_us: percentile(lat_us, 50.0),
        p99_us: percentile(lat_us, 99.0),
    }
}

/// One figure across repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Median of the repetitions.
    pub median: f64,
    /// Smallest repetition.
    pub min: f64,
    /// Largest repetition.
    pub max: f64,
    /// Every repetition, in the order measured.
    pub samples: Vec<f64>,
}

impl Figure {
    /// The figure of `samples` (NaN-free; NaNs are dropped as failed repetitions).
    pub fn of(samples: &[f64]) -> Option<Figure> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        // The true median (mean of the middle two for an even count).
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Figure {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            samples: samples.to_vec(),
        })
    }

    /// `median [min-max]` with a precision suited to the magnitude.
    pub fn cell(&self) -> String {
        if self.samples.len() == 1 {
            return fmt_num(self.median);
        }
        format!(
            "{} [{}-{}]",
            fmt_num(self.median),
            fmt_num(self.min),
            fmt_num(self.max)
        )
    }
}

/// A number with 3 significant digits (no exponent), e.g. 8210, 121, 12.3, 0.456.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a == 0.0 {
        "0".into()
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn figure_median_and_range() {
        let f = Figure::of(&[3.0, 1.0, 2.0, f64::NAN]).expect("figure");
        assert_eq!((f.median, f.min, f.max), (2.0, 1.0, 3.0));
        let f = Figure::of(&[4.0, 1.0, 2.0, 3.0]).expect("figure");
        assert_eq!(f.median, 2.5);
        assert_eq!(f.cell(), "2.50 [1.00-4.00]");
        assert!(Figure::of(&[f64::NAN]).is_none());
    }
}
