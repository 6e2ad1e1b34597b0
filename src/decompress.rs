//! The decompression stage of restore and verify: the compressed stream is cut into its
//! independent units (gzip members, zstd frames), which worker threads decompress while the
//! caller reads the results in order, so decompression runs beside extraction and on several
//! cores.
//!
//! A splitting thread reads the raw stream. A zstd frame's length is found from its block headers
//! (`ZSTD_findFrameCompressedSize`); a gzip member's from the `LB` field lifeboat writes in the
//! member's header ([`crate::compress`]; gzip has no length of its own, and a reader that does not
//! know the field skips it, RFC 1952 §2.3.1.1). A stream that cannot be cut (archives from other
//! tools or older lifeboat versions, a frame larger than [`MAX_UNIT`] or without its size)
//! is decompressed from there on by the splitting thread itself, one unit after another: still
//! beside extraction, with bounded memory. Units in flight are bounded too: at most
//! `threads + 2`, each at most [`MAX_UNIT`] in and out.
//!
//! Whatever the path, the bytes produced are exactly those the sequential decoders produce, and a
//! damaged stream is an error at the same place: a unit whose content does not match its stated
//! length is refused.

use std::io::{self, BufRead, BufReader, Read};
use std::sync::Mutex;
use std::sync::mpsc::{self, Receiver, SyncSender};

use crate::config::CompressionKind;

/// The largest unit decompressed on a worker, compressed or not: lifeboat writes units of at
/// most a few MiB (the block size); larger ones are decompressed in sequence.
pub const MAX_UNIT: usize = 16 * 1024 * 1024;
/// The most decompression workers (extraction, one thread, is the ceiling beyond a few).
const MAX_THREADS: usize = 4;
/// How much the sequential path hands over at a time.
const CHUNK: usize = 1024 * 1024;
/// gzip: magic, deflate, `FEXTRA` set.
const GZIP_MAGIC: [u8; 3] = [0x1f, 0x8b, 0x08];
const FEXTRA: u8 = 0x04;
/// The extra subfield that holds a member's length (little-endian `u32`, the whole member).
pub const LENGTH_FIELD: [u8; 2] = *b"LB";

/// Decompressed bytes, or why there are none.
type Output = io::Result<Vec<u8>>;

/// Buffers handed back for reuse, so that units do not cost fresh pages (large blocks are
/// separate mappings, [`crate::memory`]): compressed units from the workers to the splitter,
/// decompressed ones from the reader to the workers.
#[derive(Default)]
struct Spares {
    raw: Mutex<Vec<Vec<u8>>>,
    out: Mutex<Vec<Vec<u8>>>,
}

impl Spares {
    /// More than can be in flight at once (the channels bound that, to `2 × threads + 3`
    /// units), so that no buffer is freed and allocated again; the spares are only buffers
    /// that were in flight, so this adds no memory.
    const KEEP: usize = 2 * MAX_THREADS + 4;

    fn take(pool: &Mutex<Vec<Vec<u8>>>) -> Vec<u8> {
        pool.lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default()
    }

    fn give(pool: &Mutex<Vec<Vec<u8>>>, mut buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        buf.clear();
        if let Ok(mut p) = pool.lock()
            && p.len() < Self::KEEP
        {
            p.push(buf);
        }
    }
}
/// A unit to decompress and where its output goes.
type Job = (Unit, SyncSender<Output>);

/// One independent unit of the stream.
enum Unit {
    /// A whole gzip member whose trailer states `size` bytes of content.
    Gzip { member: Vec<u8>, size: usize },
    /// A whole zstd frame stating `size` bytes of content.
    Zstd { frame: Vec<u8>, size: usize },
}

/// Decompression workers for this machine: one core is left to the reader (extraction) and the
/// splitting thread (download and hash), which are busy too.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .saturating_sub(1)
        .clamp(1, MAX_THREADS)
}

