//! Read-ahead for the archive stage: while the archive thread reads files one after another, a
//! second walk of the same paths, in the same order, runs a bounded distance ahead of it and
//! asks the kernel to start reading the next files (`posix_fadvise(POSIX_FADV_WILLNEED)`), a few
//! at a time, as long as files come from the disk.
//!
//! On a cold page cache (data not read since boot, an EBS volume restored from a snapshot), a
//! tree of small files costs one disk round trip per file, and a single reader waits for each in
//! turn. Hints from [`THREADS`] threads keep several reads in flight, so the archive thread finds
//! most files already in memory (`scripts/bench.sh`, section COLD, has the figures).
//!
//! On a warm cache hints only cost: a second walk, and an open and a few system calls per file.
//! So a [`Gate`] lets the walk go only while files come from the disk. The archive thread reads
//! with `RWF_NOWAIT` first ([`read_cached`]) and tells the gate when data was not in memory; the
//! hint threads look the same way before hinting. The walk hints while a miss was seen within
//! [`COLD_SPAN`] entries, and after that many files in memory stops where it is until the next
//! miss, then walks past what the archive has read meanwhile. A warm tree costs a `preadv2` per
//! read instead of a `pread`, and a thread that wakes every 2 ms.
//!
//! It changes nothing the archive does or records: the archive thread still opens, stats and
//! reads every file itself, so a file that changes, vanishes or is swapped for a link is handled
//! exactly as without read-ahead. What it holds is page cache, which the kernel reclaims, not
//! process memory: at most [`WINDOW`] entries ahead, and of each file only its first [`HEAD`]
//! bytes (the archive thread's own sequential reads bring in the rest of a large one). Its
//! threads are never waited for: a hint stuck on a hung mount does not hold the backup, and they
//! end at the next entry once the archive is done. `LIFEBOAT_READ_AHEAD=0` turns it off (for
//! benchmarks).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use globset::GlobSet;

use crate::archive::{ArchiveError, ArchiveOptions, Walked, walk};

/// Threads issuing hints. Each hint waits for the file's inode (open) but not for its data.
pub const THREADS: usize = 4;
/// Entries the read-ahead walk may be ahead of the archive.
pub const WINDOW: u64 = 512;
/// Bytes of each file hinted.
pub const HEAD: u64 = 1 << 20;
/// Entries after the last miss the walk goes on hinting.
pub const COLD_SPAN: u64 = 256;
/// How long the walk pauses when it is a whole window ahead.
const PAUSE: Duration = Duration::from_micros(200);
/// How long it pauses while files come from memory.
const IDLE: Duration = Duration::from_millis(2);

/// Whether read-ahead is on: unless `LIFEBOAT_READ_AHEAD=0`.
pub fn enabled() -> bool {
    std::env::var_os("LIFEBOAT_READ_AHEAD").is_none_or(|v| v != "0")
}

/// What the archive and the hints tell the read-ahead walk: how far the archive is, and where
/// data last had to come from the disk.
#[derive(Debug, Default)]
pub struct Gate {
    /// Entries the archive has visited.
    progress: AtomicU64,
    /// One more than the index of the furthest entry whose data was not in memory (0: none).
    last_miss: AtomicU64,
}

