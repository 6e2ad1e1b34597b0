//! The archive stage: walks the configured paths and writes a tar stream into any [`Write`].
//!
//! It knows nothing of compression, S3 or AWS. It never follows symlinks (they are stored as
//! links), stores hard links once, skips sockets, FIFOs and devices with a reason, and archives a
//! file that changes while it is read at the size its header declared (cut or zero-padded, like
//! GNU tar), recording it as changed. A file that cannot be opened is skipped; neither aborts the
//! archive. Only a failure of the output writer does.
//!
//! A file with holes (at least [`SPARSE_MIN_HOLES`] of them, found with `SEEK_DATA`/`SEEK_HOLE`) is
//! stored as a GNU sparse entry: only its data regions are read and archived, with a map GNU tar,
//! bsdtar and `lifeboat restore` use to recreate the holes.
//!
//! A read that never returns (a hung NFS or FUSE mount) must not cost the backup: the stream lives
//! in a [`Shared`], and when the deadline has come and the walking thread is stuck in the file
//! system, [`Shared::abandon`] closes a valid archive from another thread (the file being read is
//! completed with zeros and recorded) while the stuck thread is left behind.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use globset::GlobSet;
use serde::{Deserialize, Serialize};

/// Holes smaller than this in total are archived as zeros: a plain entry is simpler for readers.
pub const SPARSE_MIN_HOLES: u64 = 1 << 20;

/// tar's block size: sparse data regions start on it.
const BLOCK: u64 = 512;
/// File data is read (and written into the stream) this much at a time.
const READ_SIZE: usize = 256 * 1024;

/// What to archive.
#[derive(Debug, Clone, Copy)]
pub struct ArchiveOptions<'a> {
    /// Absolute files or directories, in order.
    pub paths: &'a [PathBuf],
    /// Patterns matched against the full path and against the file name.
    pub exclude: &'a GlobSet,
    /// Stay on the file system of each configured path.
    pub one_file_system: bool,
}

/// Live counters, read by the progress display while the archive is written.
#[derive(Debug, Default)]
pub struct Counters {
    /// File bytes read so far.
    pub bytes_read: AtomicU64,
    /// Entries written so far.
    pub entries: AtomicU64,
}

/// The kind of an archived entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link, stored as a link.
    Symlink,
    /// A second name of a file already archived.
    Hardlink,
}

/// A path as it appears in a manifest: UTF-8 text, plus the raw bytes in hex when the name is not
/// valid UTF-8 (so nothing is lost and verification can compare exactly).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RecordedPath {
    /// The path (lossy when not UTF-8).
    pub path: String,
    /// The raw bytes in hex, only for names that are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_hex: Option<String>,
}

impl RecordedPath {
    /// Records `path`.
    pub fn new(path: &Path) -> Self {
        match path.to_str() {
            Some(s) => Self {
                path: s.to_owned(),
                path_hex: None,
            },
            None => Self {
                path: path.to_string_lossy().into_owned(),
                path_hex: Some(hex::encode(path.as_os_str().as_bytes())),
            },
        }
    }

    /// The exact bytes of the path.
    pub fn bytes(&self) -> Vec<u8> {
        self.path_hex
            .as_deref()
            .and_then(|h| hex::decode(h).ok())
            .unwrap_or_else(|| self.path.as_bytes().to_vec())
    }
}

/// One archived entry, as listed in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Absolute path on the instance.
    #[serde(flatten)]
    pub path: RecordedPath,
    /// What it is.
    pub kind: EntryKind,
    /// Bytes stored for it (the size its header declares).
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
}

/// A path that was not archived, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipRecord {
    /// Absolute path on the instance.
    #[serde(flatten)]
    pub path: RecordedPath,
    /// Why it was skipped.
    pub reason: String,
}

/// A file archived while it changed: stored at its declared size, cut or zero-padded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    /// Absolute path on the instance.
    #[serde(flatten)]
    pub path: RecordedPath,
    /// The size its header declares.
    pub declared_size: u64,
    /// What changed.
    pub reason: String,
}

/// What the archive holds and what it left out.
#[derive(Debug, Default, Clone)]
pub struct ArchiveReport {
    /// Every archived entry, in archive order.
    pub files: Vec<FileRecord>,
    /// Paths left out, with reasons.
    pub skipped: Vec<SkipRecord>,
    /// Files that changed while read.
    pub changed: Vec<ChangeRecord>,
    /// File bytes read.
    pub bytes_read: u64,
    /// The walk was stopped before the end (deadline or cancellation): the archive is valid but
    /// partial.
    pub stopped_early: bool,
}

impl ArchiveReport {
    /// Regular files archived (hard links not counted twice).
    pub fn file_count(&self) -> usize {
        self.files
            .iter()
            .filter(|f| f.kind == EntryKind::File)
            .count()
    }
}

/// What the walk would archive, without reading any file (for `--dry-run`).
#[derive(Debug, Default, Clone)]
pub struct Plan {
    /// Regular files.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Extra names of hard-linked files.
    pub hardlinks: u64,
    /// Sum of regular file sizes.
    pub bytes: u64,
    /// Paths that would be skipped.
    pub skipped: Vec<SkipRecord>,
}

