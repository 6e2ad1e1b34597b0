//! The memory budget: one limit (`[backup] memory_limit`) from which the pipeline's compression
//! workers, blocks in flight, block size, part size and parts in flight all derive, whatever the
//! core count.
//!
//! The pipeline's memory is three pools. The process itself (code, runtime, SDK clients, the walk)
//! is [`RESERVE`]. Compression holds, per worker, a codec context, and for every block in flight
//! its input and its compressed unit, plus the block being filled. The upload holds the part being
//! filled and the parts in flight; the upload stage takes memory for each part from a pool of
//! [`Plan::part_memory`] bytes, so parts that grow (part sizes double every 900 parts) mean fewer
//! of them in flight, not more memory. A [`Plan`] sizes the pools so their worst case (every
//! block incompressible) fits the limit. [`plan`] refuses only a limit below [`MIN_LIMIT`]; explicit
//! `s3.part_size` and `s3.concurrency` values that cannot fit are capped (fewer parts in flight,
//! then automatic parts), and [`check`] names the keys: `config check` refuses them, a backup
//! logs a warning and runs.
//!
//! What is outside the budget: the manifest, which lists every file (a few hundred bytes each).
//! Parts too big for the part pool (after about 49 GiB of compressed stream at two workers, 21 GiB
//! at sixteen) are staged in
//! pool-sized pieces ([`crate::upload::staged`]), so the budget holds up to S3's largest object.

use crate::config::{CompressionKind, MIN_PART_SIZE};

const MIB: u64 = 1024 * 1024;
/// The process outside the pipeline: code, the async runtime, the SDK clients and their
/// connections, the archive walk's buffers.
pub const RESERVE: u64 = 20 * MIB;
/// The default `[backup] memory_limit`.
pub const DEFAULT_LIMIT: u64 = 128 * MIB;
/// The smallest limit accepted: the reserve, one worker with small blocks, and two of S3's
/// smallest parts (one filling, one in flight).
pub const MIN_LIMIT: u64 = 40 * MIB;
/// The part size when `s3.part_size` is `auto`: large enough that a part's request overhead is
/// small, small enough that several fit in flight within the default limit.
pub const AUTO_PART_SIZE: u64 = 8 * MIB;
/// The most parts in flight `auto` asks for.
const AUTO_CONCURRENCY_MAX: usize = 16;
/// Blocks are never cut smaller than this (the ratio suffers below it).
const BLOCK_FLOOR: usize = 256 * 1024;
/// Blocks are halved to this before the worker count is reduced.
const BLOCK_PREFERRED_FLOOR: usize = 512 * 1024;

/// Why no plan fits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    /// The limit is below [`MIN_LIMIT`].
    #[error(
        "{limit} bytes is below the smallest memory limit that works ({MIN_LIMIT} bytes, 40MiB)"
    )]
    TooSmall {
        /// The limit asked for.
        limit: u64,
    },
    /// Explicit part settings need more than the limit leaves for parts.
    #[error(
        "s3.concurrency = {concurrency} parts of s3.part_size = {part_size} bytes (plus the one \
         being filled) need {needed} bytes, but backup.memory_limit = {limit} bytes leaves \
         {available} for parts: raise backup.memory_limit or lower them (or set them to \"auto\")"
    )]
    PartsTooBig {
        /// Parts in flight asked for.
        concurrency: usize,
        /// Part size asked for.
        part_size: u64,
        /// What they need.
        needed: u64,
        /// The limit.
        limit: u64,
        /// What the limit leaves for parts with the smallest compression setup.
        available: u64,
    },
}

/// What the pipeline is asked to do.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    /// `[backup] memory_limit` in bytes.
    pub limit: u64,
    /// The codec.
    pub kind: CompressionKind,
    /// Its level.
    pub level: i32,
    /// Compression workers wanted (the core count, `[backup] workers` or `LIFEBOAT_WORKERS`).
    pub workers: usize,
    /// `s3.part_size`, or `None` for auto.
    pub part_size: Option<u64>,
    /// `s3.concurrency`, or `None` for auto.
    pub concurrency: Option<usize>,
}

