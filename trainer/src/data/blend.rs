//! Blends: training sequences drawn from several sources by weight (Megatron-LM's
//! `BlendedDataset`), deterministic and resumable.
//!
//! The n-th training sequence of a run (n counts every row of every micro-batch of every
//! step: the global batch, which every rank draws whole and then shards) comes from the
//! source j with the largest deficit `w_j * (n + 1) - taken_j`, ties to the lower index. The
//! choice is a pure function of the normalised weights and n, so the same rows reach the
//! model at every layout, and after any prefix of n sequences each source's count lies
//! within one sequence of `w_j * n`. Inside a source, sequences come from its own
//! [`Sampler`] (its windows in a per-epoch permutation of its own seed), which only ever
//! advances when the source is chosen: source j's position is its count `taken_j`.
//! A single source is a blend of one, whose batches and checkpoint field (`sampler`) are
//! those of a plain sampler.

use serde::{Deserialize, Serialize};

use super::error::{DataError, Result};
use super::sampler::{Batch, Sampler, SamplerState};

/// The source the next sequence comes from: the one furthest below its share after `n`
/// sequences (`taken` sums to n), ties to the lower index. `weights` sum to 1.
pub fn blend_choice(weights: &[f64], taken: &[u64]) -> usize {
    let n: u64 = taken.iter().sum();
    let next = (n + 1) as f64;
    let mut best = 0;
    let mut best_deficit = f64::NEG_INFINITY;
    for (j, (&w, &t)) in weights.iter().zip(taken).enumerate() {
        let deficit = w * next - t as f64;
        if deficit > best_deficit {
            best = j;
            best_deficit = deficit;
        }
    }
    best
}

/// Sequences taken from each source after the first `n` of a blend (replays the choices).
pub fn blend_counts(weights: &[f64], n: u64) -> Vec<u64> {
    let mut taken = vec![0; weights.len()];
    for _ in 0..n {
        let j = blend_choice(weights, &taken);
        taken[j] += 1;
    }
    taken
}

/// `weights` scaled to sum to 1.
pub(crate) fn normalised(weights: &[f64]) -> Vec<f64> {
    let sum: f64 = weights.iter().sum();
    weights.iter().map(|w| w / sum).collect()
}

/// The shuffle seed of source `j` of `k`: the data seed itself for a single source (its
/// order is the plain sampler's), else a SplitMix64 mix of the seed and j, so that sources
/// of equal size are not visited in the same order.
pub(crate) fn source_seed(seed: u64, j: usize, k: usize) -> u64 {
    if k == 1 {
        return seed;
    }
    let mut z = seed ^ (j as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// How much of each source a run of `samples` sequences reads, for the start-up log.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceUse {
    pub name: String,
    /// Normalised weight.
    pub weight: f64,
    /// Training windows (`seq_len + 1` tokens) of the source.
    pub windows: usize,
    /// Training tokens of the source.
    pub tokens: usize,
    /// Passes over the source's windows the whole run makes (`weight * samples / windows`).
    pub epochs: f64,
}

/// One source of a saved [`BlendState`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlendSourceState {
    pub name: String,
    /// Normalised weight when saved.
    pub weight: f64,
    /// Sequences taken from the source so far.
    pub taken: u64,
    /// The source's own sampler.
    pub sampler: SamplerState,
}

/// Where a blend stands: the trainer state's `blend` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlendState {
    pub sources: Vec<BlendSourceState>,
}

/// The training sampler: one [`Sampler`] per source, mixed by [`blend_choice`].
#[derive(Debug, Clone)]
pub struct BlendSampler {
    names: Vec<String>,
    /// Normalised.
    weights: Vec<f64>,
    parts: Vec<Sampler>,
    taken: Vec<u64>,
    batch_size: usize,
    seq_len: usize,
}