/// Runs `body` with a reader of `raw` decompressed as `kind`, decompressing on `threads`
/// workers beside it. `raw` is read to its end (or to the first error) before this returns.
pub fn decode<R: Read + Send, T>(
    kind: CompressionKind,
    raw: R,
    threads: usize,
    body: impl FnOnce(&mut dyn Read) -> T,
) -> T {
    if kind == CompressionKind::None {
        return body(&mut BufReader::with_capacity(256 * 1024, raw));
    }
    let threads = threads.max(1);
    let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Job>(threads);
    let (order_tx, order_rx) = mpsc::sync_channel::<Receiver<Output>>(threads + 2);
    let jobs_rx = Mutex::new(jobs_rx);
    let spares = Spares::default();
    std::thread::scope(|scope| {
        let spares = &spares;
        for _ in 0..threads {
            let jobs_rx = &jobs_rx;
            std::thread::Builder::new()
                .name("lifeboat-decompress".into())
                .spawn_scoped(scope, move || worker(jobs_rx, spares))
                .expect("spawning a decompression thread");
        }
        std::thread::Builder::new()
            .name("lifeboat-split".into())
            .spawn_scoped(scope, move || {
                let mut split = Splitter {
                    input: BufReader::with_capacity(256 * 1024, raw),
                    jobs: jobs_tx,
                    order: order_tx,
                    spares,
                };
                let outcome = match kind {
                    CompressionKind::Gzip => split.gzip(),
                    _ => split.zstd(),
                };
                if let Err(e) = outcome {
                    ready(&split.order, Err(e));
                }
            })
            .expect("spawning the splitting thread");
        let mut reader = Ordered {
            order: order_rx,
            current: Vec::new(),
            pos: 0,
            spares,
        };
        // Dropping the reader (with `body` done) stops the splitter and, with it, the workers.
        body(&mut reader)
    })
}

/// Reads units from the raw stream and hands them out in order.
struct Splitter<'s, R> {
    input: BufReader<R>,
    jobs: SyncSender<Job>,
    order: SyncSender<Receiver<Output>>,
    spares: &'s Spares,
}

/// The reader went away: stop quietly.
fn gone<T>(_: T) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the reader stopped")
}

/// Queues a result that needs no worker; false if the reader is gone.
fn ready(order: &SyncSender<Receiver<Output>>, out: Output) -> bool {
    let (tx, rx) = mpsc::sync_channel(1);
    let _ = tx.send(out);
    order.send(rx).is_ok()
}

impl<R: Read> Splitter<'_, R> {
    fn dispatch(&self, unit: Unit) -> io::Result<()> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.order.send(rx).map_err(gone)?;
        self.jobs.send((unit, tx)).map_err(gone)
    }

    /// Reads up to `n` more bytes onto `buf`; the count read (short only at the end).
    fn take(&mut self, buf: &mut Vec<u8>, n: usize) -> io::Result<usize> {
        let start = buf.len();
        (&mut self.input).take(n as u64).read_to_end(buf)?;
        Ok(buf.len() - start)
    }

    fn gzip(&mut self) -> io::Result<()> {
        loop {
            if self.input.fill_buf()?.is_empty() {
                return Ok(());
            }
            let mut member = Spares::take(&self.spares.raw);
            // Magic, flags, time, XFL, OS, then (with FEXTRA) the extra field's length.
            if self.take(&mut member, 12)? < 12
                || member[..3] != GZIP_MAGIC
                || member[3] & FEXTRA == 0
            {
                return self.in_sequence(member, CompressionKind::Gzip);
            }
            let xlen = usize::from(u16::from_le_bytes([member[10], member[11]]));
            if self.take(&mut member, xlen)? < xlen {
                return self.in_sequence(member, CompressionKind::Gzip);
            }
            let length = member_length(&member[12..]);
            let Some(length) = length.filter(|l| (member.len() + 8..=MAX_UNIT).contains(l)) else {
                return self.in_sequence(member, CompressionKind::Gzip);
            };
            let rest = length - member.len();
            if self.take(&mut member, rest)? < rest {
                return self.in_sequence(member, CompressionKind::Gzip);
            }
            let trailer: [u8; 4] = member[length - 4..].try_into().expect("four bytes");
            let size = u32::from_le_bytes(trailer) as usize;
            if size > MAX_UNIT {
                return self.in_sequence(member, CompressionKind::Gzip);
            }
            self.dispatch(Unit::Gzip { member, size })?;
        }
    }

    fn zstd(&mut self) -> io::Result<()> {
        let mut frame = Vec::new();
        loop {
            if frame.is_empty() && self.input.fill_buf()?.is_empty() {
                return Ok(());
            }
            match zstd::zstd_safe::find_frame_compressed_size(&frame) {
                Ok(n) if n <= frame.len() && n > 0 => {
                    let rest = frame.split_off(n);
                    let size = zstd::zstd_safe::get_frame_content_size(&frame)
                        .ok()
                        .flatten()
                        .and_then(|s| usize::try_from(s).ok());
                    match size {
                        Some(size) if size <= MAX_UNIT => {
                            self.dispatch(Unit::Zstd { frame, size })?;
                            frame = Spares::take(&self.spares.raw);
                            frame.extend_from_slice(&rest);
                        }
                        // No stated size (skippable frames, other writers) or too large.
                        _ => {
                            frame.extend_from_slice(&rest);
                            return self.in_sequence(frame, CompressionKind::Zstd);
                        }
                    }
                }
                _ if frame.len() > MAX_UNIT => {
                    return self.in_sequence(frame, CompressionKind::Zstd);
                }
                _ => {
                    if self.take(&mut frame, 256 * 1024)? == 0 {
                        // The stream ends inside a frame: the decoder names the damage.
                        return self.in_sequence(frame, CompressionKind::Zstd);
                    }
                }
            }
        }
    }

    /// Decompresses `head` and the rest of the stream here, one chunk after another.
    fn in_sequence(&mut self, head: Vec<u8>, kind: CompressionKind) -> io::Result<()> {
        let rest = io::Cursor::new(head).chain(&mut self.input);
        let mut decoder = crate::compress::decompressor(kind, rest)?;
        loop {
            let mut chunk = Vec::with_capacity(CHUNK);
            let n = (&mut decoder).take(CHUNK as u64).read_to_end(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            if !ready(&self.order, Ok(chunk)) {
                return Ok(());
            }
        }
    }
}

