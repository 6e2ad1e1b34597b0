//! The compression stage: wraps a writer in gzip, zstd or nothing. It knows nothing of tar or S3.
//!
//! Both codecs compress on every core the same way: the input is cut into blocks, each block is
//! compressed on a worker thread into a self-contained unit (a gzip member, a zstd frame), and
//! the units are written in order. Concatenated units are one valid file (RFC 1952 §2.2 for gzip;
//! RFC 8878 §3 for zstd): `gzip -d`, `zstd -d`, `tar xzf` and `tar --zstd -xf` read the whole
//! stream. The writing thread only copies bytes into blocks, so the archive walk never waits on
//! compression until every worker has a block and two more are queued. How many workers, how
//! big the blocks and how many in flight is a [`Pool`], which the memory budget chooses
//! (`crate::budget`).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::config::CompressionKind;

/// Compression workers and the blocks they work on.
#[derive(Debug, Clone, Copy)]
pub struct Pool {
    /// Worker threads.
    pub threads: usize,
    /// Input bytes per unit (gzip member, zstd frame).
    pub block_size: usize,
    /// Blocks queued, compressing or waiting to be written, at most.
    pub in_flight: usize,
}

/// A compressing writer that hands back its inner writer once the stream is closed.
pub trait Compressor<W>: Write + Send {
    /// Writes `n` zero bytes. The block-parallel codecs emit a unit compressed once per whole
    /// block of zeros, so a long run (the rest of a 50 GiB file cut at a deadline) costs a copy
    /// of a few bytes per block instead of compressing gigabytes.
    fn write_zeros(&mut self, n: u64) -> io::Result<()> {
        crate::zeros::write_zeros(self, n)
    }

    /// Flushes everything, writes the stream's trailer and returns the inner writer.
    fn finish(self: Box<Self>) -> io::Result<W>;
}

/// Wraps `inner` in the compression `kind` at `level`, on `pool`'s workers.
pub fn compressor<W: Write + Send + 'static>(
    kind: CompressionKind,
    level: i32,
    pool: Pool,
    inner: W,
) -> io::Result<Box<dyn Compressor<W>>> {
    Ok(match kind {
        CompressionKind::None => Box::new(Plain(inner)),
        CompressionKind::Gzip => Box::new(BlockParallel::new(
            inner,
            Codec::Gzip(flate2::Compression::new(u32::try_from(level).unwrap_or(6))),
            pool,
        )),
        CompressionKind::Zstd => Box::new(BlockParallel::new(inner, Codec::Zstd(level), pool)),
    })
}

/// Environment variable that overrides the number of compression workers (`[backup] workers`),
/// for benchmarks that reproduce a many-core machine on a small one.
pub const WORKERS_ENV: &str = "LIFEBOAT_WORKERS";

/// The number of compression workers wanted: `configured`, else one per core; `LIFEBOAT_WORKERS`
/// overrides both when it is a number from 1 to 1024.
pub fn wanted_workers(configured: Option<usize>) -> usize {
    let from_env = std::env::var(WORKERS_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| (1..=1024).contains(n));
    from_env
        .or(configured)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
}

/// Wraps `raw` in the decompressor for `kind`: a reader of the tar stream. gzip input may hold
/// several members (lifeboat's own archives do); all are read.
pub fn decompressor<'a, R: io::Read + 'a>(
    kind: CompressionKind,
    raw: R,
) -> io::Result<Box<dyn io::Read + 'a>> {
    let raw = io::BufReader::with_capacity(256 * 1024, raw);
    Ok(match kind {
        CompressionKind::None => Box::new(raw),
        CompressionKind::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(raw)),
        CompressionKind::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(raw)?),
    })
}

struct Plain<W>(W);

impl<W: Write + Send> Write for Plain<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<W: Write + Send> Compressor<W> for Plain<W> {
    fn finish(mut self: Box<Self>) -> io::Result<W> {
        self.0.flush()?;
        Ok(self.0)
    }
}