impl BlendSampler {
    /// `parts`: (name, weight, sampler) per source; weights are normalised here.
    pub fn new(parts: Vec<(String, f64, Sampler)>, seq_len: usize, batch_size: usize) -> Self {
        let weights = normalised(&parts.iter().map(|p| p.1).collect::<Vec<_>>());
        let taken = vec![0; parts.len()];
        let (names, parts) = parts.into_iter().map(|(n, _, s)| (n, s)).unzip();
        BlendSampler {
            names,
            weights,
            parts,
            taken,
            batch_size,
            seq_len,
        }
    }

    /// Number of sources.
    pub fn num_sources(&self) -> usize {
        self.parts.len()
    }

    /// Sequences handed out since the start of the run.
    pub fn samples(&self) -> u64 {
        self.taken.iter().sum()
    }

    /// Sequences taken from each source since the start of the run.
    pub fn taken(&self) -> &[u64] {
        &self.taken
    }

    /// The next `batch_size` sequences of the blend.
    pub fn next_batch(&mut self) -> Batch {
        let mut tokens = Vec::with_capacity(self.batch_size * (self.seq_len + 1));
        for _ in 0..self.batch_size {
            let j = blend_choice(&self.weights, &self.taken);
            self.parts[j].push_window(&mut tokens);
            self.taken[j] += 1;
        }
        Batch {
            tokens,
            batch_size: self.batch_size,
            seq_len: self.seq_len,
        }
    }

    /// What a run of `samples` sequences reads of each source.
    pub fn plan(&self, samples: u64) -> Vec<SourceUse> {
        (0..self.parts.len())
            .map(|j| {
                let windows = self.parts[j].num_windows();
                SourceUse {
                    name: self.names[j].clone(),
                    weight: self.weights[j],
                    windows,
                    tokens: windows * (self.seq_len + 1),
                    epochs: self.weights[j] * samples as f64 / windows as f64,
                }
            })
            .collect()
    }

    /// Per-source scalars of a blend (none for a single source, whose counts are
    /// `train/tokens_seen`): `data/<name>/tokens_seen` (input tokens, `seq_len` per
    /// sequence, like `train/tokens_seen`) and `data/<name>/epochs` (passes over its
    /// windows so far).
    pub fn scalars(&self) -> Vec<(String, f64)> {
        if self.parts.len() < 2 {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(2 * self.parts.len());
        for (j, name) in self.names.iter().enumerate() {
            let taken = self.taken[j] as f64;
            out.push((
                format!("data/{name}/tokens_seen"),
                taken * self.seq_len as f64,
            ));
            out.push((
                format!("data/{name}/epochs"),
                taken / self.parts[j].num_windows() as f64,
            ));
        }
        out
    }

    /// The position, to be saved with a checkpoint.
    pub fn state(&self) -> BlendState {
        BlendState {
            sources: (0..self.parts.len())
                .map(|j| BlendSourceState {
                    name: self.names[j].clone(),
                    weight: self.weights[j],
                    taken: self.taken[j],
                    sampler: self.parts[j].state(),
                })
                .collect(),
        }
    }

    /// Continues from `state`. Rejects a state of other sources (names, in order) or whose
    /// samplers do not fit the current data (see [`Sampler::restore`]). Changed weights
    /// (allowed on a resume only with `--allow-config-change`) steer the counts towards
    /// the new shares from where they stand.
    pub fn restore(&mut self, state: &BlendState) -> Result<()> {
        let saved: Vec<&str> = state.sources.iter().map(|s| s.name.as_str()).collect();
        if saved != self.names {
            return Err(DataError::SamplerState(format!(
                "the checkpoint's blend has the sources {saved:?} but the config has {:?}; \
                 resume with the same data.source.sources",
                self.names
            )));
        }
        for (j, s) in state.sources.iter().enumerate() {
            self.parts[j]
                .restore(&s.sampler)
                .map_err(|e| DataError::SamplerState(format!("source {}: {e}", s.name)))?;
            if self.parts[j].windows_taken() != s.taken {
                return Err(DataError::SamplerState(format!(
                    "source {}: {} sequences taken but its sampler stands at {}; the state \
                     is corrupt",
                    s.name,
                    s.taken,
                    self.parts[j].windows_taken()
                )));
            }
        }
        self.taken = state.sources.iter().map(|s| s.taken).collect();
        Ok(())
    }
}

/// A single source saves its plain sampler's state in the trainer state's `sampler` field
/// (so checkpoints of runs without a blend keep their format); a blend saves a
/// [`BlendState`] in `blend`.
impl crate::checkpoint::Checkpointed for BlendSampler {
    fn save(&self, snapshot: &mut crate::checkpoint::Snapshot) {
        match self.parts.as_slice() {
            [one] => snapshot.put("sampler", &one.state()),
            _ => snapshot.put("blend", &self.state()),
        }
    }