/// Why the archive could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Writing the entry for `path` to the output failed.
    #[error("writing {path} to the archive stream: {source}")]
    Write {
        /// The entry being written.
        path: String,
        /// The output's error.
        source: io::Error,
    },
    /// Writing the end-of-archive marker failed.
    #[error("closing the archive stream: {source}")]
    Finish {
        /// The output's error.
        source: io::Error,
    },
    /// The archive was closed without this thread ([`Shared::abandon`]).
    #[error(
        "the archive was closed without the walking thread (a file-system call did not return)"
    )]
    Abandoned,
}

/// One step of the walk.
pub(crate) enum Walked {
    /// A regular file, not stat'ed yet: the archiver stats the open file instead (one syscall
    /// fewer per file, and the metadata is that of the file actually read).
    File(PathBuf),
    /// Anything else, with its `lstat` metadata.
    Entry(PathBuf, Metadata),
    /// A path that could not be read, and why.
    Unreadable(PathBuf, String),
}

/// Walks `opts.paths` in order, pruning excluded paths, never following symlinks; calls `visit`
/// for every entry or unreadable path. Returns `false` if `stop` ended the walk early.
pub(crate) fn walk(
    opts: &ArchiveOptions<'_>,
    stop: &AtomicBool,
    mut visit: impl FnMut(Walked) -> Result<(), ArchiveError>,
) -> Result<bool, ArchiveError> {
    let excluded = |p: &Path| {
        opts.exclude.is_match(p) || p.file_name().is_some_and(|n| opts.exclude.is_match(n))
    };
    // A configured path inside another is archived once, as its own path: the enclosing walk
    // leaves it out, so it is neither archived twice nor missed when it is another file system
    // (`one_file_system`).
    let nested: std::collections::HashSet<&Path> = opts
        .paths
        .iter()
        .filter(|p| opts.paths.iter().any(|o| o != *p && p.starts_with(o)))
        .map(PathBuf::as_path)
        .collect();
    for (i, root) in opts.paths.iter().enumerate() {
        if opts.paths[..i].contains(root) {
            continue;
        }
        let mut it = walkdir::WalkDir::new(root)
            .follow_links(false)
            .same_file_system(opts.one_file_system)
            .sort_by_file_name()
            .into_iter();
        // walkdir does not enter a directory on another file system (`one_file_system`), and
        // skip_current_dir after one would skip its parent instead: call it only for directories
        // walkdir entered.
        let root_dev = std::fs::metadata(root).map(|m| m.dev()).ok();
        let entered = |entry: &walkdir::DirEntry| {
            entry.file_type().is_dir()
                && (!opts.one_file_system
                    || entry.depth() == 0
                    || entry.metadata().ok().map(|m| m.dev()) == root_dev)
        };
        while let Some(next) = it.next() {
            if stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            match next {
                Err(e) => {
                    let path = e.path().map(Path::to_owned).unwrap_or_else(|| root.clone());
                    let reason = match e.io_error() {
                        Some(io) if io.kind() == io::ErrorKind::NotFound => "not found".into(),
                        Some(io) => io.to_string(),
                        None => e.to_string(),
                    };
                    visit(Walked::Unreadable(path, reason))?;
                }
                Ok(entry) => {
                    let nested_root = entry.depth() > 0 && nested.contains(entry.path());
                    if nested_root || excluded(entry.path()) {
                        if entered(&entry) {
                            it.skip_current_dir();
                        }
                        continue;
                    }
                    if entry.file_type().is_file() && entry.depth() > 0 {
                        visit(Walked::File(entry.into_path()))?;
                        continue;
                    }
                    match entry.metadata() {
                        Ok(meta) => visit(Walked::Entry(entry.into_path(), meta))?,
                        Err(e) => visit(Walked::Unreadable(entry.into_path(), e.to_string()))?,
                    }
                }
            }
        }
    }
    Ok(true)
}

/// Why a special file is not archived, or `None` for files, directories and symlinks.
fn special_reason(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_socket() {
        Some("socket")
    } else if t.is_fifo() {
        Some("fifo")
    } else if t.is_char_device() {
        Some("character device")
    } else if t.is_block_device() {
        Some("block device")
    } else {
        None
    }
}

/// Counts what an archive of `opts` would hold, reading metadata only.
pub fn plan(opts: &ArchiveOptions<'_>) -> Plan {
    let mut plan = Plan::default();
    let mut seen = HashMap::new();
    let never = AtomicBool::new(false);
    let result = walk(opts, &never, |walked| {
        let walked = match walked {
            Walked::File(path) => match std::fs::symlink_metadata(&path) {
                Ok(meta) => Walked::Entry(path, meta),
                Err(e) => Walked::Unreadable(path, e.to_string()),
            },
            other => other,
        };
        match walked {
            Walked::Unreadable(path, reason) => plan.skipped.push(SkipRecord {
                path: RecordedPath::new(&path),
                reason,
            }),
            Walked::File(_) => unreachable!("stat'ed above"),
            Walked::Entry(path, meta) => {
                if let Some(reason) = special_reason(&meta) {
                    plan.skipped.push(SkipRecord {
                        path: RecordedPath::new(&path),
                        reason: reason.into(),
                    });
                } else if meta.is_dir() {
                    plan.dirs += 1;
                } else if meta.file_type().is_symlink() {
                    plan.symlinks += 1;
                } else if meta.nlink() > 1 && seen.insert((meta.dev(), meta.ino()), ()).is_some() {
                    plan.hardlinks += 1;
                } else {
                    plan.files += 1;
                    // What will be read: a sparse file's allocated blocks, not its holes.
                    let allocated = meta.blocks().saturating_mul(512);
                    plan.bytes += if allocated + SPARSE_MIN_HOLES <= meta.len() {
                        allocated
                    } else {
                        meta.len()
                    };
                }
            }
        }
        Ok(())
    });
    debug_assert!(result.is_ok(), "planning never fails");
    plan
}