/// The outcome, the input block and the unit (compressed into the buffer the job brought), both
/// back for reuse.
type Done = (io::Result<()>, Vec<u8>, Vec<u8>);
/// A block to compress, the buffer to compress it into, and where to send them back.
type Job = (Vec<u8>, Vec<u8>, SyncSender<Done>);

/// How a block becomes a self-contained unit.
#[derive(Debug, Clone, Copy)]
enum Codec {
    Gzip(flate2::Compression),
    Zstd(i32),
}

/// A worker's codec state, kept across blocks: a zstd context is megabytes of tables, and
/// building one per block cost a measurable share of the time.
enum Worker {
    Gzip(flate2::Compression),
    Zstd(zstd::bulk::Compressor<'static>),
}

impl Worker {
    fn new(codec: Codec) -> io::Result<Self> {
        Ok(match codec {
            Codec::Gzip(level) => Self::Gzip(level),
            Codec::Zstd(level) => {
                let mut c = zstd::bulk::Compressor::new(level)?;
                c.include_checksum(true)?;
                c.include_contentsize(true)?;
                Self::Zstd(c)
            }
        })
    }

    /// Compresses `block` into `out` (emptied first). `out` is a buffer the writer recycles, so
    /// the workers allocate nothing per block: buffers freed on another thread than the one that
    /// allocated them stay resident in the allocator's per-thread arenas.
    fn compress_into(&mut self, block: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        out.clear();
        out.reserve(compress_bound(block.len()));
        match self {
            Self::Gzip(level) => {
                // The header is written last, when the member's length is known.
                out.resize(GZIP_HEADER, 0);
                let mut enc = flate2::write::DeflateEncoder::new(std::mem::take(out), *level);
                enc.write_all(block)?;
                let mut member = enc.finish()?;
                let mut crc = flate2::Crc::new();
                crc.update(block);
                member.extend_from_slice(&crc.sum().to_le_bytes());
                // ISIZE: the input's length modulo 2^32 (blocks are far smaller).
                member.extend_from_slice(&(block.len() as u32).to_le_bytes());
                let length = u32::try_from(member.len())
                    .map_err(|_| io::Error::other("a gzip member over 4 GiB"))?;
                member[..GZIP_HEADER].copy_from_slice(&gzip_header(*level, length));
                *out = member;
                Ok(())
            }
            // Each call is a complete frame (the context's session is reset, its tables kept).
            Self::Zstd(c) => c.compress_to_buffer(block, out).map(drop),
        }
    }
}

/// A member's header: RFC 1952 with `FEXTRA`, holding one subfield, `LB`, the whole member's
/// length (little-endian `u32`), so that restore can cut the stream into members without
/// inflating it and inflate them in parallel ([`crate::decompress`]). Readers that do not know the
/// subfield skip it, as they skip BGZF's `BC`.
const GZIP_HEADER: usize = 20;

fn gzip_header(level: flate2::Compression, length: u32) -> [u8; GZIP_HEADER] {
    let xfl = match level.level() {
        9 => 2, // slowest, best
        0 | 1 => 4,
        _ => 0,
    };
    let [a, b] = crate::decompress::LENGTH_FIELD;
    let [l0, l1, l2, l3] = length.to_le_bytes();
    [
        0x1f, 0x8b, 8,    // magic, deflate
        0x04, // FLG: FEXTRA
        0, 0, 0, 0, // MTIME: none
        xfl, 3, // XFL, OS: Unix
        8, 0, // XLEN
        a, b, 4, 0, // subfield LB, 4 bytes
        l0, l1, l2, l3,
    ]
}

/// The most a unit of `len` input bytes can take, for either codec (zstd's bound is the larger;
/// deflate's stored blocks add 5 bytes per 64 KiB and gzip 18 bytes of framing).
fn compress_bound(len: usize) -> usize {
    zstd::zstd_safe::compress_bound(len).max(len + len / 8192 * 5 + 64)
}

/// Compression on every core: blocks go to a pool of workers; units come back in order.
struct BlockParallel<W> {
    inner: W,
    codec: Codec,
    block_size: usize,
    block: Vec<u8>,
    jobs: Option<SyncSender<Job>>,
    pending: VecDeque<Receiver<Done>>,
    max_pending: usize,
    workers: Vec<JoinHandle<()>>,
    /// Input blocks back from the workers, reused so their pages are not faulted in again.
    spare: Vec<Vec<u8>>,
    /// Unit buffers back from the writer, likewise.
    spare_units: Vec<Vec<u8>>,
    /// A whole block of zeros, compressed once (on first use).
    zero_unit: Option<Arc<[u8]>>,
}

impl<W: Write + Send> BlockParallel<W> {
    fn new(inner: W, codec: Codec, pool: Pool) -> Self {
        let threads = pool.threads.max(1);
        let block_size = pool.block_size.max(4096);
        let (tx, rx) = mpsc::sync_channel::<Job>(threads);
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..threads)
            .map(|i| {
                let rx = Arc::clone(&rx);
                std::thread::Builder::new()
                    .name(format!("lifeboat-compress-{i}"))
                    .spawn(move || compress_worker(&rx, codec))
                    .expect("spawning a compression thread")
            })
            .collect();
        Self {
            inner,
            codec,
            block_size,
            block: Vec::with_capacity(block_size),
            jobs: Some(tx),
            pending: VecDeque::new(),
            max_pending: pool.in_flight.max(threads),
            workers,
            spare: Vec::new(),
            spare_units: Vec::new(),
            zero_unit: None,
        }
    }