    fn restore(
        &mut self,
        snapshot: &crate::checkpoint::Snapshot,
    ) -> std::result::Result<(), String> {
        if self.parts.len() == 1 {
            if snapshot.get::<BlendState>("blend")?.is_some() {
                return Err(
                    "the checkpoint was written by a run with a blend of sources \
                            (data.source type blend); resume it with that data.source"
                        .into(),
                );
            }
            let state: SamplerState = snapshot.require("sampler")?;
            self.parts[0].restore(&state).map_err(|e| e.to_string())?;
            self.taken[0] = self.parts[0].windows_taken();
            return Ok(());
        }
        let state: BlendState = snapshot.get("blend")?.ok_or_else(|| {
            "the checkpoint was written by a run with a single data source, not a blend; \
             resume it with that data.source"
                .to_string()
        })?;
        BlendSampler::restore(self, &state).map_err(|e| e.to_string())
    }
}

/// Up to `max_rows` validation windows of `window` tokens over the blend, each with its
/// source's index: the sources' held-out windows, each source's in order, mixed by
/// [`blend_choice`] with the blend's weights. A source with no window left drops out of the
/// mix (the others' weights renormalised) and the others go on, so a small source's split
/// does not cut the others' short.
pub fn blend_valid_rows<'a>(
    sources: &[(&'a [u32], f64)],
    window: usize,
    max_rows: usize,
) -> Vec<(usize, &'a [u32])> {
    if window == 0 || sources.is_empty() {
        return Vec::new();
    }
    let mut weights = normalised(&sources.iter().map(|s| s.1).collect::<Vec<_>>());
    let mut taken = vec![0u64; sources.len()];
    let mut rows = Vec::new();
    while rows.len() < max_rows {
        let j = blend_choice(&weights, &taken);
        let start = taken[j] as usize * window;
        match sources[j].0.get(start..start + window) {
            Some(w) if weights[j] > 0.0 => {
                rows.push((j, w));
                taken[j] += 1;
            }
            _ => {
                weights[j] = 0.0;
                if weights.iter().all(|&w| w == 0.0) {
                    break;
                }
                weights = normalised(&weights);
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::checkpoint::{Checkpointed, Snapshot};

    /// Deterministic pseudo-random weights (no RNG crate in the test's way).
    fn weights(k: usize, salt: u64) -> Vec<f64> {
        normalised(
            &(0..k)
                .map(|j| 1.0 + (source_seed(salt, j, 2) % 1000) as f64)
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn every_prefix_is_within_one_sequence_of_the_weights() {
        let mut cases = vec![vec![0.7, 0.3], vec![0.5, 0.3, 0.2], vec![1.0]];
        cases.push(normalised(&[1.0, 1.0, 1.0]));
        cases.push(normalised(&[1.0, 1000.0]));
        for salt in 0..20 {
            cases.push(weights(2 + salt as usize % 5, salt));
        }
        for w in &cases {
            let mut taken = vec![0u64; w.len()];
            for n in 1..=5_000u64 {
                let j = blend_choice(w, &taken);
                taken[j] += 1;
                for (j, &t) in taken.iter().enumerate() {
                    let err = t as f64 - w[j] * n as f64;
                    assert!(err.abs() < 1.0, "weights {w:?}, n {n}: source {j} has {t}");
                }
            }
            assert_eq!(taken, blend_counts(w, 5_000));
        }
    }

    fn counting(n: u32, offset: u32) -> Arc<[u32]> {
        (offset..offset + n).collect::<Vec<_>>().into()
    }

    /// Three sources of distinct token ranges (so a row tells its source), 0.5/0.3/0.2.
    fn three(seed: u64) -> BlendSampler {
        let (seq_len, batch) = (4, 3);
        let parts = [(0, 100, 0.5), (1_000, 37, 0.3), (2_000, 23, 0.2)]
            .into_iter()
            .enumerate()
            .map(|(j, (offset, windows, weight))| {
                let tokens = counting(windows * (seq_len as u32 + 1), offset);
                let s = Sampler::new(tokens, seq_len, batch, source_seed(seed, j, 3)).unwrap();
                (format!("s{j}"), weight * 10.0, s)
            })
            .collect();
        BlendSampler::new(parts, seq_len, batch)
    }

    fn source_of(row: &[i64]) -> usize {
        row[0] as usize / 1_000
    }

    #[test]
    fn batches_follow_the_choices_and_each_source_its_own_shuffle() {
        let mut s = three(7);
        let mut rows_per_source = vec![Vec::new(); 3];
        let mut taken = vec![0; 3];
        for _ in 0..200 {
            let b = s.next_batch();
            for i in 0..b.batch_size {
                let j = blend_choice(&[0.5, 0.3, 0.2], &taken);
                taken[j] += 1;
                assert_eq!(source_of(b.row(i)), j);
                rows_per_source[j].push(b.row(i)[0]);
            }
        }
        assert_eq!(s.taken(), taken.as_slice());
        assert_eq!(s.samples(), 600);
        // Source 2 (23 windows) ran through 5 epochs, each a permutation of its windows.
        let first_epoch: Vec<i64> = rows_per_source[2][..23].to_vec();
        let mut sorted = first_epoch.clone();
        sorted.sort();
        assert_eq!(sorted, (0..23).map(|i| 2_000 + 5 * i).collect::<Vec<_>>());
        assert_ne!(first_epoch, sorted, "shuffled");
        assert_ne!(first_epoch, rows_per_source[2][23..46].to_vec());
        // The same seed gives the same stream; another seed another one.
        let (mut a, mut b, mut c) = (three(7), three(7), three(8));
        let (xa, xb, xc): (Vec<_>, Vec<_>, Vec<_>) = (0..20)
            .map(|_| (a.next_batch(), b.next_batch(), c.next_batch()))
            .fold((vec![], vec![], vec![]), |mut acc, (x, y, z)| {
                acc.0.push(x);
                acc.1.push(y);
                acc.2.push(z);
                acc
            });
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
        // Scalars: tokens per source are seq_len per sequence.
        let scalars = s.scalars();
        assert_eq!(scalars[0], ("data/s0/tokens_seen".to_string(), 300.0 * 4.0));
        assert_eq!(scalars[5], ("data/s2/epochs".to_string(), 120.0 / 23.0));
    }

    #[test]
    fn resume_from_any_point_continues_the_same_stream() {
        for k in [0, 1, 7, 8, 31, 77] {
            let mut uninterrupted = three(3);
            for _ in 0..k {
                uninterrupted.next_batch();
            }
            let mut snapshot = Snapshot::default();
            uninterrupted.save(&mut snapshot);
            // Through JSON, as in a checkpoint.
            let snapshot = Snapshot {
                state: serde_json::from_str(&serde_json::to_string(&snapshot.state).unwrap())
                    .unwrap(),
                ..Snapshot::default()
            };
            let mut resumed = three(3);
            Checkpointed::restore(&mut resumed, &snapshot).unwrap();
            assert_eq!(resumed.taken(), uninterrupted.taken());
            for _ in 0..50 {
                assert_eq!(
                    resumed.next_batch(),
                    uninterrupted.next_batch(),
                    "after {k}"
                );
            }
        }
    }

    #[test]
    fn restore_rejects_other_sources_and_a_single_source_keeps_its_format() {
        let mut s = three(3);
        s.next_batch();
        let mut state = s.state();
        state.sources[1].name = "other".into();
        let e = three(3).restore(&state).unwrap_err().to_string();
        assert!(
            e.contains("\"other\"") && e.contains("data.source.sources"),
            "{e}"
        );
        let mut state = s.state();
        state.sources[0].taken += 1;
        assert!(
            three(3)
                .restore(&state)
                .unwrap_err()
                .to_string()
                .contains("corrupt")
        );

        // One source: the plain sampler's batches, seed and checkpoint field.
        let plain = || Sampler::new(counting(500, 0), 6, 3, 9).unwrap();
        let mut one = BlendSampler::new(vec![("a".into(), 2.0, plain())], 6, 3);
        let mut reference = plain();
        for _ in 0..30 {
            assert_eq!(one.next_batch(), reference.next_batch());
        }
        assert!(one.scalars().is_empty());
        let mut snapshot = Snapshot::default();
        one.save(&mut snapshot);
        assert_eq!(
            snapshot.require::<SamplerState>("sampler").unwrap(),
            reference.state()
        );
        let mut blend_snapshot = Snapshot::default();
        s.save(&mut blend_snapshot);
        let mut one_again = BlendSampler::new(vec![("a".into(), 1.0, plain())], 6, 3);
        let e = Checkpointed::restore(&mut one_again, &blend_snapshot).unwrap_err();
        assert!(e.contains("blend"), "{e}");
        let e = Checkpointed::restore(&mut three(3), &snapshot).unwrap_err();
        assert!(e.contains("single data source"), "{e}");
        Checkpointed::restore(&mut one_again, &snapshot).unwrap();
        assert_eq!(one_again.samples(), 90);
        assert_eq!(one_again.next_batch(), reference.next_batch());
    }

    #[test]
    fn plan_counts_epochs_per_source() {
        let s = three(0);
        let plan = s.plan(1_000);
        assert_eq!(plan[1].windows, 37);
        assert_eq!(plan[1].tokens, 37 * 5);
        assert!((plan[1].weight - 0.3).abs() < 1e-12);
        assert!((plan[1].epochs - 300.0 / 37.0).abs() < 1e-9);
    }

    #[test]
    fn validation_rows_mix_the_held_out_windows_until_every_source_is_read() {
        let a: Vec<u32> = (0..50).collect(); // 10 windows of 5
        let b: Vec<u32> = (1_000..1_022).collect(); // 4 windows (2 tokens left over)
        let rows = blend_valid_rows(&[(&a, 0.6), (&b, 0.4)], 5, 100);
        let order: Vec<usize> = rows.iter().map(|r| r.0).collect();
        // b is chosen a 5th time at the 12th choice and has no 5th window: a goes on alone.
        assert_eq!(order, [0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0]);
        for (j, w) in &rows {
            assert_eq!(
                source_of(&w.iter().map(|&t| i64::from(t)).collect::<Vec<_>>()),
                *j
            );
        }
        let firsts: Vec<u32> = rows.iter().filter(|r| r.0 == 1).map(|r| r.1[0]).collect();
        assert_eq!(
            firsts,
            [1_000, 1_005, 1_010, 1_015],
            "each source's windows in order"
        );
        assert_eq!(blend_valid_rows(&[(&a, 0.6), (&b, 0.4)], 5, 3), rows[..3]);
        // One source: its windows in order.
        let one = blend_valid_rows(&[(&a, 1.0)], 5, 100);
        assert_eq!(one.len(), 10);
        assert!(
            one.iter()
                .enumerate()
                .all(|(i, r)| r.0 == 0 && r.1[0] == 5 * i as u32)
        );
    }
}