/// The name of `path` inside the archive: relative, like GNU tar (`/var/log` → `var/log`).
/// `None` for the root directory itself.
pub fn archive_name(path: &Path) -> Option<PathBuf> {
    let rel = path.strip_prefix("/").unwrap_or(path);
    (!rel.as_os_str().is_empty()).then(|| rel.to_owned())
}

/// Where the tar stream goes: a writer that can also take a long run of zeros, which a
/// compressing sink may store far more cheaply than by writing them (the rest of a huge file cut
/// at a deadline). The default writes them.
pub trait TarSink: Write {
    /// Writes `n` zero bytes.
    fn write_zeros(&mut self, n: u64) -> io::Result<()> {
        crate::zeros::write_zeros(self, n)
    }
}

impl TarSink for Vec<u8> {}

/// The archive stream and its report, shared between the thread that walks and reads and whoever
/// must close the archive without it ([`Shared::abandon`]).
pub struct Shared<W> {
    state: Mutex<SharedState<W>>,
}

struct SharedState<W> {
    /// The sink; taken by whoever closes the archive.
    sink: Option<W>,
    /// Bytes written into the sink.
    written: u64,
    /// The file being archived: its path, declared size, and once its data began, the stream
    /// offset its (padded) data must reach.
    current: Option<(PathBuf, u64, Option<u64>)>,
    report: ArchiveReport,
}

/// The end-of-archive marker: two zero blocks.
const END_OF_ARCHIVE: u64 = 2 * BLOCK;