/// How the pipeline runs within the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Compression worker threads (0 for `none`).
    pub workers: usize,
    /// Input bytes per compressed unit (gzip member, zstd frame).
    pub block_size: usize,
    /// Blocks queued, compressing or waiting to be written, at most.
    pub blocks_in_flight: usize,
    /// The first part's size; parts grow from it.
    pub part_size: u64,
    /// Parts uploading at once, at most (fewer when parts have grown).
    pub parts_in_flight: usize,
    /// Bytes the upload may hold in parts: the part being filled and those in flight.
    pub part_memory: u64,
    /// Worst-case bytes compression holds.
    pub compression_memory: u64,
    /// The limit this plan fits.
    pub limit: u64,
}

impl Plan {
    /// The worst case of all three pools.
    pub fn total(&self) -> u64 {
        RESERVE + self.compression_memory + self.part_memory
    }

    /// The compression workers and blocks this plan allows.
    pub fn pool(&self) -> crate::compress::Pool {
        crate::compress::Pool {
            threads: self.workers,
            block_size: self.block_size,
            in_flight: self.blocks_in_flight,
        }
    }

    /// Parts of `size` bytes that may be in flight at once within [`Plan::part_memory`] (one
    /// part's memory is the one being filled), never fewer than one.
    pub fn parts_in_flight_at(&self, size: u64) -> usize {
        let slots = usize::try_from(self.part_memory / size.max(1)).unwrap_or(usize::MAX);
        slots.saturating_sub(1).clamp(1, self.parts_in_flight)
    }
}

/// The codec's preferred block: gzip's ratio barely changes below 1 MiB; zstd level 3 loses
/// about 1% at 2 MiB against 4 MiB and 3% at 1 MiB.
fn preferred_block(kind: CompressionKind) -> usize {
    match kind {
        CompressionKind::Gzip => 1024 * 1024,
        CompressionKind::Zstd => 2 * 1024 * 1024,
        CompressionKind::None => 0,
    }
}

/// One worker's codec state for blocks of `block` bytes. zstd's is measured: it depends on the
/// level and on the block size (zstd sizes its tables to the input) from 0.6 MiB (level 1) to
/// 34 MiB (level 19, 2 MiB blocks). zlib-rs keeps about 300 KiB per stream.
pub fn codec_context(kind: CompressionKind, level: i32, block: usize) -> u64 {
    match kind {
        CompressionKind::None => 0,
        CompressionKind::Gzip => 512 * 1024,
        CompressionKind::Zstd => zstd_context(level, block),
    }
}

fn zstd_context(level: i32, block: usize) -> u64 {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static SEEN: OnceLock<Mutex<HashMap<(i32, usize), u64>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    if let Some(&bytes) = seen.lock().expect("not poisoned").get(&(level, block)) {
        return bytes;
    }
    let mut ctx = zstd::zstd_safe::CCtx::create();
    let measured = ctx
        .set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(level))
        .ok()
        .and_then(|_| {
            let input = vec![0u8; block];
            let mut out = vec![0u8; zstd::zstd_safe::compress_bound(block)];
            ctx.compress2(&mut out[..], &input[..]).ok()
        })
        .map(|_| ctx.sizeof() as u64)
        // A level zstd refuses fails later with its own error; count it generously here.
        .unwrap_or(64 * MIB);
    seen.lock()
        .expect("not poisoned")
        .insert((level, block), measured);
    measured
}

/// Worst-case bytes for `workers` workers on blocks of `block` bytes: each worker's context,
/// and for each block in flight its input and a unit as large as the input (incompressible
/// data), plus the block being filled.
fn compression_memory(kind: CompressionKind, level: i32, workers: usize, block: usize) -> u64 {
    if kind == CompressionKind::None {
        return 0;
    }
    let in_flight = blocks_in_flight(workers) as u64;
    (2 * in_flight + 1) * block as u64 + workers as u64 * codec_context(kind, level, block)
}

/// One block per worker plus two: one waiting to be written in order, one queued.
fn blocks_in_flight(workers: usize) -> usize {
    workers + 2
}

