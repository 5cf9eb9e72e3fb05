//! A seeded data loader that prepares batches on a worker thread.
//!
//! Batch `k` of a run is a pure function of `(seed, k)`: epoch `e = k / batches_per_epoch` uses
//! a permutation of the examples seeded by `(seed, e)`, and the batch's own randomness (noise,
//! augmentation) comes from an RNG seeded by `(seed, k)`. So the data position of a checkpoint
//! is just the step, and a resumed run sees exactly the batches the uninterrupted run would.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Examples and how to turn a list of them into a batch. Runs on the loader thread.
pub trait BatchSource: Send + Sync + 'static {
    /// What one batch is (host memory: tensors are made on the training thread's device).
    type Batch: Send + 'static;
    /// Number of training examples.
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Builds the batch of these example indices; `rng` is this batch's own stream.
    fn batch(&self, indices: &[usize], rng: &mut ChaCha8Rng) -> Result<Self::Batch>;
}

/// Mixes a run seed with a stream id and index (splitmix64), for independent seeded streams.
pub fn mix_seed(seed: u64, stream: u64, index: u64) -> u64 {
    let mut z = seed
        ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ index.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const PERMUTATION_STREAM: u64 = 1;
const BATCH_STREAM: u64 = 2;

/// The example indices of batch `k` (drop-last epochs of `n / batch_size` batches).
pub fn batch_indices(n: usize, batch_size: usize, seed: u64, k: u64) -> Vec<usize> {
    let per_epoch = (n / batch_size).max(1) as u64;
    let epoch = k / per_epoch;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(
        seed,
        PERMUTATION_STREAM,
        epoch,
    )));
    let start = ((k % per_epoch) as usize) * batch_size;
    // With fewer examples than a batch, the batch wraps around the epoch's order.
    (0..batch_size).map(|i| order[(start + i) % n]).collect()
}

/// Batches `start, start + 1, ...` prepared ahead on a worker thread.
pub struct Loader<B> {
    rx: Option<Receiver<(u64, Result<B>)>>,
    worker: Option<JoinHandle<()>>,
    next: u64,
}

impl<B: Send + 'static> Loader<B> {
    /// Starts preparing batches from `start` (the resumed step), `prefetch` ahead.
    pub fn new<S: BatchSource<Batch = B>>(
        source: Arc<S>,
        batch_size: usize,
        seed: u64,
        start: u64,
        prefetch: usize,
    ) -> Result<Self> {
        anyhow::ensure!(!source.is_empty(), "the training split has no examples");
        let (tx, rx) = sync_channel(prefetch.max(1));
        let worker = std::thread::Builder::new()
            .name("train-loader".into())
            .spawn(move || {
                let n = source.len();
                for k in start.. {
                    let idx = batch_indices(n, batch_size, seed, k);
                    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, BATCH_STREAM, k));
                    let batch = source.batch(&idx, &mut rng);
                    // The receiver is gone when training stops: end the thread.
                    if tx.send((k, batch)).is_err() {
                        break;
                    }
                }
            })
            .context("starting the loader thread")?;
        Ok(Self {
            rx: Some(rx),
            worker: Some(worker),
            next: start,
        })
    }

    /// The next batch, in order.
    pub fn next_batch(&mut self) -> Result<B> {
        let rx = self.rx.as_ref().context("loader stopped")?;
        let (k, batch) = rx
            .recv()
            .context("the loader thread stopped unexpectedly")?;
        debug_assert_eq!(k, self.next);
        self.next += 1;
        batch.with_context(|| format!("preparing batch {k}"))
    }
}

impl<B> Drop for Loader<B> {
    fn drop(&mut self) {
        // Closing the channel makes the worker's next send fail, so it exits.
        drop(self.rx.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ids(usize);
    impl BatchSource for Ids {
        type Batch = (Vec<usize>, u64);
        fn len(&self) -> usize {
            self.0
        }
        fn batch(&self, indices: &[usize], rng: &mut ChaCha8Rng) -> Result<Self::Batch> {
            Ok((indices.to_vec(), rand::Rng::gen(rng)))
        }
    }

    #[test]
    fn epochs_cover_every_example_once_and_resume_sees_the_same_batches() {
        let src = Arc::new(Ids(10));
        let mut all = Loader::new(src.clone(), 3, 7, 0, 2).unwrap();
        let run: Vec<_> = (0..9).map(|_| all.next_batch().unwrap()).collect();
        // 3 batches of 3 per epoch (one example dropped), distinct within an epoch.
        let mut epoch0: Vec<usize> = run[..3].iter().flat_map(|b| b.0.clone()).collect();
        epoch0.sort();
        epoch0.dedup();
        assert_eq!(epoch0.len(), 9);
        assert_ne!(run[0].0, run[3].0, "epochs are reshuffled");
        let mut resumed = Loader::new(src, 3, 7, 5, 2).unwrap();
        for expected in &run[5..] {
            assert_eq!(&resumed.next_batch().unwrap(), expected);
        }
    }

    #[test]
    fn an_empty_source_is_refused() {
        let err = Loader::new(Arc::new(Ids(0)), 3, 7, 0, 2)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no examples"), "{err}");
    }
}
