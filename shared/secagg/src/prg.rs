//! Mask expansion: a 32-byte seed becomes a ChaCha20 keystream (RustCrypto `chacha20`, zero
//! nonce: every seed is used for one stream only), read as little-endian ring elements and
//! added to or subtracted from a vector, wrapping.
//!
//! Speed matters (a 1M-element Z128 vector is 16 MB of keystream per mask): the vector is
//! walked in 64 KiB blocks, every mask's keystream for a block is generated into one reused
//! buffer and folded while the block is in cache, and large vectors are split between threads
//! by element range, each thread seeking every stream to its range's offset. No allocation
//! per element, no per-element branch on the ring.

use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use chacha20::ChaCha20;
use fedstat_proto::secure::Ring;
use zeroize::Zeroizing;

/// Bytes folded per block: the block and its keystream stay in L2.
const BLOCK: usize = 64 << 10;
/// Below this a vector is masked on the calling thread: a thread costs more than it saves.
const PARALLEL_MIN: usize = 1 << 20;
/// At most this many threads (the benchmark machine has 2 cores; more rarely helps memory-bound
/// folding).
const MAX_THREADS: usize = 4;
/// Longest keystream of one seed: ChaCha20 (IETF) has a 32-bit block counter.
pub(crate) const MAX_BYTES: u64 = (1u64 << 32) * 64;

/// One mask: a seed and whether its stream is added or subtracted.
pub(crate) struct Mask {
    pub(crate) seed: Zeroizing<[u8; 32]>,
    pub(crate) add: bool,
}

/// Fold every mask into `acc` (whole elements of `ring`; `acc.len() <= MAX_BYTES`).
pub(crate) fn apply(ring: Ring, acc: &mut [u8], masks: &[Mask]) {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_THREADS)
        .min(acc.len() / PARALLEL_MIN)
        .max(1);
    apply_split(ring, acc, masks, threads);
}

/// [`apply`] on `threads` threads.
fn apply_split(ring: Ring, acc: &mut [u8], masks: &[Mask], threads: usize) {
    let width = ring.width();
    if threads <= 1 || masks.is_empty() {
        apply_range(ring, acc, 0, masks);
        return;
    }
    let elements = acc.len() / width;
    // Whole elements per thread, rounded up to whole blocks so streams stay block-aligned.
    let per = (elements.div_ceil(threads) * width).div_ceil(BLOCK) * BLOCK;
    std::thread::scope(|scope| {
        let mut chunks = acc.chunks_mut(per).enumerate();
        let first = chunks.next();
        for (i, chunk) in chunks {
            scope.spawn(move || apply_range(ring, chunk, i * per, masks));
        }
        if let Some((_, chunk)) = first {
            apply_range(ring, chunk, 0, masks);
        }
    });
}

/// Fold the masks into `acc`, which starts `offset` bytes into every stream.
fn apply_range(ring: Ring, acc: &mut [u8], offset: usize, masks: &[Mask]) {
    let mut streams: Vec<ChaCha20> = masks
        .iter()
        .map(|m| {
            let mut c = ChaCha20::new(m.seed.as_ref().into(), &[0u8; 12].into());
            c.seek(offset as u64);
            c
        })
        .collect();
    let mut keystream = Zeroizing::new(vec![0u8; BLOCK.min(acc.len())]);
    for block in acc.chunks_mut(BLOCK) {
        let ks = &mut keystream[..block.len()];
        for (stream, mask) in streams.iter_mut().zip(masks) {
            ks.fill(0);
            stream.apply_keystream(ks);
            match (ring, mask.add) {
                (Ring::Z64, true) => fold64(block, ks, u64::wrapping_add),
                (Ring::Z64, false) => fold64(block, ks, u64::wrapping_sub),
                (Ring::Z128, true) => fold128(block, ks, u128::wrapping_add),
                (Ring::Z128, false) => fold128(block, ks, u128::wrapping_sub),
            }
        }
    }
}

#[inline(always)]
fn fold64(acc: &mut [u8], ks: &[u8], op: fn(u64, u64) -> u64) {
    for (a, k) in acc.chunks_exact_mut(8).zip(ks.chunks_exact(8)) {
        let mut x = [0u8; 8];
        let mut y = [0u8; 8];
        x.copy_from_slice(a);
        y.copy_from_slice(k);
        a.copy_from_slice(&op(u64::from_le_bytes(x), u64::from_le_bytes(y)).to_le_bytes());
    }
}

#[inline(always)]
fn fold128(acc: &mut [u8], ks: &[u8], op: fn(u128, u128) -> u128) {
    for (a, k) in acc.chunks_exact_mut(16).zip(ks.chunks_exact(16)) {
        let mut x = [0u8; 16];
        let mut y = [0u8; 16];
        x.copy_from_slice(a);
        y.copy_from_slice(k);
        a.copy_from_slice(&op(u128::from_le_bytes(x), u128::from_le_bytes(y)).to_le_bytes());
    }
}

/// Wrapping element-wise `acc += other` (the server's running sum).
pub(crate) fn add_into(ring: Ring, acc: &mut [u8], other: &[u8]) {
    match ring {
        Ring::Z64 => fold64(acc, other, u64::wrapping_add),
        Ring::Z128 => fold128(acc, other, u128::wrapping_add),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(byte: u8, add: bool) -> Mask {
        Mask {
            seed: Zeroizing::new([byte; 32]),
            add,
        }
    }

    #[test]
    fn add_then_subtract_is_identity_across_threads_and_blocks() {
        for ring in [Ring::Z64, Ring::Z128] {
            // Not a whole number of blocks, split between threads.
            let len = 3 * BLOCK + 5 * ring.width();
            let original: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut acc = original.clone();
            apply_split(ring, &mut acc, &[mask(1, true), mask(2, false)], 3);
            assert_ne!(acc, original);
            apply_split(ring, &mut acc, &[mask(2, true), mask(1, false)], 2);
            assert_eq!(acc, original);
        }
    }

    #[test]
    fn split_and_single_threaded_expansions_agree() {
        let ring = Ring::Z128;
        let len = 2 * BLOCK + 48;
        let mut parallel = vec![0u8; len];
        apply_split(ring, &mut parallel, &[mask(9, true)], 2);
        let mut serial = vec![0u8; len];
        apply_range(ring, &mut serial, 0, &[mask(9, true)]);
        assert_eq!(parallel, serial);
        // The mask is the keystream itself, read as little-endian elements.
        let mut ks = vec![0u8; 32];
        ChaCha20::new(&[9u8; 32].into(), &[0u8; 12].into()).apply_keystream(&mut ks);
        assert_eq!(&serial[..32], &ks[..]);
    }
}
