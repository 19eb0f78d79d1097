//! Per-mnemonic counters of emulated instructions.

use std::collections::HashMap;

use iced_x86::Mnemonic;

use super::mnemonic_name;

/// Counts emulated instructions per mnemonic, so the vCPU loop can log each
/// kind once and report totals.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    counts: HashMap<Mnemonic, u64>,
    total: u64,
}

impl Stats {
    /// Empty counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one instruction of this mnemonic; returns `true` when it is
    /// the first of its kind (time to log it).
    pub fn record(&mut self, mnemonic: Mnemonic) -> bool {
        self.total = self.total.saturating_add(1);
        let count = self.counts.entry(mnemonic).or_insert(0);
        *count = count.saturating_add(1);
        *count == 1
    }

    /// How many instructions of this mnemonic were counted.
    pub fn count(&self, mnemonic: Mnemonic) -> u64 {
        self.counts.get(&mnemonic).copied().unwrap_or(0)
    }

    /// How many instructions were counted in all.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// `(lower-case mnemonic, count)` pairs, most frequent first, ties by
    /// name.
    pub fn summary(&self) -> Vec<(String, u64)> {
        let mut rows: Vec<(String, u64)> = self
            .counts
            .iter()
            .map(|(m, n)| (mnemonic_name(*m), *n))
            .collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        rows
    }
}
