//! A global allocator that keeps freed large blocks for reuse instead of handing them back
//! to the OS.
//!
//! A training step allocates and frees the same large buffers (activations, gradients,
//! GEMM outputs of up to tens of MiB) every step. glibc serves a block of 32 MiB or more
//! (and, after a trim, smaller ones) with a fresh `mmap`, so every step the kernel zeroes
//! and faults in the same pages again: 25-30% of a `bench-small` step's CPU time went to
//! `clear_page` and page faults. Here a freed block of at least [`MIN_CACHED`] bytes goes
//! into a cache keyed by its size class, and the next request of that class
//! takes it back; the cache holds at most [`MAX_CACHED_BYTES`] (least recently freed
//! blocks go back to the system first; [`ReuseLarge::set_cache_limit`] lowers it for a
//! command that has no steps, such as `prepare-data`). Cached blocks share one alignment
//! ([`ALIGN`]). The binary installs it with `#[global_allocator]`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

/// Bytes handed out and not yet freed, as requested (not size classes, not the cache), and
/// their highest value since [`reset_peak`]: what the process holds, for the memory
/// figures of a step (`Trainer::step`) and `estimate-memory`'s checks. Zero unless the
/// binary installed [`ReuseLarge`] as its global allocator. Signed: a thread may report a
/// free before the thread that allocated the block reports the allocation.
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

/// Bytes a thread allocates or frees in small steps before it reports them to [`LIVE`]:
/// two shared counters updated on every allocation were half of a two-thread BPE encode's
/// time (`prepare-data`: the cache line bounced between the cores on millions of small
/// allocations). The figures are then exact to within this much per thread.
pub const UNREPORTED_LIMIT: isize = 16 << 10;

thread_local! {
    /// This thread's allocated minus freed bytes not yet added to [`LIVE`].
    static UNREPORTED: Cell<isize> = const { Cell::new(0) };
}

fn counted(delta: isize) {
    let report = UNREPORTED
        .try_with(|unreported| {
            let sum = unreported.get() + delta;
            if sum.abs() < UNREPORTED_LIMIT {
                unreported.set(sum);
                0
            } else {
                unreported.set(0);
                sum
            }
        })
        // A thread past its thread-locals' teardown reports at once.
        .unwrap_or(delta);
    if report != 0 {
        let live = LIVE.fetch_add(report, Ordering::Relaxed) + report;
        if report > 0 {
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
    }
}

fn counted_alloc(bytes: usize) {
    counted(bytes as isize);
}

fn counted_free(bytes: usize) {
    counted(-(bytes as isize));
}

/// Bytes the process holds now (requested sizes); 0 without [`ReuseLarge`] installed.
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed).max(0) as usize
}

/// The most bytes held at once since the last [`reset_peak`] (or the start).
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed).max(0) as usize
}

/// Starts a new peak from what is held now; returns the previous peak.
pub fn reset_peak() -> usize {
    PEAK.swap(LIVE.load(Ordering::Relaxed), Ordering::Relaxed)
        .max(0) as usize
}

/// Whether the counting allocator is the process's global allocator (something is always
/// allocated by the time anyone asks).
pub fn counting() -> bool {
    live_bytes() > 0
}

/// Blocks smaller than this go straight to the system allocator (its free lists reuse them
/// without the kernel's help).
pub const MIN_CACHED: usize = 64 << 10;
/// Every cached block is allocated with this alignment and serves any request of its size
/// class aligned to at most this (burn's buffers and plain `Vec`s ask for different
/// alignments; keyed apart, each kind missed the other's freed blocks).
pub const ALIGN: usize = 64;
/// The most free bytes the cache keeps.
pub const MAX_CACHED_BYTES: usize = 2 << 30;
/// The most free blocks the cache keeps (a step frees a few thousand large buffers: with
/// too few slots the cache evicts blocks the next step asks for again).
const SLOTS: usize = 4096;

/// The size a request of `size` bytes (at least [`MIN_CACHED`]) is served with: rounded up
/// to one of 8 classes per power of two (at most 12.5% slack), so blocks of nearly equal
/// sizes (expert buffers whose row counts vary from step to step) serve each other.
pub fn size_class(size: usize) -> usize {
    debug_assert!(size >= MIN_CACHED);
    let step = 1usize << (usize::BITS - 1 - size.leading_zeros() - 3);
    size.div_ceil(step) * step
}

#[derive(Clone, Copy)]
struct Block {
    addr: usize,
    size: usize,
}

struct Cache {
    /// Free blocks, oldest first.
    blocks: [Block; SLOTS],
    len: usize,
    bytes: usize,
}

