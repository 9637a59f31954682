//! Keeps large buffers in the process heap, so a node does not map, fault
//! in, zero and unmap tens of megabytes of fresh pages for every tensor it
//! sends, receives or reduces.
//!
//! glibc's allocator serves requests above `M_MMAP_THRESHOLD` (128 KiB at
//! first, adapting up to 32 MiB) with their own `mmap`, and returns them to
//! the kernel on free; freed memory at the top of the heap goes back once it
//! exceeds `M_TRIM_THRESHOLD`. An averaging round allocates several buffers
//! the size of a part or of the whole model (encoded parts, frames, decoded
//! and reduced values, the served state), so each round paid for hundreds
//! of thousands of page faults: measured on the 2 peers / 10M values
//! all-reduce, 668k page faults and 7.9 CPU seconds per 10-round run, against
//! 225k and 6.7 s with these settings given through `GLIBC_TUNABLES` (see
//! BENCHMARKS.md).
//!
//! The price: memory a node freed stays with the process (its resident size
//! stays near its peak, which for a trainer is its steady state) rather than
//! going back to the system between rounds.
//!
//! The limit: glibc gives threads other than the main one (the network's and
//! the compute thread) arenas made of heaps of at most 64 MiB, and maps any
//! larger request there afresh whatever the threshold. So the one buffer of
//! a whole model that crosses threads every round (the parameters the compute
//! thread hands the driver) is reused rather than allocated anew: see
//! `p2ptrain_node::compute`.
//!
//! Elsewhere than glibc on Linux [`keep_large_buffers`] changes nothing.

#![deny(missing_docs)]
#![deny(unsafe_code)] // allowed at the one `mallopt` call below
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

/// Requests up to this size come from the heap (glibc's own ceiling for the
/// setting is 32 MiB in some versions; see [`keep_large_buffers`]).
pub const MMAP_THRESHOLD: usize = 1 << 30;
/// The most free memory the heap keeps at its top before giving it back.
pub const TRIM_THRESHOLD: usize = i32::MAX as usize;
/// glibc's documented ceiling for `M_MMAP_THRESHOLD` on 64-bit systems, used
/// where [`MMAP_THRESHOLD`] is refused.
const MMAP_THRESHOLD_CEILING: usize = 32 << 20;

/// What [`keep_large_buffers`] set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeapSettings {
    /// Requests up to `mmap_threshold` bytes come from the heap, which keeps
    /// up to `trim_threshold` free bytes.
    Set {
        /// The `M_MMAP_THRESHOLD` in force.
        mmap_threshold: usize,
        /// The `M_TRIM_THRESHOLD` in force; `None` if glibc refused it (no
        /// glibc version does) and kept its fixed 128 KiB default.
        trim_threshold: Option<usize>,
    },
    /// The C library refused the mmap threshold, or is not glibc: its
    /// defaults stay.
    Unchanged,
}

/// Sets the allocator up to keep large buffers (see the crate docs). Call it
/// first thing in `main`, before any other thread starts: glibc writes these
/// settings without synchronising with threads that are allocating.
pub fn keep_large_buffers() -> HeapSettings {
    imp::keep_large_buffers()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use super::{HeapSettings, MMAP_THRESHOLD, MMAP_THRESHOLD_CEILING, TRIM_THRESHOLD};

    /// `mallopt(param, value)`, true when glibc accepted it.
    fn set(param: libc::c_int, value: usize) -> bool {
        let Ok(value) = libc::c_int::try_from(value) else {
            return false;
        };
        // SAFETY: mallopt stores a tuning parameter of the allocator and
        // touches no memory of ours; it reports a refused value by returning
        // 0. Its write is not synchronised with other threads' allocations,
        // which is why callers make it before they start any thread.
        #[allow(unsafe_code)]
        let accepted = unsafe { libc::mallopt(param, value) };
        accepted == 1
    }

    pub(super) fn keep_large_buffers() -> HeapSettings {
        // The mmap threshold first: setting either parameter turns off
        // glibc's adaptive thresholds, and with only the trim threshold
        // raised every request above 128 KiB would be mapped afresh
        // (measured: 2.6x the page faults of the defaults). glibc accepts
        // any trim threshold; the mmap threshold alone is harmless.
        let mmap_threshold = [MMAP_THRESHOLD, MMAP_THRESHOLD_CEILING]
            .into_iter()
            .find(|&t| set(libc::M_MMAP_THRESHOLD, t));
        let Some(mmap_threshold) = mmap_threshold else {
            return HeapSettings::Unchanged;
        };
        HeapSettings::Set {
            mmap_threshold,
            trim_threshold: set(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD).then_some(TRIM_THRESHOLD),
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    use super::HeapSettings;

    pub(super) fn keep_large_buffers() -> HeapSettings {
        HeapSettings::Unchanged
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Minor page faults of this process so far (field 10 of /proc/self/stat).
    fn minor_faults() -> u64 {
        let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
        // The command name (field 2) is parenthesised and may hold spaces.
        let after_name = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
        after_name
            .split(' ')
            .nth(7)
            .and_then(|f| f.parse().ok())
            .expect("minflt field")
    }

    /// Allocates `bytes`, writes every page, frees it; returns the minor
    /// page faults that took.
    fn faults_of_a_fresh_buffer(bytes: usize) -> u64 {
        let before = minor_faults();
        let buf = std::hint::black_box(vec![1u8; bytes]);
        drop(buf);
        minor_faults() - before
    }

    #[test]
    fn a_large_buffer_is_reused_without_faulting_its_pages_in_again() {
        // 16 MiB: above glibc's adaptive threshold's start, within what a
        // thread's arena can hold (tests run on spawned threads).
        const BYTES: usize = 16 << 20;
        let pages = (BYTES / 4096) as u64;
        assert!(matches!(
            keep_large_buffers(),
            HeapSettings::Set { mmap_threshold, trim_threshold: Some(TRIM_THRESHOLD) }
                if mmap_threshold >= MMAP_THRESHOLD_CEILING
        ));
        // The first allocation faults its pages in; the next ones reuse them.
        let first = faults_of_a_fresh_buffer(BYTES);
        if first < pages / 2 {
            // Transparent huge pages set to `always` fault 2 MiB at a time:
            // there is no per-page cost to measure on this machine.
            eprintln!("a fresh {BYTES}-byte buffer took only {first} faults; nothing to measure");
            return;
        }
        let again: u64 = (0..4).map(|_| faults_of_a_fresh_buffer(BYTES)).sum();
        assert!(
            again < pages / 4,
            "4 reuses of a {BYTES}-byte buffer took {again} page faults (the fresh one: {first})"
        );
    }
}