impl<W: TarSink> Shared<W> {
    /// A stream into `sink`.
    pub fn new(sink: W) -> Self {
        Self {
            state: Mutex::new(SharedState {
                sink: Some(sink),
                written: 0,
                current: None,
                report: ArchiveReport::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SharedState<W>> {
        // A panic while holding the lock leaves consistent enough state for closing.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Closes the archive as it stands when the walking thread is stuck in the file system: the
    /// entry being read is completed with zeros (and recorded as cut), the end-of-archive marker
    /// is written, and the sink and report are returned. `None` when the walking thread is inside
    /// a write (it is not stuck in the file system) or has already closed the archive itself.
    pub fn abandon(&self) -> Option<io::Result<(W, ArchiveReport)>> {
        let mut st = match self.state.try_lock() {
            Ok(st) => st,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let mut sink = st.sink.take()?;
        let current = st.current.take();
        let fill = match &current {
            Some((_, _, Some(end))) => end.saturating_sub(st.written),
            _ => 0,
        };
        if let Some((path, declared, began)) = current {
            let record = RecordedPath::new(&path);
            if began.is_some() {
                st.report.changed.push(ChangeRecord {
                    path: record,
                    declared_size: declared,
                    reason: "a read did not return by the deadline (hung file system?); abandoned, rest zero-filled".into(),
                });
            } else {
                st.report.skipped.push(SkipRecord {
                    path: record,
                    reason: "a file-system call did not return by the deadline (hung file system?)"
                        .into(),
                });
            }
        }
        st.report.stopped_early = true;
        let closed = sink
            .write_zeros(fill + END_OF_ARCHIVE)
            .and_then(|()| sink.flush());
        tracing::warn!(fill, "archive closed without the stuck walking thread");
        Some(closed.map(|()| (sink, std::mem::take(&mut st.report))))
    }

    fn begin_file(&self, path: &Path, declared: u64) {
        self.lock().current = Some((path.to_owned(), declared, None));
    }

    fn end_file(&self) {
        self.lock().current = None;
    }

    /// The current entry's data starts now and holds `len` bytes (before padding).
    fn data_begins(&self, len: u64) {
        let mut st = self.lock();
        let end = st.written + len.next_multiple_of(BLOCK);
        if let Some(c) = st.current.as_mut() {
            c.2 = Some(end);
        }
    }

    /// The walking thread's own close: the sink and the report.
    fn finish(&self) -> Result<(W, ArchiveReport), ArchiveError> {
        let mut st = self.lock();
        let sink = st.sink.take().ok_or(ArchiveError::Abandoned)?;
        Ok((sink, std::mem::take(&mut st.report)))
    }
}

/// The walking thread's handle on a [`Shared`] stream.
struct SharedWriter<W>(Arc<Shared<W>>);

fn abandoned() -> io::Error {
    io::Error::other(ArchiveError::Abandoned)
}

impl<W: TarSink> Write for SharedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.0.lock();
        let n = st.sink.as_mut().ok_or_else(abandoned)?.write(buf)?;
        st.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.lock().sink.as_mut().ok_or_else(abandoned)?.flush()
    }
}

impl<W: TarSink> TarSink for SharedWriter<W> {
    fn write_zeros(&mut self, n: u64) -> io::Result<()> {
        let mut st = self.0.lock();
        st.sink.as_mut().ok_or_else(abandoned)?.write_zeros(n)?;
        st.written += n;
        Ok(())
    }
}

/// Writes the tar stream of `opts` into `out`; returns the writer and what was archived.
///
/// Checks `stop` between entries: when set, the archive is closed (valid, with an end marker) and
/// the report says `stopped_early`.
pub fn write_archive<W: TarSink>(
    opts: &ArchiveOptions<'_>,
    out: W,
    counters: &Counters,
    stop: &AtomicBool,
) -> Result<(W, ArchiveReport), ArchiveError> {
    write_shared(opts, &Arc::new(Shared::new(out)), counters, stop)
}

/// [`write_archive`] into a [`Shared`] stream, which another thread may close with
/// [`Shared::abandon`] if this one gets stuck in the file system.
pub fn write_shared<W: TarSink>(
    opts: &ArchiveOptions<'_>,
    shared: &Arc<Shared<W>>,
    counters: &Counters,
    stop: &AtomicBool,
) -> Result<(W, ArchiveReport), ArchiveError> {
    // Read-ahead walks the same entries a bounded distance ahead while files come from the disk
    // (crate::prefetch); the reads below say when they do.
    let gate = Arc::new(crate::prefetch::Gate::default());
    let ahead = crate::prefetch::enabled().then(|| crate::prefetch::start(opts, Arc::clone(&gate)));
    let mut writer = TarWriter {
        gate: ahead.is_some().then_some(&*gate),
        builder: tar::Builder::new(SharedWriter(Arc::clone(shared))),
        shared: Arc::clone(shared),
        buf: vec![0; READ_SIZE],
        first_names: HashMap::new(),
        counters,
        stop,
    };
    let finished = walk(opts, stop, |walked| {
        if let Some(gate) = writer.gate {
            gate.advance();
        }
        writer.add(walked)
    })?;
    writer.builder.finish().map_err(finish_err)?;
    drop(writer);
    let (out, mut report) = shared.finish()?;
    report.stopped_early |= !finished;
    Ok((out, report))
}

/// A failure to close the stream; [`ArchiveError::Abandoned`] when another thread closed it.
fn finish_err(source: io::Error) -> ArchiveError {
    match source
        .get_ref()
        .and_then(|e| e.downcast_ref::<ArchiveError>())
    {
        Some(ArchiveError::Abandoned) => ArchiveError::Abandoned,
        _ => ArchiveError::Finish { source },
    }
}

struct TarWriter<'c, W: TarSink> {
    /// Told of each entry and of each read that had to wait for the disk, when reading ahead.
    gate: Option<&'c crate::prefetch::Gate>,
    builder: tar::Builder<SharedWriter<W>>,
    shared: Arc<Shared<W>>,
    /// File data passes through here, [`READ_SIZE`] at a time.
    buf: Vec<u8>,
    /// (device, inode) of multiply-linked files → the name they were first archived under.
    first_names: HashMap<(u64, u64), PathBuf>,
    counters: &'c Counters,
    stop: &'c AtomicBool,
}

impl<W: TarSink> TarWriter<'_, W> {
    fn skip(&mut self, path: &Path, reason: impl Into<String>) {
        let reason = reason.into();
        tracing::debug!(path = %path.display(), %reason, "skipped");
        self.shared.lock().report.skipped.push(SkipRecord {
            path: RecordedPath::new(path),
            reason,
        });
    }

    fn record(&mut self, path: &Path, kind: EntryKind, size: u64, meta: &Metadata) {
        self.counters.entries.fetch_add(1, Ordering::Relaxed);
        self.shared.lock().report.files.push(FileRecord {
            path: RecordedPath::new(path),
            kind,
            size,
            mode: meta.mode() & 0o7777,
            mtime: meta.mtime(),
        });
    }

    fn add(&mut self, walked: Walked) -> Result<(), ArchiveError> {
        let (path, meta) = match walked {
            Walked::Unreadable(path, reason) => {
                self.skip(&path, reason);
                return Ok(());
            }
            Walked::File(path) => {
                let Some(name) = archive_name(&path) else {
                    return Ok(());
                };
                return self.add_file(&path, name);
            }
            Walked::Entry(path, meta) => (path, meta),
        };
        if let Some(reason) = special_reason(&meta) {
            self.skip(&path, reason);
            return Ok(());
        }
        let Some(name) = archive_name(&path) else {
            return Ok(());
        };
        let write_err = |source| ArchiveError::Write {
            path: path.display().to_string(),
            source,
        };
        let mut header = header_for(&meta);
        if meta.is_dir() {
            let mut dir_name = name.into_os_string();
            dir_name.push("/");
            header.set_size(0);
            self.builder
                .append_data(&mut header, &dir_name, io::empty())
                .map_err(write_err)?;
            self.record(&path, EntryKind::Dir, 0, &meta);
        } else if meta.file_type().is_symlink() {
            let target = match std::fs::read_link(&path) {
                Ok(t) => t,
                Err(e) => {
                    self.skip(&path, format!("cannot read link: {e}"));
                    return Ok(());
                }
            };
            header.set_size(0);
            self.builder
                .append_link(&mut header, &name, &target)
                .map_err(write_err)?;
            self.record(&path, EntryKind::Symlink, 0, &meta);
        } else {
            self.add_file(&path, name)?;
        }
        Ok(())
    }

    fn add_file(&mut self, path: &Path, name: PathBuf) -> Result<(), ArchiveError> {
        // O_NOFOLLOW: the path was a regular file when walked; if it was swapped for a symlink
        // since, refuse rather than archive whatever the link points at.
        let file = match open_walked(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.skip(path, "vanished before it was read");
                return Ok(());
            }
            Err(e) => {
                self.skip(path, format!("cannot open: {e}"));
                return Ok(());
            }
        };
        let meta = match file.metadata() {
            Ok(m) if m.is_file() => m,
            Ok(_) => {
                self.skip(path, "no longer a regular file");
                return Ok(());
            }
            Err(e) => {
                self.skip(path, format!("cannot stat: {e}"));
                return Ok(());
            }
        };
        let link_key = (meta.nlink() > 1).then(|| (meta.dev(), meta.ino()));
        if let Some(first) = link_key.and_then(|k| self.first_names.get(&k)).cloned() {
            // A second name of a file already archived: a link entry, not the data again.
            let mut header = header_for(&meta);
            header.set_entry_type(tar::EntryType::Link);
            header.set_size(0);
            self.builder
                .append_link(&mut header, &name, &first)
                .map_err(|source| ArchiveError::Write {
                    path: path.display().to_string(),
                    source,
                })?;
            self.record(path, EntryKind::Hardlink, 0, &meta);
            return Ok(());
        }
        let declared = meta.len();
        let mut header = header_for(&meta);
        let regions = data_regions(&file, &meta);
        let (map, ext_blocks) = match &regions {
            Some(regions) => sparse_header(&mut header, regions, declared),
            None => (vec![(0, declared)], Vec::new()),
        };
        let data_size = header.entry_size().unwrap_or(declared);
        self.shared.begin_file(path, declared);
        let mut reader = LiveReader::new(&file, map, self.counters, Some(self.stop));
        reader.gate = self.gate;
        let write_err = |source| ArchiveError::Write {
            path: path.display().to_string(),
            source,
        };
        // The header (and any long-name entries) through tar; the data is written here, in
        // large reads and writes rather than through tar's 8 KiB copy buffer.
        self.builder
            .append_data(&mut header, &name, io::empty())
            .map_err(write_err)?;
        let sink = self.builder.get_mut();
        sink.write_all(&ext_blocks).map_err(write_err)?;
        self.shared.data_begins(data_size);
        loop {
            let n = reader.read(&mut self.buf).map_err(write_err)?;
            if n == 0 {
                break;
            }
            sink.write_all(&self.buf[..n]).map_err(write_err)?;
        }
        // The padding to a whole block and, when the reader ended early (cut at the deadline,
        // shrank, read error), the rest of the declared size: one run of zeros, which the sink
        // may store for next to nothing.
        sink.write_zeros(data_size.next_multiple_of(BLOCK) - reader.emitted)
            .map_err(write_err)?;
        self.shared.end_file();
        let (read, padded, cut, error) =
            (reader.read, reader.padded, reader.cut, reader.error.take());
        let mut st = self.shared.lock();
        st.report.bytes_read += read;
        if cut {
            st.report.stopped_early = true;
        }
        drop(st);
        let change = if cut {
            Some(format!(
                "cut at the deadline after {read} of {declared} bytes; rest zero-filled"
            ))
        } else if let Some(e) = error {
            Some(format!(
                "read error after {read} bytes ({e}); rest zero-filled"
            ))
        } else if padded {
            Some(format!(
                "shrank while read: {read} of {declared} bytes, rest zero-filled"
            ))
        } else {
            match file.metadata() {
                Ok(after) if after.len() > declared => Some(format!(
                    "grew while read: first {declared} of {} bytes archived",
                    after.len()
                )),
                Ok(after) if after.len() < declared => Some(format!(
                    "shrank after it was read: {declared} bytes archived, {} now",
                    after.len()
                )),
                Ok(after)
                    if after.mtime() != meta.mtime() || after.mtime_nsec() != meta.mtime_nsec() =>
                {
                    Some("modified while read".into())
                }
                _ => None,
            }
        };
        if let Some(reason) = change {
            tracing::debug!(path = %path.display(), %reason, "changed while archived");
            self.shared.lock().report.changed.push(ChangeRecord {
                path: RecordedPath::new(path),
                declared_size: declared,
                reason,
            });
        }
        if let Some(key) = link_key {
            self.first_names.insert(key, name);
        }
        self.record(path, EntryKind::File, declared, &meta);
        Ok(())
    }
}

/// Opens a file the walk found for reading: never following a symlink swapped in since, never
/// taking a terminal, never blocking on a FIFO.
pub(crate) fn open_walked(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(
            (rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::NOCTTY
                | rustix::fs::OFlags::NONBLOCK)
                .bits() as i32,
        )
        .open(path)
}

/// A GNU header with the entry's type, size, owner, mtime and permission bits (without the file
/// type bits `st_mode` also holds, as GNU tar writes it).
fn header_for(meta: &Metadata) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    header.set_mode(meta.mode() & 0o7777);
    header
}