/// The member length in a gzip extra field, if it holds lifeboat's subfield.
fn member_length(mut extra: &[u8]) -> Option<usize> {
    while extra.len() >= 4 {
        let id = [extra[0], extra[1]];
        let len = usize::from(u16::from_le_bytes([extra[2], extra[3]]));
        let data = extra.get(4..4 + len)?;
        if id == LENGTH_FIELD && len == 4 {
            return usize::try_from(u32::from_le_bytes(data.try_into().ok()?)).ok();
        }
        extra = &extra[4 + len..];
    }
    None
}

fn worker(jobs: &Mutex<Receiver<Job>>, spares: &Spares) {
    let mut zstd = None;
    loop {
        // Hold the lock only to take a job.
        let job = jobs.lock().map(|rx| rx.recv());
        let Ok(Ok((unit, reply))) = job else { return };
        let mut out = Spares::take(&spares.out);
        let (outcome, input) = match unit {
            Unit::Gzip { member, size } => (gunzip(&member, size, &mut out), member),
            Unit::Zstd { frame, size } => {
                let d = match &mut zstd {
                    Some(d) => Ok(d),
                    None => zstd::bulk::Decompressor::new().map(|d| zstd.insert(d)),
                };
                let outcome = d.and_then(|d| {
                    out.reserve(size);
                    d.decompress_to_buffer(&frame, &mut out)
                });
                let outcome = outcome.and_then(|n| {
                    if n == size {
                        Ok(())
                    } else {
                        Err(damaged("a zstd frame holds less than its header states"))
                    }
                });
                (outcome, frame)
            }
        };
        Spares::give(&spares.raw, input);
        let _ = reply.send(outcome.map(|()| out));
    }
}

/// One whole member into `out`: its content must be exactly what the trailer states, and nothing
/// may follow it within the member's stated length.
fn gunzip(member: &[u8], size: usize, out: &mut Vec<u8>) -> io::Result<()> {
    let mut decoder = flate2::bufread::GzDecoder::new(member);
    out.reserve(size);
    (&mut decoder).take(size as u64 + 1).read_to_end(out)?;
    if out.len() != size || !decoder.into_inner().is_empty() {
        return Err(damaged(
            "a gzip member does not match the length in its header",
        ));
    }
    Ok(())
}

