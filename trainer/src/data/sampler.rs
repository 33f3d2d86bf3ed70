//! Deterministic shuffling sampler over fixed windows, with resumable position.

use std::sync::Arc;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::error::{DataError, Result};

/// A micro-batch of token windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Row-major `[batch_size, seq_len + 1]`; inputs are `[.., ..seq_len]`, targets `[.., 1..]`.
    pub tokens: Vec<i64>,
    /// Rows.
    pub batch_size: usize,
    /// Input tokens per row.
    pub seq_len: usize,
}

impl Batch {
    /// Row `i` (`seq_len + 1` tokens).
    pub fn row(&self, i: usize) -> &[i64] {
        let w = self.seq_len + 1;
        &self.tokens[i * w..(i + 1) * w]
    }

    /// The rows in `range` as a batch of their own (a rank's share of a global batch).
    pub fn rows(&self, range: std::ops::Range<usize>) -> Batch {
        let w = self.seq_len + 1;
        Batch {
            tokens: self.tokens[range.start * w..range.end * w].to_vec(),
            batch_size: range.len(),
            seq_len: self.seq_len,
        }
    }

    /// Inputs, row-major `[batch_size, seq_len]`.
    pub fn inputs(&self) -> Vec<i64> {
        (0..self.batch_size)
            .flat_map(|i| &self.row(i)[..self.seq_len])
            .copied()
            .collect()
    }

    /// Targets (inputs shifted by one), row-major `[batch_size, seq_len]`.
    pub fn targets(&self) -> Vec<i64> {
        (0..self.batch_size)
            .flat_map(|i| &self.row(i)[1..])
            .copied()
            .collect()
    }
}

/// Where a [`Sampler`] stands; saved in checkpoints so a resumed run sees the same batches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    /// Shuffle seed.
    pub seed: u64,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Windows of the current epoch already handed out.
    pub position: usize,
    /// Number of windows in the data the state was taken from.
    pub num_windows: usize,
    /// Tokens per window (`seq_len + 1`) of the data the state was taken from.
    pub window_len: usize,
}

/// Permutation of `0..n` for `epoch`, a pure function of (`seed`, `epoch`, `n`).
///
/// Fisher-Yates over `ChaCha8Rng` seeded with `seed`, stream `epoch`; the bounded draw is
/// written out here so the order does not change with the `rand` version.
pub fn epoch_permutation(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
        perm.swap(i, j);
    }
    perm
}

/// Cuts the training tokens into non-overlapping windows of `seq_len + 1` tokens and hands
/// them out in batches, each epoch in the order [`epoch_permutation`] gives. A batch may span
/// the end of one epoch and the start of the next.
#[derive(Debug, Clone)]
pub struct Sampler {
    tokens: Arc<[u32]>,
    seq_len: usize,
    batch_size: usize,
    seed: u64,
    num_windows: usize,
    epoch: u64,
    position: usize,
    order: Vec<usize>,
}

impl Sampler {
    /// A sampler at epoch 0, position 0. Errors if there is not even one window or the
    /// batch size or sequence length is zero.
    pub fn new(tokens: Arc<[u32]>, seq_len: usize, batch_size: usize, seed: u64) -> Result<Self> {
        if seq_len == 0 || batch_size == 0 {
            return Err(DataError::InvalidConfig {
                problems: vec![(
                    "seq_len / batch_size".into(),
                    "must both be at least 1".into(),
                )],
            });
        }
        let num_windows = tokens.len() / (seq_len + 1);
        if num_windows == 0 {
            return Err(DataError::SplitTooShort {
                split: "train",
                tokens: tokens.len(),
                needed: seq_len + 1,
                hint: "use more data or a smaller seq_len".into(),
            });
        }
        Ok(Sampler {
            tokens,
            seq_len,
            batch_size,
            seed,
            num_windows,
            epoch: 0,
            position: 0,
            order: epoch_permutation(seed, 0, num_windows),
        })
    }

    /// Number of windows per epoch.
    pub fn num_windows(&self) -> usize {
        self.num_windows
    }

    /// Current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Windows handed out since the start (every epoch).
    pub fn windows_taken(&self) -> u64 {
        self.epoch * self.num_windows as u64 + self.position as u64
    }