/// The data regions of a file with holes, as `(offset, length)` pairs starting on tar blocks, or
/// `None` when the file has fewer than [`SPARSE_MIN_HOLES`] bytes of holes (or the file system
/// cannot say). Regions are widened to whole 512-byte blocks; the last may end at end of file.
fn data_regions(file: &File, meta: &Metadata) -> Option<Vec<(u64, u64)>> {
    let size = meta.len();
    // Cheap first test: a file with as many blocks as bytes has no holes.
    if meta.blocks().saturating_mul(512) + SPARSE_MIN_HOLES > size {
        return None;
    }
    let mut regions: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let start = match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(pos)) {
            Ok(start) if start < size => start,
            Ok(_) | Err(rustix::io::Errno::NXIO) => break,
            Err(_) => return None,
        };
        let end = rustix::fs::seek(file, rustix::fs::SeekFrom::Hole(start)).ok()?;
        let start = start - start % BLOCK;
        let end = end.min(size).next_multiple_of(BLOCK).min(size);
        match regions.last_mut() {
            Some((off, len)) if *off + *len >= start => *len = end - *off,
            _ => regions.push((start, end - start)),
        }
        pos = end;
    }
    let data: u64 = regions.iter().map(|r| r.1).sum();
    (size - data >= SPARSE_MIN_HOLES).then_some(regions)
}

