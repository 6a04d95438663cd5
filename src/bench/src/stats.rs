//! Summary statistics for benchmark samples.

use serde_json::{json, Value};

/// Median, mean, min, max and sample standard deviation, rounded to 0.001.
pub fn summary(samples: &[f64]) -> Value {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    let mean = v.iter().sum::<f64>() / n as f64;
    let stdev = if n > 1 {
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({
        "median": r(median),
        "mean": r(mean),
        "min": r(v[0]),
        "max": r(v[n - 1]),
        "stdev": r(stdev),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_even_and_empty() {
        let s = summary(&[3.0, 1.0, 2.0]);
        assert_eq!(s["median"], 2.0);
        assert_eq!(s["min"], 1.0);
        assert_eq!(s["max"], 3.0);
        assert_eq!(s["stdev"], 1.0);
        assert_eq!(summary(&[1.0, 2.0, 3.0, 4.0])["median"], 2.5);
        assert_eq!(summary(&[]), Value::Null);
        assert_eq!(summary(&[5.0])["stdev"], 0.0);
    }
}