    /// Queues an already compressed unit in order with the blocks in flight.
    fn queue_ready(&mut self, unit: Vec<u8>) -> io::Result<()> {
        while self.pending.len() >= self.max_pending {
            self.write_oldest()?;
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let _ = tx.send((Ok(()), Vec::new(), unit));
        self.pending.push_back(rx);
        Ok(())
    }

    /// The unit of one whole block of zeros, compressed on first use.
    fn zero_unit(&mut self) -> io::Result<Arc<[u8]>> {
        if let Some(u) = &self.zero_unit {
            return Ok(Arc::clone(u));
        }
        let mut unit = Vec::new();
        Worker::new(self.codec)?.compress_into(&vec![0; self.block_size], &mut unit)?;
        let unit: Arc<[u8]> = unit.into();
        self.zero_unit = Some(Arc::clone(&unit));
        Ok(unit)
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        while self.pending.len() >= self.max_pending {
            self.write_oldest()?;
        }
        let next = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.block_size));
        let block = std::mem::replace(&mut self.block, next);
        let unit = self.spare_units.pop().unwrap_or_default();
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .as_ref()
            .expect("jobs open until finish")
            .send((block, unit, tx))
            .map_err(|_| io::Error::other("compression workers stopped"))?;
        self.pending.push_back(rx);
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        if let Some(rx) = self.pending.pop_front() {
            let (outcome, mut block, unit) = rx
                .recv()
                .map_err(|_| io::Error::other("a compression worker stopped"))?;
            outcome?;
            self.inner.write_all(&unit)?;
            if block.capacity() > 0 {
                block.clear();
                self.spare.push(block);
            }
            // Precomputed units (runs of zeros) come without a job's buffer: keep no more
            // buffers than blocks in flight.
            if unit.capacity() > 0 && self.spare_units.len() < self.max_pending {
                self.spare_units.push(unit);
            }
        }
        Ok(())
    }
}

fn compress_worker(jobs: &Mutex<Receiver<Job>>, codec: Codec) {
    let mut worker = Worker::new(codec);
    loop {
        // Hold the lock only to take a job, never while compressing.
        let job = jobs.lock().map(|rx| rx.recv());
        let Ok(Ok((block, mut unit, reply))) = job else {
            return;
        };
        let outcome = match &mut worker {
            Ok(w) => w.compress_into(&block, &mut unit),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        };
        // The writer may have gone away after an error; nothing to do then.
        let _ = reply.send((outcome, block, unit));
    }
}

impl<W: Write + Send> Write for BlockParallel<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let size = self.block_size;
        let n = buf.len().min(size - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        if self.block.len() == size {
            self.submit()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.submit()?;
        while !self.pending.is_empty() {
            self.write_oldest()?;
        }
        self.inner.flush()
    }
}

