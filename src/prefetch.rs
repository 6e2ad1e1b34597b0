//! Read-ahead for the archive stage: while the archive thread reads files one after another, a
//! second walk of the same paths, in the same order, runs a bounded distance ahead of it and
//! asks the kernel to start reading the next files (`posix_fadvise(POSIX_FADV_WILLNEED)`), a few
//! at a time.
//!
//! On a cold page cache (data not read since boot, an EBS volume restored from a snapshot), a
//! tree of small files costs one disk round trip per file, and a single reader waits for each in
//! turn. Hints from [`THREADS`] threads keep several reads in flight, so the archive thread finds
//! most files already in memory: on this bench, reading the Python standard library (46,267
//! files, 600 MB) after evicting it went from 6.1 s to 1.4 s (`scripts/bench.sh`, section COLD).
//!
//! It changes nothing the archive does or records: the archive thread still opens, stats and
//! reads every file itself, so a file that changes, vanishes or is swapped for a link is handled
//! exactly as without read-ahead. What it holds is page cache, which the kernel reclaims, not
//! process memory: at most [`WINDOW`] entries ahead, and of each file only its first
//! [`HEAD`] bytes (the archive thread's own sequential reads bring in the rest of a large one).
//! Its threads are never waited for: a hint stuck on a hung mount does not hold the backup, and
//! they end at the next entry once the archive is done. `LIFEBOAT_READ_AHEAD=0` turns it off (for
//! benchmarks).

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use globset::GlobSet;

use crate::archive::{ArchiveOptions, Walked, walk};

/// Threads issuing hints. Each hint waits for the file's inode (open) but not for its data.
pub const THREADS: usize = 4;
/// Entries the read-ahead walk may be ahead of the archive.
pub const WINDOW: u64 = 512;
/// Bytes of each file hinted.
pub const HEAD: u64 = 1 << 20;
/// How long the walk pauses when it is a whole window ahead.
const PAUSE: Duration = Duration::from_micros(200);

/// Whether read-ahead is on: unless `LIFEBOAT_READ_AHEAD=0`.
pub fn enabled() -> bool {
    std::env::var_os("LIFEBOAT_READ_AHEAD").is_none_or(|v| v != "0")
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

/// Starts reading ahead of an archive of `opts` that counts each entry it has visited in
/// `progress`, hinting with [`hint`].
pub fn start(opts: &ArchiveOptions<'_>, progress: Arc<AtomicU64>) -> ReadAhead {
    start_with(opts, progress, hint)
}

/// [`start`] with another hint (tests record the paths).
pub fn start_with(
    opts: &ArchiveOptions<'_>,
    progress: Arc<AtomicU64>,
    hint: fn(&Path),
) -> ReadAhead {
    let done = Arc::new(AtomicBool::new(false));
    let tree = Tree {
        paths: opts.paths.to_vec(),
        exclude: opts.exclude.clone(),
        one_file_system: opts.one_file_system,
    };
    let (tx, rx) = mpsc::sync_channel::<PathBuf>(THREADS);
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..THREADS {
        let rx = Arc::clone(&rx);
        let spawned = std::thread::Builder::new()
            .name(format!("lifeboat-readahead-{i}"))
            .spawn(move || {
                // Hold the lock only to take a path.
                while let Ok(path) = rx.lock().map(|r| r.recv()).unwrap_or(Err(mpsc::RecvError)) {
                    hint(&path);
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
                visited += 1;
                while visited > progress.load(Ordering::Relaxed) + WINDOW {
                    if stop.load(Ordering::Relaxed) {
                        return Err(crate::archive::ArchiveError::Abandoned);
                    }
                    std::thread::park_timeout(PAUSE);
                }
                if let Walked::File(path) = walked
                    && tx.send(path).is_err()
                {
                    return Err(crate::archive::ArchiveError::Abandoned);
                }
                Ok(())
            });
        });
    if walker.is_err() {
        done.store(true, Ordering::Relaxed);
    }
    ReadAhead { done }
}

/// Asks the kernel to start reading the first [`HEAD`] bytes of `path` (never following a
/// symlink, never blocking on a FIFO swapped in); errors are ignored: the archive thread meets
/// them itself.
pub fn hint(path: &Path) {
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(
            (rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::NOCTTY
                | rustix::fs::OFlags::NONBLOCK)
                .bits() as i32,
        )
        .open(path)
    else {
        return;
    };
    let Ok(meta) = file.metadata() else { return };
    if !meta.is_file() || meta.len() == 0 {
        return;
    }
    let len = std::num::NonZeroU64::new(meta.len().min(HEAD));
    let _ = rustix::fs::fadvise(&file, 0, len, rustix::fs::Advice::WillNeed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    static SEEN: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    static TOO_FAR: AtomicUsize = AtomicUsize::new(0);
    static PROGRESS: Mutex<Option<Arc<AtomicU64>>> = Mutex::new(None);

    fn record(path: &Path) {
        let mut seen = SEEN.lock().unwrap();
        seen.push(path.to_owned());
        // Each file is one entry; the directories before it are a few more.
        let progress = PROGRESS
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .load(Ordering::Relaxed);
        if seen.len() as u64 > progress + WINDOW {
            TOO_FAR.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The paths hinted so far, sorted.
    fn hinted() -> Vec<PathBuf> {
        let mut seen = SEEN.lock().unwrap().clone();
        seen.sort();
        seen
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn read_ahead_follows_archive_order_within_its_window() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        for d in 0..4 {
            for f in 0..400 {
                let p = dir.path().join(format!("d{d}/f{f:04}"));
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, b"x").unwrap();
                files.push(p);
            }
        }
        files.sort();
        let progress = Arc::new(AtomicU64::new(0));
        *PROGRESS.lock().unwrap() = Some(Arc::clone(&progress));
        let paths = [dir.path().to_owned()];
        let exclude = GlobSet::empty();
        let opts = ArchiveOptions {
            paths: &paths,
            exclude: &exclude,
            one_file_system: true,
        };
        let ahead = start_with(&opts, Arc::clone(&progress), record);
        // With the archive at its start, the walk stops a window ahead: the root, d0, d1 and
        // 509 files.
        wait_for("a window of hints", || {
            SEEN.lock().unwrap().len() as u64 == WINDOW - 3
        });
        // The archive's next files, not any others (hints of consecutive files may race).
        assert_eq!(hinted(), files[..WINDOW as usize - 3]);
        // As the archive moves, so does the read-ahead, in the archive's order.
        progress.store(1000, Ordering::Relaxed);
        // 1,512 entries: the root, d0 to d3 and 1,507 files.
        wait_for("the next hints", || {
            SEEN.lock().unwrap().len() as u64 == 1000 + WINDOW - 5
        });
        assert_eq!(hinted(), files[..1000 + WINDOW as usize - 5]);
        progress.store(u64::MAX / 2, Ordering::Relaxed);
        wait_for("every file", || SEEN.lock().unwrap().len() == files.len());
        assert_eq!(hinted(), files);
        assert_eq!(TOO_FAR.load(Ordering::Relaxed), 0);
        drop(ahead);
    }
}