fn damaged(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// The decompressed stream, unit after unit, in order.
struct Ordered<'s> {
    order: Receiver<Receiver<Output>>,
    current: Vec<u8>,
    pos: usize,
    spares: &'s Spares,
}

impl Read for Ordered<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            let Ok(next) = self.order.recv() else {
                return Ok(0); // the splitter is done: the end of the stream
            };
            let next = next
                .recv()
                .map_err(|_| io::Error::other("a decompression thread stopped"))??;
            Spares::give(&self.spares.out, std::mem::replace(&mut self.current, next));
            self.pos = 0;
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::{Pool, compressor};
    use std::io::Write;

    fn sample(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ ((i / 4096) as u8))
            .collect()
    }

    fn ours(kind: CompressionKind, data: &[u8]) -> Vec<u8> {
        let pool = Pool {
            threads: 2,
            block_size: 256 * 1024,
            in_flight: 4,
        };
        let mut c = compressor(kind, 3, pool, Vec::new()).unwrap();
        c.write_all(data).unwrap();
        c.finish().unwrap()
    }

    fn read_all(kind: CompressionKind, raw: &[u8], threads: usize) -> io::Result<Vec<u8>> {
        decode(kind, raw, threads, |r| {
            let mut out = Vec::new();
            r.read_to_end(&mut out).map(|_| out)
        })
    }

    #[test]
    fn lifeboat_units_are_cut_and_read_back_in_order() {
        let data = sample(3 * 1024 * 1024 + 12345);
        for kind in [CompressionKind::Gzip, CompressionKind::Zstd] {
            let raw = ours(kind, &data);
            for threads in [1, 3] {
                assert!(read_all(kind, &raw, threads).unwrap() == data, "{kind:?}");
            }
        }
    }

    #[test]
    fn streams_from_other_writers_are_read_in_sequence() {
        let data = sample(700_000);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        gz.write_all(&data).unwrap();
        let mut gz = gz.finish().unwrap();
        // Two members, the second from lifeboat: cut or not, the content follows in order.
        gz.extend(ours(CompressionKind::Gzip, b"tail"));
        let mut want = data.clone();
        want.extend_from_slice(b"tail");
        assert!(read_all(CompressionKind::Gzip, &gz, 2).unwrap() == want);
        let zst = zstd::stream::encode_all(&data[..], 3).unwrap();
        assert!(read_all(CompressionKind::Zstd, &zst, 2).unwrap() == data);
    }

    #[test]
    fn damage_is_an_error_not_short_output() {
        let data = sample(1024 * 1024);
        for kind in [CompressionKind::Gzip, CompressionKind::Zstd] {
            let raw = ours(kind, &data);
            // Truncated.
            assert!(
                read_all(kind, &raw[..raw.len() - 100], 2).is_err(),
                "{kind:?}"
            );
            // A flipped byte in the middle of a unit.
            let mut bad = raw.clone();
            let mid = bad.len() / 3;
            bad[mid] ^= 0x55;
            assert!(read_all(kind, &bad, 2).is_err(), "{kind:?}");
            // Garbage after the stream.
            let mut trailing = raw.clone();
            trailing.extend_from_slice(b"garbage!");
            assert!(read_all(kind, &trailing, 2).is_err(), "{kind:?}");
        }
    }

    #[test]
    fn a_member_length_that_lies_is_refused() {
        // Three members; the first two hold 256 KiB each, so their trailers state the same size.
        let raw = ours(CompressionKind::Gzip, &sample(600_000));
        let length = |at: usize| u32::from_le_bytes(raw[at + 16..at + 20].try_into().unwrap());
        let (first, second) = (length(0), length(length(0) as usize));
        // The first member claims the second as well: its stated size matches, its content
        // does not end where it says.
        let mut bad = raw.clone();
        bad[16..20].copy_from_slice(&(first + second).to_le_bytes());
        let e = read_all(CompressionKind::Gzip, &bad, 2).unwrap_err();
        assert!(e.to_string().contains("length in its header"), "{e}");
        // One that cuts the member short.
        let mut short = raw.clone();
        short[16..20].copy_from_slice(&(first - 2).to_le_bytes());
        assert!(read_all(CompressionKind::Gzip, &short, 2).is_err());
    }
}