/// Turns `header` into an old-GNU sparse header for `regions` of a file of `size` bytes; returns
/// the regions to read and the extension blocks (21 map entries each) that follow the header when
/// the map does not fit in its four slots.
fn sparse_header(
    header: &mut tar::Header,
    regions: &[(u64, u64)],
    size: u64,
) -> (Vec<(u64, u64)>, Vec<u8>) {
    let mut map = regions.to_vec();
    // GNU tar marks a trailing hole (and an empty map) with an empty region at the end.
    if map.last().is_none_or(|(off, len)| off + len < size) {
        map.push((size, 0));
    }
    header.set_entry_type(tar::EntryType::GNUSparse);
    header.set_size(map.iter().map(|r| r.1).sum());
    let gnu = header.as_gnu_mut().expect("a GNU header");
    gnu.set_real_size(size);
    let (first, rest) = map.split_at(map.len().min(gnu.sparse.len()));
    for (slot, &(off, len)) in gnu.sparse.iter_mut().zip(first) {
        slot.set_offset(off);
        slot.set_length(len);
    }
    gnu.set_is_extended(!rest.is_empty());
    let mut ext_blocks = Vec::new();
    let mut chunks = rest
        .chunks(tar::GnuExtSparseHeader::new().sparse.len())
        .peekable();
    while let Some(chunk) = chunks.next() {
        let mut ext = tar::GnuExtSparseHeader::new();
        for (slot, &(off, len)) in ext.sparse.iter_mut().zip(chunk) {
            slot.set_offset(off);
            slot.set_length(len);
        }
        ext.set_is_extended(chunks.peek().is_some());
        ext_blocks.extend_from_slice(ext.as_bytes());
    }
    (map, ext_blocks)
}

/// Yields the bytes of `regions` of a file that may change while read: stops at each region's
/// declared end, and ends early (returns end of file)
/// when the file ends before its declared size, a read fails or the deadline cuts it; the caller
/// fills the rest ([`TarSink::write_zeros`]). Never returns an error, so an error out of the tar
/// builder is always the output's.
struct LiveReader<'a> {
    file: &'a File,
    /// `(offset, length)` still to read, in order; the front one is partly read.
    regions: std::collections::VecDeque<(u64, u64)>,
    /// File bytes read.
    read: u64,
    /// Bytes yielded (what was read, in the map's order).
    emitted: u64,
    padded: bool,
    error: Option<io::Error>,
    counters: &'a Counters,
    /// When set, stop reading (the deadline is near) and zero-fill the rest.
    stop: Option<&'a AtomicBool>,
    cut: bool,
    /// When set, each read first tries not to wait (`RWF_NOWAIT`) and tells the gate when the
    /// data was not in memory.
    gate: Option<&'a crate::prefetch::Gate>,
}

impl<'a> LiveReader<'a> {
    fn new(
        file: &'a File,
        regions: Vec<(u64, u64)>,
        counters: &'a Counters,
        stop: Option<&'a AtomicBool>,
    ) -> Self {
        LiveReader {
            file,
            regions: regions.into_iter().filter(|r| r.1 > 0).collect(),
            read: 0,
            emitted: 0,
            padded: false,
            error: None,
            counters,
            stop,
            cut: false,
            gate: None,
        }
    }
}

