//! Order statistics and the text tables the benchmark prints.

/// Summary of a set of samples (nearest-rank percentiles).
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn stats(samples: &[f64]) -> Option<Stats> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let rank = |p: f64| v[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stats {
        n,
        min: v[0],
        median,
        p90: rank(0.90),
        p99: rank(0.99),
        max: v[n - 1],
    })
}

/// Formats a duration given in seconds with a unit that suits it.
pub fn dur(s: f64) -> String {
    if s >= 10.0 {
        format!("{s:.1} s")
    } else if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} µs", s * 1e6)
    }
}

pub fn mib(kib: f64) -> String {
    format!("{:.2} MiB", kib / 1024.0)
}

/// "2.35x" (b / a), or "-" when either is missing or zero.
pub fn ratio(num: Option<f64>, den: Option<f64>) -> String {
    match (num, den) {
        (Some(n), Some(d)) if d > 0.0 && n.is_finite() => format!("{:.2}x", n / d),
        _ => "-".into(),
    }
}

/// A table with a header row, printed with aligned columns.
pub struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
    /// Columns aligned left (the others are aligned right).
    left: usize,
}

impl Table {
    pub fn new(head: &[&str]) -> Table {
        Table {
            head: head.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
            left: 1,
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// A row with the stats columns `n median p90 min max` (durations).
    pub fn dur_row(&mut self, label: &str, s: Option<Stats>, extra: &[String]) {
        let mut r = vec![label.to_string()];
        match s {
            Some(s) => r.extend([
                s.n.to_string(),
                dur(s.median),
                dur(s.p90),
                dur(s.min),
                dur(s.max),
            ]),
            None => r.extend(["0", "-", "-", "-", "-"].map(String::from)),
        }
        r.extend(extra.iter().cloned());
        self.rows.push(r);
    }

    pub fn print(&self) {
        let cols = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.head.len()])
            .max()
            .unwrap_or(0);
        let mut w = vec![0usize; cols];
        for r in std::iter::once(&self.head).chain(&self.rows) {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |r: &[String]| {
            let mut s = String::new();
            for (i, width) in w.iter().enumerate() {
                let c = r.get(i).map(String::as_str).unwrap_or("");
                let pad = width.saturating_sub(c.chars().count());
                if i > 0 {
                    s.push_str("  ");
                }
                if i < self.left {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad));
                } else {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                }
            }
            println!("  {}", s.trim_end());
        };
        line(&self.head);
        let total: usize = w.iter().sum::<usize>() + 2 * w.len().saturating_sub(1);
        println!("  {}", "-".repeat(total));
        for r in &self.rows {
            line(r);
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = stats(&v).expect("stats");
        assert_eq!((s.min, s.p90, s.p99, s.max), (1.0, 90.0, 99.0, 100.0));
        assert_eq!(s.median, 50.5);
        assert!(stats(&[]).is_none());
    }
}
