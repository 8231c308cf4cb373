//! How far a pull has come, for `compute image pull`'s progress: layers and bytes, counted as blobs arrive.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The live counters of one pull.
#[derive(Debug, Default)]
pub struct PullProgress {
    layers_total: AtomicUsize,
    layers_done: AtomicUsize,
    bytes_total: AtomicU64,
    bytes_done: AtomicU64,
}

/// A pull's progress at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProgressView {
    /// Layers the image has (0 until its manifest is read).
    pub layers_total: usize,
    /// Layers stored so far (fetched and unpacked, or found already stored).
    pub layers_done: usize,
    /// Bytes of all its layers, compressed, as the manifest says.
    pub bytes_total: u64,
    /// Bytes fetched or found so far.
    pub bytes_done: u64,
}

impl PullProgress {
    /// The manifest is read: the image has `layers` layers of `bytes` in all.
    pub(crate) fn start(&self, layers: usize, bytes: u64) {
        self.layers_total.store(layers, Ordering::Relaxed);
        self.bytes_total.store(bytes, Ordering::Relaxed);
    }

    /// `n` more bytes arrived (or were found stored).
    pub(crate) fn add_bytes(&self, n: u64) {
        self.bytes_done.fetch_add(n, Ordering::Relaxed);
    }

    /// One more layer is stored.
    pub(crate) fn layer_done(&self) {
        self.layers_done.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn view(&self) -> ProgressView {
        ProgressView {
            layers_total: self.layers_total.load(Ordering::Relaxed),
            layers_done: self.layers_done.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
        }
    }
}