    /// The next `batch_size` windows.
    pub fn next_batch(&mut self) -> Batch {
        let mut tokens = Vec::with_capacity(self.batch_size * (self.seq_len + 1));
        for _ in 0..self.batch_size {
            self.push_window(&mut tokens);
        }
        Batch {
            tokens,
            batch_size: self.batch_size,
            seq_len: self.seq_len,
        }
    }

    /// Appends the next window (`seq_len + 1` tokens) to `out`.
    pub(crate) fn push_window(&mut self, out: &mut Vec<i64>) {
        let w = self.seq_len + 1;
        let start = self.order[self.position] * w;
        out.extend(self.tokens[start..start + w].iter().map(|&t| i64::from(t)));
        self.position += 1;
        if self.position == self.num_windows {
            self.epoch += 1;
            self.position = 0;
            self.order = epoch_permutation(self.seed, self.epoch, self.num_windows);
        }
    }

    /// The current position, to be saved with a checkpoint.
    pub fn state(&self) -> SamplerState {
        SamplerState {
            seed: self.seed,
            epoch: self.epoch,
            position: self.position,
            num_windows: self.num_windows,
            window_len: self.seq_len + 1,
        }
    }

    /// Continues from `state`. Rejects a state taken on other data or with another seed.
    pub fn restore(&mut self, state: &SamplerState) -> Result<()> {
        let mut problems = Vec::new();
        if state.seed != self.seed {
            problems.push(format!(
                "the saved shuffle seed is {} but the current one is {}; resume with data.shuffle_seed: {}",
                state.seed, self.seed, state.seed
            ));
        }
        if state.window_len != self.seq_len + 1 {
            problems.push(format!(
                "the saved windows have {} tokens (seq_len {}) but the current ones have {} (seq_len {}); \
                 resume with the same data.seq_len",
                state.window_len,
                state.window_len.saturating_sub(1),
                self.seq_len + 1,
                self.seq_len
            ));
        }
        if state.num_windows != self.num_windows {
            problems.push(format!(
                "the saved state has {} windows but the current training data has {}; the data, \
                 tokenizer or valid_fraction changed since the checkpoint was written",
                state.num_windows, self.num_windows
            ));
        }
        if state.position >= state.num_windows {
            problems.push(format!(
                "position {} is not below the window count {}; the state is corrupt",
                state.position, state.num_windows
            ));
        }
        if !problems.is_empty() {
            return Err(DataError::SamplerState(problems.join("; ")));
        }
        self.epoch = state.epoch;
        self.position = state.position;
        self.order = epoch_permutation(self.seed, self.epoch, self.num_windows);
        Ok(())
    }
}