/// Sizes the pipeline for `req` within its limit.
///
/// Compression keeps the workers asked for and the codec's preferred block if it can; it gives
/// up block size (down to 512 KiB), then workers, then block size again (down to 256 KiB), so
/// that parts keep room for at least two in flight. Parts then take the rest, up to the
/// concurrency asked for (`auto`: one more than the workers, 3 to 16). Explicit part settings
/// that cannot fit are capped (see [`check`]); the only error is a limit below [`MIN_LIMIT`].
pub fn plan(req: Request) -> Result<Plan, BudgetError> {
    if req.limit < MIN_LIMIT {
        return Err(BudgetError::TooSmall { limit: req.limit });
    }
    let available = req.limit - RESERVE;
    let wanted_workers = req.workers.max(1);
    let concurrency = req
        .concurrency
        .unwrap_or_else(|| (wanted_workers + 1).clamp(3, AUTO_CONCURRENCY_MAX));
    let smallest = compression_memory(req.kind, req.level, 1, BLOCK_FLOOR);
    let asked = asked_parts(req, concurrency);
    // Explicit values that do not fit are capped, not refused: a daemon that will not start
    // after an upgrade (or a backup that fails at termination) loses more than a slower upload.
    // Fewer of the parts asked for first, then `auto` parts; `config check` and every backup
    // name what was capped ([`check`]).
    let fallback = asked
        .first()
        .filter(|_| req.part_size.is_some())
        .map(|&(size, n)| (2..n).rev().map(move |k| (size, k)))
        .into_iter()
        .flatten()
        .chain([(AUTO_PART_SIZE, 3), (AUTO_PART_SIZE, 2), (MIN_PART_SIZE, 2)]);
    let Some((part_size, floor_parts)) = asked
        .iter()
        .copied()
        .chain(fallback)
        .find(|&(size, n)| fits_parts(size, n, smallest, available))
    else {
        return Err(BudgetError::TooSmall { limit: req.limit });
    };
    let part_size = part_size.max(MIN_PART_SIZE);
    let (workers, block_size) = if req.kind == CompressionKind::None {
        (0, 0)
    } else {
        choose_compression(req, available - floor_parts * part_size)
    };
    let compression = compression_memory(req.kind, req.level, workers, block_size);
    // Parts get the rest: more in flight up to the concurrency, and room for parts to grow.
    let part_memory = available - compression;
    let slots = usize::try_from(part_memory / part_size).unwrap_or(usize::MAX);
    Ok(Plan {
        workers,
        block_size,
        blocks_in_flight: if workers == 0 {
            0
        } else {
            blocks_in_flight(workers)
        },
        part_size,
        parts_in_flight: slots.saturating_sub(1).clamp(1, concurrency),
        part_memory,
        compression_memory: compression,
        limit: req.limit,
    })
}

/// The parts `req` asks for, as (part size, parts held: in flight plus the one being filled),
/// in the order tried. Explicit values give one candidate; `auto` wants two in flight before
/// compression gives anything up, and settles for one, with S3's smallest parts, in a small
/// limit.
fn asked_parts(req: Request, concurrency: usize) -> Vec<(u64, u64)> {
    let held = concurrency as u64 + 1;
    match (req.part_size, req.concurrency.is_some()) {
        (Some(size), true) => vec![(size, held)],
        (Some(size), false) => vec![(size, 3), (size, 2)],
        (None, true) => vec![(AUTO_PART_SIZE, held), (MIN_PART_SIZE, held)],
        (None, false) => vec![(AUTO_PART_SIZE, 3), (AUTO_PART_SIZE, 2), (MIN_PART_SIZE, 2)],
    }
}

fn fits_parts(size: u64, held: u64, compression: u64, available: u64) -> bool {
    size.max(MIN_PART_SIZE)
        .saturating_mul(held)
        .saturating_add(compression)
        <= available
}

/// Whether `req` fits its limit as asked: [`plan`] caps explicit `s3.part_size` and
/// `s3.concurrency` values that do not fit; this says so, naming the keys, for `config check`
/// and for the warning every backup logs.
pub fn check(req: Request) -> Result<(), BudgetError> {
    if req.limit < MIN_LIMIT {
        return Err(BudgetError::TooSmall { limit: req.limit });
    }
    if req.part_size.is_none() && req.concurrency.is_none() {
        return plan(req).map(|_| ());
    }
    let available = req.limit - RESERVE;
    let smallest = compression_memory(req.kind, req.level, 1, BLOCK_FLOOR);
    let concurrency = req
        .concurrency
        .unwrap_or_else(|| (req.workers.max(1) + 1).clamp(3, AUTO_CONCURRENCY_MAX));
    let asked = asked_parts(req, concurrency);
    if asked
        .iter()
        .any(|&(size, n)| fits_parts(size, n, smallest, available))
    {
        return Ok(());
    }
    let (part_size, n) = asked[0];
    Err(BudgetError::PartsTooBig {
        concurrency: usize::try_from(n - 1).unwrap_or(usize::MAX),
        part_size,
        needed: n.saturating_mul(part_size),
        limit: req.limit,
        available: available.saturating_sub(smallest),
    })
}