impl Gate {
    /// The archive moves to its next entry.
    pub fn advance(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// The archive had to wait for the disk at its current entry.
    pub fn missed(&self) {
        self.miss_at(self.progress().saturating_sub(1));
    }

    fn miss_at(&self, index: u64) {
        self.last_miss.fetch_max(index + 1, Ordering::Relaxed);
    }

    fn progress(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }

    /// Whether entry `index` is within [`COLD_SPAN`] of the last miss.
    fn cold_near(&self, index: u64) -> bool {
        let last = self.last_miss.load(Ordering::Relaxed);
        last > 0 && index < last + COLD_SPAN
    }
}

/// Reads into `buf` at `offset` only what is in memory (`preadv2` with `RWF_NOWAIT`): `None`
/// when the data is not (or the file system cannot say), to be read the ordinary way.
pub fn read_cached(file: &std::fs::File, buf: &mut [u8], offset: u64) -> Option<io::Result<usize>> {
    use rustix::io::{Errno, ReadWriteFlags, preadv2};
    match preadv2(
        file,
        &mut [io::IoSliceMut::new(buf)],
        offset,
        ReadWriteFlags::NOWAIT,
    ) {
        Ok(n) => Some(Ok(n)),
        Err(Errno::AGAIN | Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS) => None,
        Err(e) => Some(Err(e.into())),
    }
}

/// A running read-ahead; dropping it stops it (without waiting for its threads).
pub struct ReadAhead {
    done: Arc<AtomicBool>,
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// What the read-ahead walk visits: the archive's paths and exclusions, owned.
struct Tree {
    paths: Vec<PathBuf>,
    exclude: GlobSet,
    one_file_system: bool,
}

/// Starts reading ahead of an archive of `opts` that tells `gate` of each entry and each miss,
/// hinting with [`hint`].
pub fn start(opts: &ArchiveOptions<'_>, gate: Arc<Gate>) -> ReadAhead {
    start_with(opts, gate, hint)
}

/// [`start`] with another hint, which says whether the file was not in memory (tests record
/// the paths).
pub fn start_with(
    opts: &ArchiveOptions<'_>,
    gate: Arc<Gate>,
    hint: fn(&Path) -> bool,
) -> ReadAhead {
    let done = Arc::new(AtomicBool::new(false));
    let tree = Tree {
        paths: opts.paths.to_vec(),
        exclude: opts.exclude.clone(),
        one_file_system: opts.one_file_system,
    };
    let (tx, rx) = mpsc::sync_channel::<(u64, PathBuf)>(THREADS);
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..THREADS {
        let rx = Arc::clone(&rx);
        let gate = Arc::clone(&gate);
        let spawned = std::thread::Builder::new()
            .name(format!("lifeboat-readahead-{i}"))
            .spawn(move || {
                // Hold the lock only to take a path.
                while let Ok((index, path)) =
                    rx.lock().map(|r| r.recv()).unwrap_or(Err(mpsc::RecvError))
                {
                    if hint(&path) {
                        gate.miss_at(index);
                    }
                }
            });
        if spawned.is_err() {
            // No read-ahead is a slower backup, not a failed one.
            return ReadAhead { done };
        }
    }
    let stop = Arc::clone(&done);
    let walker = std::thread::Builder::new()
        .name("lifeboat-readahead".into())
        .spawn(move || {
            let opts = ArchiveOptions {
                paths: &tree.paths,
                exclude: &tree.exclude,
                one_file_system: tree.one_file_system,
            };
            let mut visited = 0u64;
            let _ = walk(&opts, &stop, |walked| {
                let index = visited;
                visited += 1;
                // Wait while files come from memory (without walking on: a warm tree costs no
                // second walk), or while a window ahead. Once files come from the disk, entries
                // the archive has passed are walked past without hints.
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return Err(ArchiveError::Abandoned);
                    }
                    let progress = gate.progress();
                    if !gate.cold_near(index.max(progress)) {
                        std::thread::park_timeout(IDLE);
                    } else if index < progress {
                        return Ok(());
                    } else if index >= progress + WINDOW {
                        std::thread::park_timeout(PAUSE);
                    } else {
                        break;
                    }
                }
                if let Walked::File(path) = walked
                    && tx.send((index, path)).is_err()
                {
                    return Err(ArchiveError::Abandoned);
                }
                Ok(())
            });
        });
    if walker.is_err() {
        done.store(true, Ordering::Relaxed);
    }
    ReadAhead { done }
}