/// Up to `max_batches` batches over the windows of `tokens` in order (no shuffle); the last
/// batch has fewer rows when the window count is not a multiple of `batch_size`.
pub fn valid_batches(
    tokens: &[u32],
    seq_len: usize,
    batch_size: usize,
    max_batches: usize,
) -> Vec<Batch> {
    let w = seq_len + 1;
    if seq_len == 0 || batch_size == 0 {
        return Vec::new();
    }
    let windows = tokens.len() / w;
    (0..windows)
        .step_by(batch_size)
        .take(max_batches)
        .map(|first| {
            let rows = batch_size.min(windows - first);
            Batch {
                tokens: tokens[first * w..(first + rows) * w]
                    .iter()
                    .map(|&t| i64::from(t))
                    .collect(),
                batch_size: rows,
                seq_len,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens 0..n, so window i starts with token i * (seq_len + 1).
    fn counting(n: u32) -> Arc<[u32]> {
        (0..n).collect::<Vec<_>>().into()
    }

    fn window_ids(b: &Batch) -> Vec<usize> {
        (0..b.batch_size)
            .map(|i| b.row(i)[0] as usize / (b.seq_len + 1))
            .collect()
    }

    #[test]
    fn batch_rows_are_windows_and_targets_are_shifted() {
        let mut s = Sampler::new(counting(100), 4, 3, 1).unwrap();
        assert_eq!(s.num_windows(), 20);
        let b = s.next_batch();
        assert_eq!(b.tokens.len(), 3 * 5);
        for i in 0..3 {
            let r = b.row(i);
            assert_eq!(r[0] % 5, 0, "windows are aligned and non-overlapping");
            assert!(r.windows(2).all(|p| p[1] == p[0] + 1));
        }
        let (x, y) = (b.inputs(), b.targets());
        assert_eq!(x.len(), 12);
        assert!(x.iter().zip(&y).all(|(a, b)| b - a == 1));
    }

    #[test]
    fn epochs_cover_every_window_once_in_different_orders() {
        // 7 windows and batches of 3: batches straddle epoch boundaries.
        let mut s = Sampler::new(counting(7 * 9 + 4), 8, 3, 42).unwrap();
        let stream: Vec<usize> = (0..7).flat_map(|_| window_ids(&s.next_batch())).collect();
        let (e0, e1, e2) = (&stream[0..7], &stream[7..14], &stream[14..21]);
        for e in [e0, e1, e2] {
            let mut sorted = e.to_vec();
            sorted.sort();
            assert_eq!(sorted, (0..7).collect::<Vec<_>>());
        }
        assert!(e0 != e1 || e1 != e2, "epochs must not all share one order");
        assert_ne!(e0, (0..7).collect::<Vec<_>>(), "epoch 0 is shuffled");
        assert_eq!(s.epoch(), 3);
    }

    #[test]
    fn same_seed_same_order_other_seed_other_order() {
        let a: Vec<usize> = epoch_permutation(5, 0, 50);
        assert_eq!(a, epoch_permutation(5, 0, 50));
        assert_ne!(a, epoch_permutation(6, 0, 50));
        assert_ne!(a, epoch_permutation(5, 1, 50));
        let mut s1 = Sampler::new(counting(1000), 9, 4, 5).unwrap();
        let mut s2 = Sampler::new(counting(1000), 9, 4, 5).unwrap();
        for _ in 0..60 {
            assert_eq!(s1.next_batch(), s2.next_batch());
        }
    }

    #[test]
    fn restore_continues_exactly_where_it_left_off() {
        // 71 windows, 3 per batch: k = 24 and 47 resume inside epoch 1, at its edges.
        for k in [0, 1, 5, 13, 23, 24, 47] {
            let mut uninterrupted = Sampler::new(counting(500), 6, 3, 9).unwrap();
            for _ in 0..k {
                uninterrupted.next_batch();
            }
            // The state survives serialization, as it will in a checkpoint.
            let json = serde_json::to_string(&uninterrupted.state()).unwrap();
            let state: SamplerState = serde_json::from_str(&json).unwrap();
            assert_eq!(state.epoch, (k as u64 * 3) / 71);
            let mut resumed = Sampler::new(counting(500), 6, 3, 9).unwrap();
            resumed.restore(&state).unwrap();
            for _ in 0..40 {
                assert_eq!(
                    resumed.next_batch(),
                    uninterrupted.next_batch(),
                    "after {k} batches"
                );
            }
        }
    }

    #[test]
    fn restore_rejects_state_of_other_data_or_seed() {
        let mut s = Sampler::new(counting(500), 6, 3, 9).unwrap();
        s.next_batch();
        let state = s.state();
        let mut other_seed = Sampler::new(counting(500), 6, 3, 10).unwrap();
        let e = other_seed.restore(&state).unwrap_err().to_string();
        assert!(
            e.contains("seed is 9") && e.contains("current one is 10"),
            "{e}"
        );
        let mut other_data = Sampler::new(counting(400), 6, 3, 9).unwrap();
        let e = other_data.restore(&state).unwrap_err().to_string();
        assert!(e.contains("71 windows") && e.contains("has 57"), "{e}");
        let mut corrupt = state.clone();
        corrupt.position = corrupt.num_windows;
        assert!(s.restore(&corrupt).is_err());
    }

    #[test]
    fn valid_batches_are_in_order_and_deterministic() {
        let toks = counting(5 * 11 + 3); // 11 windows of 5
        let all = valid_batches(&toks, 4, 4, usize::MAX);
        assert_eq!(
            all.iter().map(|b| b.batch_size).collect::<Vec<_>>(),
            [4, 4, 3]
        );
        let ids: Vec<usize> = all.iter().flat_map(window_ids).collect();
        assert_eq!(ids, (0..11).collect::<Vec<_>>());
        assert_eq!(valid_batches(&toks, 4, 4, 2), all[..2]);
    }
}