/// The most workers and the biggest block (in the order [`plan`] documents) within `room`.
fn choose_compression(req: Request, room: u64) -> (usize, usize) {
    let fits = |w: usize, b: usize| compression_memory(req.kind, req.level, w, b) <= room;
    let preferred = preferred_block(req.kind);
    let halvings = |floor: usize| {
        std::iter::successors(Some(preferred), move |b| {
            Some(b / 2).filter(|b| *b >= floor)
        })
    };
    for block in halvings(BLOCK_PREFERRED_FLOOR) {
        if fits(req.workers.max(1), block) {
            return (req.workers.max(1), block);
        }
    }
    for workers in (1..req.workers.max(1)).rev() {
        if fits(workers, BLOCK_PREFERRED_FLOOR) {
            return (workers, BLOCK_PREFERRED_FLOOR);
        }
    }
    for block in halvings(BLOCK_FLOOR) {
        if fits(1, block) {
            return (1, block);
        }
    }
    (1, BLOCK_FLOOR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upload::{Layout, MAX_PARTS, PartSizer};

    fn req(kind: CompressionKind, level: i32, workers: usize) -> Request {
        Request {
            limit: DEFAULT_LIMIT,
            kind,
            level,
            workers,
            part_size: None,
            concurrency: None,
        }
    }

    #[test]
    fn every_core_count_fits_the_default_limit() {
        for (kind, level) in [
            (CompressionKind::Gzip, 6),
            (CompressionKind::Gzip, 9),
            (CompressionKind::Zstd, 1),
            (CompressionKind::Zstd, 3),
            (CompressionKind::Zstd, 19),
            (CompressionKind::None, 0),
        ] {
            for workers in [1, 2, 4, 8, 16, 32, 64, 192] {
                let p = plan(req(kind, level, workers)).unwrap();
                assert!(
                    p.total() <= DEFAULT_LIMIT,
                    "{kind:?} {level} ×{workers}: {p:?}"
                );
                assert!(p.parts_in_flight >= 2, "{kind:?} {level} ×{workers}: {p:?}");
                if kind != CompressionKind::None {
                    assert!(p.workers >= 1 && p.block_size >= BLOCK_FLOOR, "{p:?}");
                }
            }
        }
    }

    #[test]
    fn the_two_core_default_keeps_its_workers_and_blocks() {
        let p = plan(req(CompressionKind::Gzip, 6, 2)).unwrap();
        assert_eq!((p.workers, p.block_size), (2, 1024 * 1024), "{p:?}");
        assert_eq!(p.parts_in_flight, 3, "{p:?}");
        assert_eq!(p.part_size, AUTO_PART_SIZE);
        // Sixteen workers: zstd keeps all of them, with smaller blocks.
        let p = plan(req(CompressionKind::Zstd, 3, 16)).unwrap();
        assert_eq!(p.workers, 16, "{p:?}");
        assert!(p.parts_in_flight >= 3, "{p:?}");
    }

    #[test]
    fn a_small_limit_still_works_and_a_too_small_one_is_refused() {
        for kind in [
            CompressionKind::Gzip,
            CompressionKind::Zstd,
            CompressionKind::None,
        ] {
            let p = plan(Request {
                limit: MIN_LIMIT,
                ..req(kind, 3, 64)
            })
            .unwrap();
            assert!(p.total() <= MIN_LIMIT, "{p:?}");
            assert!(p.parts_in_flight >= 1, "{p:?}");
        }
        assert_eq!(
            plan(Request {
                limit: MIN_LIMIT - 1,
                ..req(CompressionKind::Gzip, 6, 2)
            }),
            Err(BudgetError::TooSmall {
                limit: MIN_LIMIT - 1
            })
        );
    }

    #[test]
    fn explicit_parts_that_do_not_fit_are_capped_and_check_names_the_keys() {
        let asked = Request {
            part_size: Some(64 * MIB),
            concurrency: Some(4),
            ..req(CompressionKind::Gzip, 6, 2)
        };
        let text = check(asked).unwrap_err().to_string();
        assert!(
            text.contains("s3.concurrency")
                && text.contains("s3.part_size")
                && text.contains("backup.memory_limit"),
            "{text}"
        );
        // A backup still runs, within the limit, with at most the concurrency asked for.
        let p = plan(asked).unwrap();
        assert!(p.total() <= DEFAULT_LIMIT, "{p:?}");
        assert!(p.parts_in_flight <= 4 && p.part_size <= 64 * MIB, "{p:?}");
        // A part that fits alone keeps its size, with fewer in flight.
        let p = plan(Request {
            part_size: Some(32 * MIB),
            ..asked
        })
        .unwrap();
        assert!(p.total() <= DEFAULT_LIMIT, "{p:?}");
        assert_eq!(p.part_size, 32 * MIB, "{p:?}");
        // Even S3's largest part in the smallest limit.
        let p = plan(Request {
            limit: MIN_LIMIT,
            part_size: Some(5 << 30),
            ..asked
        })
        .unwrap();
        assert!(p.total() <= MIN_LIMIT, "{p:?}");
        // The same parts in a limit that holds them are taken as asked.
        let roomy = Request {
            limit: 512 * MIB,
            ..asked
        };
        assert_eq!(check(roomy), Ok(()));
        let p = plan(roomy).unwrap();
        assert_eq!((p.part_size, p.parts_in_flight), (64 * MIB, 4));
    }

    #[test]
    fn grown_parts_mean_fewer_in_flight_not_more_memory() {
        for (workers, whole) in [(2, 48u64 << 30), (16, 20 << 30)] {
            let p = plan(req(CompressionKind::Gzip, 6, workers)).unwrap();
            let sizer = PartSizer::new(p.part_size);
            // Bytes streamed in whole parts, before parts are staged.
            let mut within = 0u64;
            for number in 1..=MAX_PARTS {
                let layout = Layout::of(sizer, p.part_memory, number);
                if layout.staged() {
                    break;
                }
                let size = layout.size;
                within += size;
                // The part being filled and those in flight fit the pool.
                let in_flight = p.parts_in_flight_at(size) as u64;
                assert!(
                    (in_flight + 1) * size <= p.part_memory,
                    "part {number}: {size}"
                );
            }
            // Past this, parts are staged (a_5_tib_stream_stays_within_the_budget).
            assert!(within >= whole, "{workers} workers: {within} bytes, {p:?}");
        }
    }

    /// S3's largest object, 5 TiB, streamed at every core count and codec: no buffer the upload
    /// fills is more than half the part pool (so the pool, which the writer's semaphore never
    /// lets parts exceed, holds one filling and one uploading), the object fits in 10,000 parts
    /// of at most 5 GiB, and each staged part fits in 10,000 pieces.
    #[test]
    fn a_5_tib_stream_stays_within_the_budget() {
        const STREAM: u64 = 5 << 40;
        for (kind, level) in [
            (CompressionKind::Gzip, 6),
            (CompressionKind::Zstd, 3),
            (CompressionKind::None, 0),
        ] {
            for workers in [1, 2, 16, 64] {
                for limit in [MIN_LIMIT, DEFAULT_LIMIT, 1 << 30] {
                    let p = plan(Request {
                        limit,
                        ..req(kind, level, workers)
                    })
                    .unwrap();
                    assert!(p.total() <= limit, "{p:?}");
                    let pool = p.part_memory;
                    let sizer = PartSizer::new(p.part_size);
                    let (mut streamed, mut number, mut staged) = (0u64, 0, 0);
                    while streamed < STREAM {
                        number += 1;
                        assert!(
                            number <= MAX_PARTS,
                            "{p:?}: {streamed} bytes in 10,000 parts"
                        );
                        let layout = Layout::of(sizer, pool, number);
                        assert!(layout.size <= crate::config::MAX_PART_SIZE);
                        assert!(2 * layout.piece <= pool, "part {number}: {layout:?}, {p:?}");
                        assert!(layout.size.div_ceil(layout.piece) <= MAX_PARTS as u64);
                        staged += u64::from(layout.staged());
                        streamed += layout.size;
                    }
                    assert!(staged > 0, "{p:?}");
                }
            }
        }
    }
}