/// The reusing allocator; `ReuseLarge::new()` in a `#[global_allocator]` static.
pub struct ReuseLarge {
    cache: Mutex<Cache>,
    /// The most free bytes the cache keeps now (at most [`MAX_CACHED_BYTES`]).
    limit: AtomicUsize,
}

impl ReuseLarge {
    pub const fn new() -> Self {
        const EMPTY: Block = Block { addr: 0, size: 0 };
        Self {
            cache: Mutex::new(Cache {
                blocks: [EMPTY; SLOTS],
                len: 0,
                bytes: 0,
            }),
            limit: AtomicUsize::new(MAX_CACHED_BYTES),
        }
    }

    /// Keeps at most `bytes` (capped at [`MAX_CACHED_BYTES`]) of freed blocks from now on;
    /// 0 hands every large block back to the system when it is freed. Blocks cached above
    /// the limit go back as later blocks are freed.
    pub fn set_cache_limit(&self, bytes: usize) {
        self.limit
            .store(bytes.min(MAX_CACHED_BYTES), Ordering::Relaxed);
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A cached block of exactly `size` bytes (a size class), taken out.
    fn take(&self, size: usize) -> Option<*mut u8> {
        let mut c = self.cache();
        let len = c.len;
        // Newest first: the block freed last is the likeliest to be in cache.
        let i = (0..len).rev().find(|&i| c.blocks[i].size == size)?;
        let block = c.blocks[i];
        c.blocks.copy_within(i + 1..len, i);
        c.len -= 1;
        c.bytes -= size;
        Some(block.addr as *mut u8)
    }

    /// Keeps a freed block, giving the oldest ones back to the system to make room.
    fn put(&self, block: Block) {
        let limit = self.limit.load(Ordering::Relaxed);
        if block.size > limit {
            return release(block);
        }
        loop {
            let mut c = self.cache();
            if c.len < SLOTS && c.bytes + block.size <= limit {
                let len = c.len;
                c.blocks[len] = block;
                c.len += 1;
                c.bytes += block.size;
                return;
            }
            // Full: the oldest block goes back (outside the lock; the system allocator
            // may take its own).
            let oldest = c.blocks[0];
            let len = c.len;
            c.blocks.copy_within(1..len, 0);
            c.len -= 1;
            c.bytes -= oldest.size;
            drop(c);
            release(oldest);
        }
    }

    /// Free bytes held in the cache.
    pub fn cached_bytes(&self) -> usize {
        self.cache().bytes
    }
}

impl Default for ReuseLarge {
    fn default() -> Self {
        Self::new()
    }
}

fn release(b: Block) {
    // SAFETY: the block came from `System.alloc` with exactly this size and `ALIGN`.
    unsafe {
        System.dealloc(
            b.addr as *mut u8,
            Layout::from_size_align_unchecked(b.size, ALIGN),
        )
    }
}

/// Whether the cache serves a request of this layout.
fn cached(layout: Layout) -> bool {
    layout.size() >= MIN_CACHED && layout.align() <= ALIGN
}

// SAFETY: every block handed out is either the system allocator's answer for the request
// (small or over-aligned) or a block of the request's size class (at least the request)
// aligned to `ALIGN` (at least the request's),
// owned by nobody else: the cache gives each block out once and takes it back on `dealloc`.
unsafe impl GlobalAlloc for ReuseLarge {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { self.alloc_uncounted(layout) };
        if !p.is_null() {
            counted_alloc(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { self.alloc_zeroed_uncounted(layout) };
        if !p.is_null() {
            counted_alloc(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        counted_free(layout.size());
        // SAFETY: forwarded as is.
        unsafe { self.dealloc_uncounted(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { self.realloc_uncounted(ptr, layout, new_size) };
        if !p.is_null() {
            counted_free(layout.size());
            counted_alloc(new_size);
        }
        p
    }
}

impl ReuseLarge {
    /// # Safety
    /// `GlobalAlloc::alloc`'s contract.
    unsafe fn alloc_uncounted(&self, layout: Layout) -> *mut u8 {
        if !cached(layout) {
            // SAFETY: forwarded as is.
            return unsafe { System.alloc(layout) };
        }
        let size = size_class(layout.size());
        match self.take(size) {
            Some(p) => p,
            // SAFETY: size is non-zero and ALIGN a power of two.
            None => unsafe { System.alloc(Layout::from_size_align_unchecked(size, ALIGN)) },
        }
    }

    /// # Safety
    /// `GlobalAlloc::alloc_zeroed`'s contract.
    unsafe fn alloc_zeroed_uncounted(&self, layout: Layout) -> *mut u8 {
        if !cached(layout) {
            // SAFETY: forwarded as is.
            return unsafe { System.alloc_zeroed(layout) };
        }
        let size = size_class(layout.size());
        match self.take(size) {
            Some(p) => {
                // SAFETY: the block holds at least `layout.size()` bytes.
                unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
                p
            }
            // SAFETY: as in `alloc`; fresh system memory comes zeroed without a pass.
            None => unsafe { System.alloc_zeroed(Layout::from_size_align_unchecked(size, ALIGN)) },
        }
    }

    /// # Safety
    /// `GlobalAlloc::dealloc`'s contract.
    unsafe fn dealloc_uncounted(&self, ptr: *mut u8, layout: Layout) {
        if !cached(layout) {
            // SAFETY: such a block came from `System` with this layout.
            return unsafe { System.dealloc(ptr, layout) };
        }
        self.put(Block {
            addr: ptr as usize,
            size: size_class(layout.size()),
        });
    }

    /// # Safety
    /// `GlobalAlloc::realloc`'s contract.
    unsafe fn realloc_uncounted(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's layout rules hold for the new layout too.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !cached(layout) && !cached(new_layout) {
            // SAFETY: forwarded as is.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        if cached(layout) && cached(new_layout) && size_class(layout.size()) == size_class(new_size)
        {
            return ptr;
        }
        // SAFETY: a fresh block for the new layout, the old one's bytes moved over and the
        // old one given back with its own layout.
        unsafe {
            let new = self.alloc_uncounted(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc_uncounted(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_cover_the_request_with_little_slack() {
        for size in [
            MIN_CACHED,
            MIN_CACHED + 1,
            100_000,
            1 << 20,
            (1 << 25) + 12345,
        ] {
            let c = size_class(size);
            assert!(c >= size && c <= size + size / 8, "{size} -> {c}");
            assert_eq!(size_class(c), c, "a class is its own class");
        }
    }

    #[test]
    fn without_a_cache_a_freed_block_goes_back_at_once() {
        let a = ReuseLarge::new();
        let layout = Layout::from_size_align(300_000, 64).unwrap();
        // SAFETY: every block is used within its layout and freed once with it.
        unsafe {
            let p = a.alloc(layout);
            a.dealloc(p, layout);
            assert_eq!(a.cached_bytes(), size_class(300_000));
            a.set_cache_limit(0);
            let q = a.alloc(layout); // the cached block
            let r = a.alloc(layout);
            a.dealloc(q, layout);
            a.dealloc(r, layout);
            assert_eq!(a.cached_bytes(), 0);
        }
    }

    #[test]
    fn a_freed_large_block_is_reused_and_zeroed_on_request() {
        let a = ReuseLarge::new();
        let layout = Layout::from_size_align(300_000, 64).unwrap();
        // SAFETY: every block is used within its layout and freed once with it.
        unsafe {
            let p = a.alloc(layout);
            std::ptr::write_bytes(p, 7, layout.size());
            a.dealloc(p, layout);
            assert_eq!(a.cached_bytes(), size_class(300_000));
            // A slightly different size of the same class and alignment takes it back.
            let near = Layout::from_size_align(299_000, 64).unwrap();
            let q = a.alloc_zeroed(near);
            assert_eq!(q, p);
            assert_eq!(a.cached_bytes(), 0);
            assert!(
                std::slice::from_raw_parts(q, near.size())
                    .iter()
                    .all(|&b| b == 0)
            );
            // Another alignment up to `ALIGN` does too; a larger one goes to the system.
            a.dealloc(q, near);
            let other = Layout::from_size_align(299_000, 4).unwrap();
            let r = a.alloc(other);
            assert_eq!(r, p);
            assert_eq!(r as usize % ALIGN, 0);
            a.dealloc(r, other);
            let over = Layout::from_size_align(299_000, 2 * ALIGN).unwrap();
            let o = a.alloc(over);
            assert_ne!(o, p);
            a.dealloc(o, over);
            // Growing within the class keeps the block; across classes moves the bytes.
            let s = a.alloc(near);
            *s = 42;
            let s = a.realloc(s, near, 300_000);
            assert_eq!(*s, 42);
            let big = a.realloc(s, layout, 1 << 22);
            assert_eq!(*big, 42);
            a.dealloc(big, Layout::from_size_align(1 << 22, 64).unwrap());
        }
    }

    #[test]
    fn the_cache_holds_at_most_its_slot_count() {
        let a = ReuseLarge::new();
        let layout = Layout::from_size_align(MIN_CACHED, 8).unwrap();
        // SAFETY: as above.
        unsafe {
            let blocks: Vec<*mut u8> = (0..SLOTS + 10).map(|_| a.alloc(layout)).collect();
            for &p in &blocks {
                a.dealloc(p, layout);
            }
        }
        assert_eq!(a.cached_bytes(), SLOTS * MIN_CACHED);
    }
}