impl Read for LiveReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some((offset, remaining)) = self.regions.front_mut() else {
            return Ok(0);
        };
        let want = buf
            .len()
            .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
        let buf = &mut buf[..want];
        if !self.cut && self.stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            self.cut = true;
        }
        if self.padded || self.cut || self.error.is_some() {
            return Ok(0);
        }
        let n = loop {
            if let Some(gate) = self.gate {
                match crate::prefetch::read_cached(self.file, buf, *offset) {
                    Some(Ok(n)) => break n,
                    Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // Not in memory (or the file system cannot say): read and wait.
                    _ => gate.missed(),
                }
            }
            match self.file.read_at(buf, *offset) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.error = Some(e);
                    return Ok(0);
                }
            }
        };
        if n == 0 {
            // End of file before the declared size: the caller fills the rest.
            self.padded = true;
            return Ok(0);
        }
        self.read += n as u64;
        self.emitted += n as u64;
        self.counters
            .bytes_read
            .fetch_add(n as u64, Ordering::Relaxed);
        *offset += n as u64;
        *remaining -= n as u64;
        if *remaining == 0 {
            self.regions.pop_front();
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn options<'a>(paths: &'a [PathBuf], exclude: &'a GlobSet) -> ArchiveOptions<'a> {
        ArchiveOptions {
            paths,
            exclude,
            one_file_system: true,
        }
    }

    fn entries(tar_bytes: &[u8]) -> Vec<(String, tar::EntryType, Vec<u8>)> {
        let mut archive = tar::Archive::new(tar_bytes);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().display().to_string();
                let kind = e.header().entry_type();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (name, kind, data)
            })
            .collect()
    }

    #[test]
    fn archives_files_dirs_links_and_skips_excluded() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        std::fs::create_dir_all(root.join("sub/empty")).unwrap();
        std::fs::write(root.join("sub/a.log"), b"hello").unwrap();
        std::fs::write(root.join("sub/b.tmp"), b"skip me").unwrap();
        std::fs::hard_link(root.join("sub/a.log"), root.join("a-again.log")).unwrap();
        symlink("/nonexistent/target", root.join("dangling")).unwrap();
        let paths = vec![root.clone()];
        let mut b = globset::GlobSetBuilder::new();
        b.add(globset::Glob::new("*.tmp").unwrap());
        let exclude = b.build().unwrap();
        let stop = AtomicBool::new(false);
        let (out, report) = write_archive(
            &options(&paths, &exclude),
            Vec::new(),
            &Counters::default(),
            &stop,
        )
        .unwrap();
        let list = entries(&out);
        let names: Vec<_> = list.iter().map(|(n, _, _)| n.as_str()).collect();
        let rel = |s: &str| archive_name(&root.join(s)).unwrap().display().to_string();
        assert!(names.contains(&rel("sub/a.log").as_str()), "{names:?}");
        assert!(!names.iter().any(|n| n.ends_with("b.tmp")), "{names:?}");
        let link = list
            .iter()
            .find(|(n, _, _)| n.ends_with("dangling"))
            .unwrap();
        assert_eq!(link.1, tar::EntryType::Symlink);
        // The hard link's first name comes first in name order; the second is a link entry.
        let hard: Vec<_> = list
            .iter()
            .filter(|(_, k, _)| *k == tar::EntryType::Link)
            .collect();
        assert_eq!(hard.len(), 1, "{list:?}");
        assert_eq!(report.file_count(), 1);
        assert!(report.skipped.is_empty());
        assert!(!report.stopped_early);
    }

    #[test]
    fn nested_configured_paths_are_archived_once_in_either_order() {
        let dir = tempfile::tempdir().unwrap();
        let var = dir.path().join("var");
        std::fs::create_dir_all(var.join("log")).unwrap();
        std::fs::write(var.join("log/syslog"), b"s").unwrap();
        std::fs::write(var.join("top"), b"t").unwrap();
        for paths in [
            vec![var.join("log"), var.clone()],
            vec![var.clone(), var.join("log"), var.join("log")],
        ] {
            let exclude = GlobSet::empty();
            let stop = AtomicBool::new(false);
            let (out, _) = write_archive(
                &options(&paths, &exclude),
                Vec::new(),
                &Counters::default(),
                &stop,
            )
            .unwrap();
            let names: Vec<String> = entries(&out).into_iter().map(|e| e.0).collect();
            let syslog = names
                .iter()
                .filter(|n| n.ends_with("var/log/syslog"))
                .count();
            let log_dir = names.iter().filter(|n| n.ends_with("var/log/")).count();
            assert_eq!((syslog, log_dir), (1, 1), "{paths:?}: {names:?}");
            assert_eq!(names.iter().filter(|n| n.ends_with("var/top")).count(), 1);
        }
    }

    #[test]
    fn missing_path_is_skipped_not_fatal() {
        let paths = vec![PathBuf::from("/nonexistent/lifeboat-test")];
        let exclude = GlobSet::empty();
        let stop = AtomicBool::new(false);
        let (_, report) = write_archive(
            &options(&paths, &exclude),
            Vec::new(),
            &Counters::default(),
            &stop,
        )
        .unwrap();
        assert_eq!(report.skipped.len(), 1);
        assert_eq!(report.skipped[0].reason, "not found");
    }

    #[test]
    fn stop_closes_a_valid_partial_archive() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let paths = vec![dir.path().to_owned()];
        let exclude = GlobSet::empty();
        let stop = AtomicBool::new(true);
        let (out, report) = write_archive(
            &options(&paths, &exclude),
            Vec::new(),
            &Counters::default(),
            &stop,
        )
        .unwrap();
        assert!(report.stopped_early);
        assert!(entries(&out).is_empty());
        assert_eq!(out.len(), 1024, "just the end-of-archive marker");
    }

    #[test]
    fn live_reader_pads_a_file_that_shrank() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let file = File::open(&path).unwrap();
        let counters = Counters::default();
        let mut r = LiveReader::new(&file, vec![(0, 6)], &counters, None);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        // It ends where the file did; the tar writer fills the declared rest.
        assert_eq!(out, b"abc");
        assert_eq!(r.emitted, 3);
        assert!(r.padded);
    }

    /// A sink that counts the zeros it is asked to write as a run.
    #[derive(Default)]
    struct CountingSink {
        bytes: Vec<u8>,
        runs: u64,
    }

    impl Write for CountingSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.bytes.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl TarSink for CountingSink {
        fn write_zeros(&mut self, n: u64) -> io::Result<()> {
            self.runs += n;
            crate::zeros::write_zeros(&mut self.bytes, n)
        }
    }

    #[test]
    fn abandoning_mid_read_closes_a_valid_archive_with_the_file_at_its_size() {
        // The walking thread wrote a header and 1000 of 5000 declared bytes, then got stuck.
        let shared = Arc::new(Shared::new(CountingSink::default()));
        let mut w = SharedWriter(Arc::clone(&shared));
        let mut header = tar::Header::new_gnu();
        header.set_path("stuck.db").unwrap();
        header.set_size(5000);
        header.set_mode(0o644);
        header.set_cksum();
        w.write_all(header.as_bytes()).unwrap();
        shared.begin_file(Path::new("/data/stuck.db"), 5000);
        shared.data_begins(5000);
        w.write_all(&[9u8; 1000]).unwrap();

        let (sink, report) = shared.abandon().expect("not inside a write").unwrap();
        assert!(report.stopped_early);
        assert!(
            report.changed[0].reason.contains("did not return"),
            "{report:?}"
        );
        // The stuck thread's next write fails; the archive is already closed.
        assert!(w.write_all(b"late").is_err());
        assert!(shared.abandon().is_none());
        let entries = entries(&sink.bytes);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].0, "stuck.db");
        assert_eq!(entries[0].2.len(), 5000);
        assert!(entries[0].2[..1000].iter().all(|&b| b == 9));
        assert!(entries[0].2[1000..].iter().all(|&b| b == 0));
        assert_eq!(
            sink.bytes.len() as u64,
            BLOCK + 5000_u64.next_multiple_of(BLOCK) + END_OF_ARCHIVE
        );
    }

    #[test]
    fn a_file_cut_at_the_deadline_keeps_its_size_and_the_rest_is_one_run_of_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.db");
        std::fs::write(&path, vec![7u8; 100_000]).unwrap();
        let counters = Counters::default();
        // The deadline has come: nothing more is read.
        let stop = AtomicBool::new(true);
        let shared = Arc::new(Shared::new(CountingSink::default()));
        let mut w = TarWriter {
            gate: None,
            builder: tar::Builder::new(SharedWriter(Arc::clone(&shared))),
            shared: Arc::clone(&shared),
            buf: vec![0; READ_SIZE],
            first_names: HashMap::new(),
            counters: &counters,
            stop: &stop,
        };
        w.add_file(&path, PathBuf::from("big.db")).unwrap();
        w.builder.finish().unwrap();
        drop(w);
        let (sink, report) = shared.finish().unwrap();
        assert!(report.stopped_early);
        assert!(report.changed[0].reason.contains("cut at the deadline"));
        assert_eq!(sink.runs, 100_000_u64.next_multiple_of(BLOCK));
        let entries = entries(&sink.bytes);
        assert_eq!(entries[0].0, "big.db");
        assert_eq!(entries[0].2.len(), 100_000);
        assert!(entries[0].2.iter().all(|&b| b == 0));
    }

    #[test]
    fn files_with_holes_become_gnu_sparse_entries() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let size = 300 << 20;
        // 40 data regions: the map needs extension blocks after the header.
        let path = dir.path().join("sparse");
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        let mut expected = Vec::new();
        for i in 0..40u64 {
            let off = i * (7 << 20) + 1000;
            let data = format!("region {i} ").repeat(700);
            f.write_all_at(data.as_bytes(), off).unwrap();
            expected.push((off, data));
        }
        drop(f);
        let paths = vec![path.clone()];
        let exclude = GlobSet::empty();
        let counters = Counters::default();
        let (out, report) = write_archive(
            &options(&paths, &exclude),
            Vec::new(),
            &counters,
            &AtomicBool::new(false),
        )
        .unwrap();
        assert!(report.changed.is_empty(), "{:?}", report.changed);
        assert!(
            out.len() < 2 << 20,
            "archive holds the holes: {} bytes",
            out.len()
        );
        assert_eq!(
            counters.bytes_read.load(Ordering::Relaxed),
            report.bytes_read
        );
        let mut archive = tar::Archive::new(&out[..]);
        let mut entries = archive.entries().unwrap();
        let mut entry = entries.next().unwrap().unwrap();
        assert_eq!(entry.header().entry_type(), tar::EntryType::GNUSparse);
        assert_eq!(entry.size(), size);
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        assert_eq!(content.len() as u64, size);
        let mut want = vec![0u8; size as usize];
        for (off, data) in &expected {
            want[*off as usize..][..data.len()].copy_from_slice(data.as_bytes());
        }
        assert!(content == want, "sparse content differs");
        drop(entry);
        assert!(entries.next().is_none());
    }

    #[test]
    fn a_file_of_holes_only_is_an_empty_sparse_map() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        File::create(&path).unwrap().set_len(5 << 20).unwrap();
        let paths = vec![path];
        let exclude = GlobSet::empty();
        let (out, _) = write_archive(
            &options(&paths, &exclude),
            Vec::new(),
            &Counters::default(),
            &AtomicBool::new(false),
        )
        .unwrap();
        let (_, kind, content) = entries(&out).remove(0);
        assert_eq!(kind, tar::EntryType::GNUSparse);
        assert!(content.len() == 5 << 20 && content.iter().all(|&b| b == 0));
    }

    #[test]
    fn non_utf8_names_are_recorded_exactly() {
        let p = Path::new(std::ffi::OsStr::from_bytes(b"/x/\xffname"));
        let r = RecordedPath::new(p);
        assert_eq!(r.bytes(), b"/x/\xffname");
        assert!(r.path_hex.is_some());
    }
}