/// Asks the kernel to start reading the first [`HEAD`] bytes of `path` unless its first page is
/// in memory (never following a symlink, never blocking on a FIFO swapped in); says whether it
/// was not. Errors are ignored: the archive thread meets them itself.
pub fn hint(path: &Path) -> bool {
    let Ok(file) = crate::archive::open_walked(path) else {
        return false;
    };
    let Ok(meta) = file.metadata() else {
        return false;
    };
    if !meta.is_file() || meta.len() == 0 || matches!(read_cached(&file, &mut [0], 0), Some(Ok(_)))
    {
        return false;
    }
    let len = std::num::NonZeroU64::new(meta.len().min(HEAD));
    let _ = rustix::fs::fadvise(&file, 0, len, rustix::fs::Advice::WillNeed);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    static COLD: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    static WARM: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    fn cold(path: &Path) -> bool {
        COLD.lock().unwrap().push(path.to_owned());
        true
    }

    fn warm(path: &Path) -> bool {
        WARM.lock().unwrap().push(path.to_owned());
        false
    }

    /// Four directories of 400 files; returns the walk's entries in order (root, d0, its
    /// files, d1, …).
    fn tree(root: &Path) -> Vec<PathBuf> {
        let mut entries = vec![root.to_owned()];
        for d in 0..4 {
            let dir = root.join(format!("d{d}"));
            std::fs::create_dir_all(&dir).unwrap();
            entries.push(dir.clone());
            for f in 0..400 {
                let p = dir.join(format!("f{f:04}"));
                std::fs::write(&p, b"x").unwrap();
                entries.push(p);
            }
        }
        entries
    }

    /// The files among `entries[start..end]` for each `(start, end)`, sorted.
    fn files(entries: &[PathBuf], ranges: &[(usize, usize)]) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = ranges
            .iter()
            .flat_map(|&(start, end)| entries[start..end].iter())
            .filter(|p| p.is_file())
            .cloned()
            .collect();
        out.sort();
        out
    }

    fn hinted(seen: &Mutex<Vec<PathBuf>>) -> Vec<PathBuf> {
        let mut all = seen.lock().unwrap().clone();
        all.sort();
        all
    }

    fn wait_for(what: &str, seen: &Mutex<Vec<PathBuf>>, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.lock().unwrap().len() != count {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    fn start_on(root: &Path, gate: &Arc<Gate>, hint: fn(&Path) -> bool) -> ReadAhead {
        let paths = [root.to_owned()];
        let exclude = GlobSet::empty();
        let opts = ArchiveOptions {
            paths: &paths,
            exclude: &exclude,
            one_file_system: true,
        };
        start_with(&opts, Arc::clone(gate), hint)
    }

    #[test]
    fn on_a_cold_tree_read_ahead_follows_the_archive_within_its_window() {
        let dir = tempfile::tempdir().unwrap();
        let entries = tree(dir.path());
        let gate = Arc::new(Gate::default());
        // The archive's first read missed; every file hinted is found cold.
        gate.missed();
        let _ahead = start_on(dir.path(), &gate, cold);
        // With the archive at its start, the walk stops a window ahead.
        let first = files(&entries, &[(0, WINDOW as usize)]);
        wait_for("a window of hints", &COLD, first.len());
        assert_eq!(hinted(&COLD), first);
        // The archive moves on: entries it passed are not hinted, the next window is.
        for _ in 0..1000 {
            gate.advance();
        }
        // It reads cold files the read-ahead did not reach.
        gate.missed();
        let next = files(
            &entries,
            &[(0, WINDOW as usize), (1000, 1000 + WINDOW as usize)],
        );
        wait_for("the next window", &COLD, next.len());
        assert_eq!(hinted(&COLD), next);
    }

    #[test]
    fn on_a_warm_tree_read_ahead_waits_for_the_archive_to_miss() {
        let dir = tempfile::tempdir().unwrap();
        let entries = tree(dir.path());
        let gate = Arc::new(Gate::default());
        gate.missed();
        let _ahead = start_on(dir.path(), &gate, warm);
        // Files in memory: hints go on for COLD_SPAN entries after the miss, then stop, though
        // the window allows more.
        let span = files(&entries, &[(0, COLD_SPAN as usize + 1)]);
        wait_for("the hints after a miss", &WARM, span.len());
        // The archive passes them and misses again (at entry 299): hints start where it is.
        for _ in 0..300 {
            gate.advance();
        }
        gate.missed();
        let resumed = files(
            &entries,
            &[(0, COLD_SPAN as usize + 1), (300, 300 + COLD_SPAN as usize)],
        );
        wait_for("the hints after the second miss", &WARM, resumed.len());
        assert_eq!(hinted(&WARM), resumed);
    }

    #[test]
    fn reads_of_files_in_memory_do_not_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"in the page cache").unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mut buf = [0u8; 64];
        // Just written: in memory (or the file system cannot say, and it is read the usual way).
        match read_cached(&file, &mut buf, 0) {
            Some(Ok(n)) => assert_eq!(&buf[..n], b"in the page cache"),
            Some(Err(e)) => panic!("{e}"),
            None => {}
        }
    }
}