impl<W: Write + Send> Compressor<W> for BlockParallel<W> {
    fn write_zeros(&mut self, mut n: u64) -> io::Result<()> {
        let size = self.block_size;
        // Up to the next block boundary the ordinary way.
        let head = ((size - self.block.len()) % size) as u64;
        let head = head.min(n);
        crate::zeros::write_zeros(self, head)?;
        n -= head;
        // Whole blocks: the precomputed unit.
        if n >= size as u64 {
            let unit = self.zero_unit()?;
            while n >= size as u64 {
                self.queue_ready(unit.to_vec())?;
                n -= size as u64;
            }
        }
        crate::zeros::write_zeros(self, n)
    }

    fn finish(mut self: Box<Self>) -> io::Result<W> {
        self.flush()?;
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        // Dropping the job sender (above) is what stops the workers if this is never reached.
        Ok(self.inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    const GZIP_BLOCK: usize = 1024 * 1024;
    const ZSTD_BLOCK: usize = 2 * 1024 * 1024;

    fn pool(kind: CompressionKind) -> Pool {
        Pool {
            threads: 2,
            block_size: if kind == CompressionKind::Zstd {
                ZSTD_BLOCK
            } else {
                GZIP_BLOCK
            },
            in_flight: 4,
        }
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ ((i / 4096) as u8))
            .collect()
    }

    #[test]
    fn parallel_gzip_and_zstd_are_one_readable_stream_each() {
        let data = sample(3 * GZIP_BLOCK + 12345);
        let mut c = compressor(
            CompressionKind::Gzip,
            6,
            pool(CompressionKind::Gzip),
            Vec::new(),
        )
        .unwrap();
        for chunk in data.chunks(70_000) {
            c.write_all(chunk).unwrap();
        }
        let out = c.finish().unwrap();
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(&out[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);

        let data = sample(3 * ZSTD_BLOCK + 777);
        let mut c = compressor(
            CompressionKind::Zstd,
            3,
            pool(CompressionKind::Zstd),
            Vec::new(),
        )
        .unwrap();
        c.write_all(&data).unwrap();
        let out = c.finish().unwrap();
        let mut back = Vec::new();
        decompressor(CompressionKind::Zstd, &out[..])
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn runs_of_zeros_are_stored_as_precomputed_units_and_read_back_exactly() {
        for (kind, block) in [
            (CompressionKind::Gzip, GZIP_BLOCK),
            (CompressionKind::Zstd, ZSTD_BLOCK),
            (CompressionKind::None, GZIP_BLOCK),
        ] {
            let head = sample(block / 3);
            let zeros = (5 * block + 4321) as u64;
            let mut c = compressor(kind, 3, pool(kind), Vec::new()).unwrap();
            c.write_all(&head).unwrap();
            c.write_zeros(zeros).unwrap();
            c.write_all(b"tail").unwrap();
            let out = c.finish().unwrap();
            let mut back = Vec::new();
            decompressor(kind, &out[..])
                .unwrap()
                .read_to_end(&mut back)
                .unwrap();
            let mut want = head.clone();
            want.resize(head.len() + zeros as usize, 0);
            want.extend_from_slice(b"tail");
            assert!(
                back == want,
                "{kind:?}: {} bytes back, {} wanted",
                back.len(),
                want.len()
            );
            if kind != CompressionKind::None {
                assert!(out.len() < block, "{kind:?}: {} bytes", out.len());
            }
        }
    }

    #[test]
    fn zstd_and_none_round_trip() {
        let data = sample(2 * GZIP_BLOCK);
        let mut c = compressor(
            CompressionKind::Zstd,
            3,
            pool(CompressionKind::Zstd),
            Vec::new(),
        )
        .unwrap();
        c.write_all(&data).unwrap();
        let out = c.finish().unwrap();
        assert_eq!(zstd::decode_all(&out[..]).unwrap(), data);

        let mut c = compressor(
            CompressionKind::None,
            0,
            pool(CompressionKind::None),
            Vec::new(),
        )
        .unwrap();
        c.write_all(&data).unwrap();
        assert_eq!(c.finish().unwrap(), data);
    }
}
