//! Extraction into a target directory that never writes outside it, whatever the archive holds.
//!
//! Every create, chmod, chown and utimes is relative to an open directory handle (`cap-std`'s
//! `Dir`), one name at a time, never following a symlink: a parent is opened with
//! `open_dir_nofollow`, files are created with `O_NOFOLLOW | O_EXCL`, and metadata is applied to
//! the open file or directory (`fchown`, `fchmod`, `futimens`), or to a symlink itself
//! (`AT_SYMLINK_NOFOLLOW`). A symlink swapped in for a directory, by the archive or by anyone
//! else while restore runs, is therefore never followed. Entry names are checked first: absolute
//! names and `..` components are refused; hard links must point at a file restored in the
//! target; devices and FIFOs are refused. An archive lifeboat cannot restore exactly (an entry
//! refused, an unknown entry type, a truncated stream, data after the end) is refused as a whole:
//! nothing reaches the target. Long runs of zeros are written as holes.
//!
//! [`restore_routed`] restores chosen archived paths, each to a place of its own ([`Route`]):
//! entries outside every route are left out and listed, and each destination is staged inside
//! itself, so a destination on another file system (a data volume mounted at
//! `/var/lib/app`) is filled by renames on that file system.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use cap_fs_ext::{DirExt, FollowSymlinks, OpenOptionsFollowExt, OpenOptionsMaybeDirExt};
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};
use rustix::fs::{AtFlags, Mode, Timespec, Timestamps};

use crate::config::CompressionKind;

/// Block size for hole detection and copying.
const COPY_BLOCK: usize = 128 * 1024;

/// Compared against with `memcmp`, which is fast in every build profile (a byte loop is not, in a
/// debug build, over the gigabytes of zeros a sparse file expands to).
static ZEROS: [u8; COPY_BLOCK] = [0; COPY_BLOCK];

/// Why extraction stopped.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The target directory could not be created or opened.
    #[error("creating the target directory {path}")]
    Target {
        /// Target.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// The archive stream is unreadable (corrupt, truncated, or the download failed).
    #[error("reading the archive (nothing was restored)")]
    Read {
        /// Decoder or download error.
        source: io::Error,
    },
    /// Writing a restored entry failed.
    #[error("writing {path} (nothing was restored)")]
    Write {
        /// The entry being written (relative to the target).
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// The archive is not the one its manifest describes: nothing was moved into the target.
    #[error(
        "the archive does not match its manifest ({what}): it was changed or damaged after the backup; nothing was restored"
    )]
    Mismatch {
        /// What differs.
        what: String,
    },
    /// The tar stream is damaged: nothing was moved into the target.
    #[error("the archive is damaged: {what}; nothing was restored")]
    Corrupt {
        /// What is wrong.
        what: String,
    },
    /// Entries lifeboat cannot restore exactly: nothing was moved into the target.
    #[error(
        "{} entries cannot be restored exactly (first: {first}); nothing was restored",
        refused.len()
    )]
    Refused {
        /// The first refusal, as `name: reason`.
        first: String,
        /// Every refused entry.
        refused: Vec<Refusal>,
    },
    /// A restored entry would replace something already in the target.
    #[error(
        "{path} already exists: nothing was restored (use --overwrite to replace existing files)"
    )]
    Conflict {
        /// The first conflicting path.
        path: PathBuf,
    },
}

/// What the stored object must be, from its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// Bytes stored.
    pub size: u64,
    /// SHA-256 of the stored bytes, hex.
    pub sha256: String,
}

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Apply the archive's owners (GNU tar's `--same-owner`).
    pub same_owner: bool,
    /// Also apply its setuid and setgid bits (only with `same_owner`).
    pub keep_set_id: bool,
    /// Replace existing files in the target (directories are merged either way).
    pub overwrite: bool,
    /// Check the stream against this before anything is moved into the target; `None` restores
    /// unverified (`--force-unverified`).
    pub expected: Option<Expected>,
}

/// An entry that was not restored, and why.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The entry's name in the archive (lossy).
    pub name: String,
    /// Why it was refused.
    pub reason: String,
}

/// What extraction did.
#[derive(Debug, Default, Clone)]
pub struct RestoreReport {
    /// Entries restored.
    pub entries: u64,
    /// File bytes written (holes included).
    pub bytes: u64,
    /// Entries refused.
    pub refused: Vec<Refusal>,
    /// Entries left out because no route takes them (names, lossy).
    pub outside: Vec<String>,
}

/// Where an archived path is restored: the entry archived as `archived` (an absolute path, as
/// in `backup.paths`) and everything below it go to `to` (`archived/x` becomes `to/x`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The path as archived.
    pub archived: PathBuf,
    /// Where it is restored.
    pub to: PathBuf,
}

/// Restores the archive read from `raw` into `target`, proving it first: the stream is extracted
/// into a staging directory inside the target (the same file system, even when the target is a
/// mount point) while its size and SHA-256 are computed; only when they match the manifest,
/// every entry could be restored exactly, the stream ended where a tar stream ends, and nothing
/// in the target would be replaced (unless `overwrite`), are the entries moved into place. On
/// any failure the staging directory is removed and the target is as it was.
pub fn restore(
    raw: impl Read + Send,
    compression: CompressionKind,
    target: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let everything = Route {
        archived: PathBuf::from("/"),
        to: target.to_owned(),
    };
    restore_routed(raw, compression, &[everything], opts)
}

/// [`restore`] of the paths `routes` name, each to its own place; the rest of the archive is
/// read and verified but not written (listed in the report's `outside`). Each destination is
/// staged inside itself, and nothing moves into any of them before the whole stream is proven.
pub fn restore_routed(
    raw: impl Read + Send,
    compression: CompressionKind,
    routes: &[Route],
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let mut places = Routes::new(routes);
    let mut hashing = HashingReader {
        inner: raw,
        sha: sha2::Sha256::default(),
        len: 0,
    };
    let report = extract_into(&mut hashing, compression, &mut places, opts);
    // Whatever follows the compressed stream is part of the stored object too.
    io::copy(&mut hashing, &mut io::sink()).map_err(|source| RestoreError::Read { source })?;
    if let Some(want) = &opts.expected {
        use sha2::Digest;
        let sha = hex::encode(hashing.sha.finalize());
        if hashing.len != want.size {
            return Err(RestoreError::Mismatch {
                what: format!("{} bytes, the manifest says {}", hashing.len, want.size),
            });
        }
        if sha != want.sha256 {
            return Err(RestoreError::Mismatch {
                what: format!("SHA-256 {sha}, the manifest says {}", want.sha256),
            });
        }
    }
    let report = report?;
    if let Some(first) = report.refused.first() {
        return Err(RestoreError::Refused {
            first: format!("{}: {}", first.name, first.reason),
            refused: report.refused,
        });
    }
    if !opts.overwrite {
        for root in &places.roots {
            if let Some(path) = first_conflict(&root.staging.dir, &root.dest, Path::new(""))? {
                return Err(RestoreError::Conflict {
                    path: root.target.join(path),
                });
            }
        }
    }
    for root in &places.roots {
        move_into(&root.staging.dir, &root.dest, Path::new(""), &mut |_| {})?;
    }
    Ok(report)
}

/// Where extraction writes an entry: which directory, and its components there.
trait Place {
    /// The place of the entry named `comps`; `is_dir` when it is a directory.
    fn place(&mut self, comps: &[Vec<u8>], is_dir: bool) -> Result<Placed, RestoreError>;
    /// The directory of place `index`.
    fn root(&self, index: usize) -> &Dir;
}

/// Where an entry goes.
enum Placed {
    /// Into root `.0`, as `.1` (empty: the root itself).
    In(usize, Vec<Vec<u8>>),
    /// Nowhere, and rightly so: a directory above a restored path.
    Skip,
    /// Nowhere: no route takes it.
    Outside,
}

/// Every entry into one directory.
#[cfg(test)]
struct One<'a>(&'a Dir);

#[cfg(test)]
impl Place for One<'_> {
    fn place(&mut self, comps: &[Vec<u8>], _: bool) -> Result<Placed, RestoreError> {
        Ok(Placed::In(0, comps.to_vec()))
    }
    fn root(&self, _: usize) -> &Dir {
        self.0
    }
}

/// The routes of a restore, and the destinations opened so far, each with its staging
/// directory.
struct Routes {
    /// Each route's archived path as components, and its destination; longest first, so the
    /// most specific route takes an entry.
    routes: Vec<(Vec<Vec<u8>>, PathBuf)>,
    roots: Vec<Root>,
}

/// A destination directory and the staging directory inside it.
struct Root {
    target: PathBuf,
    dest: Dir,
    staging: Staging,
}

impl Routes {
    fn new(routes: &[Route]) -> Self {
        let mut routes: Vec<_> = routes
            .iter()
            .map(|r| {
                let comps = r
                    .archived
                    .components()
                    .filter_map(|c| match c {
                        std::path::Component::Normal(n) => Some(n.as_bytes().to_vec()),
                        _ => None,
                    })
                    .collect::<Vec<_>>();
                (comps, r.to.clone())
            })
            .collect();
        routes.sort_by_key(|(comps, _)| std::cmp::Reverse(comps.len()));
        Self {
            routes,
            roots: Vec::new(),
        }
    }

    /// The index of destination `target`, created, opened and staged the first time.
    fn root_for(&mut self, target: &Path) -> Result<usize, RestoreError> {
        if let Some(i) = self.roots.iter().position(|r| r.target == target) {
            return Ok(i);
        }
        let dest = open_target(target)?;
        let staging = Staging::create(&dest, target)?;
        self.roots.push(Root {
            target: target.to_owned(),
            dest,
            staging,
        });
        Ok(self.roots.len() - 1)
    }
}

impl Place for Routes {
    fn place(&mut self, comps: &[Vec<u8>], is_dir: bool) -> Result<Placed, RestoreError> {
        let Some((prefix, to)) = self.routes.iter().find(|(p, _)| comps.starts_with(p)) else {
            let above =
                |(p, _): &(Vec<Vec<u8>>, PathBuf)| p.len() > comps.len() && p.starts_with(comps);
            return Ok(if is_dir && self.routes.iter().any(above) {
                Placed::Skip
            } else {
                Placed::Outside
            });
        };
        let rel = comps[prefix.len()..].to_vec();
        let to = to.clone();
        if rel.is_empty() && !is_dir && !prefix.is_empty() {
            // A file archived as itself: it becomes `to`, staged beside it.
            let (Some(parent), Some(name)) = (to.parent(), to.file_name()) else {
                return Err(RestoreError::Target {
                    path: to.clone(),
                    source: io::Error::other("a file cannot be restored as the root directory"),
                });
            };
            let name = name.as_bytes().to_vec();
            return Ok(Placed::In(self.root_for(parent)?, vec![name]));
        }
        Ok(Placed::In(self.root_for(&to)?, rel))
    }

    fn root(&self, index: usize) -> &Dir {
        &self.roots[index].staging.dir
    }
}

/// Creates `target` if needed and opens it (the one path lifeboat follows: the operator's).
fn open_target(target: &Path) -> Result<Dir, RestoreError> {
    let failed = |source| RestoreError::Target {
        path: target.to_owned(),
        source,
    };
    std::fs::create_dir_all(target).map_err(failed)?;
    Dir::open_ambient_dir(target, cap_std::ambient_authority()).map_err(failed)
}

/// A private directory inside the target, removed (with whatever is left in it) when dropped.
struct Staging {
    parent: Dir,
    name: String,
    dir: Dir,
}

impl Staging {
    fn create(parent: &Dir, target: &Path) -> Result<Self, RestoreError> {
        loop {
            let name = format!(".lifeboat-restore-{:016x}", fastrand::u64(..));
            let failed = |source| RestoreError::Target {
                path: target.join(&name),
                source,
            };
            match parent.create_dir(&name) {
                Ok(()) => {
                    let handle = open_for_metadata(parent, OsStr::new(&name)).map_err(failed)?;
                    rustix::fs::fchmod(&handle, Mode::from_raw_mode(0o700))
                        .map_err(|e| failed(e.into()))?;
                    let dir = parent.open_dir_nofollow(&name).map_err(failed)?;
                    let parent = parent.try_clone().map_err(failed)?;
                    return Ok(Self { parent, name, dir });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(failed(e)),
            }
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = self.parent.remove_dir_all(&self.name) {
            tracing::warn!(dir = %self.name, error = %e, "could not remove the staging directory");
        }
    }
}

/// Counts and hashes the bytes read through it.
struct HashingReader<R> {
    inner: R,
    sha: sha2::Sha256,
    len: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// Notes whether the tar parser ran into the end of the stream (no end-of-archive marker).
struct EofWatch<R> {
    inner: R,
    eof: bool,
}

impl<R: Read> Read for EofWatch<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof = true;
        }
        Ok(n)
    }
}

fn write_err(path: &Path) -> impl Fn(io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Write {
        path: path.to_owned(),
        source,
    }
}

/// The first path under `dest` that an entry of `staged` would replace: anything but a directory
/// meeting a directory. Directories that exist on both sides are merged. `at` is the path of
/// both, relative to the target.
fn first_conflict(staged: &Dir, dest: &Dir, at: &Path) -> Result<Option<PathBuf>, RestoreError> {
    let mut names: Vec<_> = staged
        .entries()
        .map_err(write_err(at))?
        .collect::<Result<_, _>>()
        .map_err(write_err(at))?;
    names.sort_by_key(|e| e.file_name());
    for entry in names {
        let name = entry.file_name();
        let path = at.join(&name);
        let Ok(existing) = dest.symlink_metadata(&name) else {
            continue;
        };
        let is_dir = entry.file_type().map_err(write_err(&path))?.is_dir();
        if !(existing.is_dir() && is_dir) {
            return Ok(Some(path));
        }
        let (Ok(s), Ok(d)) = (
            staged.open_dir_nofollow(&name),
            dest.open_dir_nofollow(&name),
        ) else {
            return Ok(Some(path));
        };
        if let Some(p) = first_conflict(&s, &d, &path)? {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// Moves everything in `staged` into `dest`: a name not in `dest` is renamed in whole, a directory
/// on both sides is merged (through handles opened without following symlinks: a directory
/// swapped for a symlink meanwhile is replaced, never followed), anything else in `dest` is
/// replaced (checked before, unless `--overwrite`). `merging` is called with each directory
/// about to be merged (a test's seam for swapping one).
fn move_into(
    staged: &Dir,
    dest: &Dir,
    at: &Path,
    merging: &mut dyn FnMut(&Path),
) -> Result<(), RestoreError> {
    for entry in staged.entries().map_err(write_err(at))? {
        let entry = entry.map_err(write_err(at))?;
        let name = entry.file_name();
        let path = at.join(&name);
        let is_dir = entry.file_type().map_err(write_err(&path))?.is_dir();
        match dest.symlink_metadata(&name) {
            Err(_) => {}
            Ok(existing) if existing.is_dir() && is_dir => {
                if let Ok(into) = dest.open_dir_nofollow(&name) {
                    merging(&path);
                    let from = staged.open_dir_nofollow(&name).map_err(write_err(&path))?;
                    move_into(&from, &into, &path, merging)?;
                    continue;
                }
                // Swapped for something else since it was looked at: replaced below.
                dest.remove_file_or_symlink(&name)
                    .map_err(write_err(&path))?;
            }
            Ok(existing) if existing.is_dir() => {
                dest.remove_dir_all(&name).map_err(write_err(&path))?;
            }
            Ok(_) => dest
                .remove_file_or_symlink(&name)
                .map_err(write_err(&path))?,
        }
        staged
            .rename(&name, dest, &name)
            .map_err(write_err(&path))?;
    }
    Ok(())
}

/// An entry's metadata, from its header and pax records.
#[derive(Debug, Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: Timespec,
}

/// The pax records of one entry that lifeboat applies itself (the tar crate applies `path`,
/// `linkpath` and `size`).
#[derive(Debug, Default)]
struct Pax {
    mtime: Option<Timespec>,
    uid: Option<u64>,
    gid: Option<u64>,
    sparse: Option<PaxSparse>,
}

/// A GNU sparse file in a pax archive (formats 0.0, 0.1 and 1.0).
#[derive(Debug, Default)]
struct PaxSparse {
    major: Option<u64>,
    name: Option<Vec<u8>>,
    size: Option<u64>,
    /// `(offset, length)` of each data region; in the data itself for format 1.0.
    map: Vec<(u64, u64)>,
    pending_offset: Option<u64>,
}

fn pax_of(entry: &mut tar::Entry<'_, impl Read>) -> Result<Pax, String> {
    let mut pax = Pax::default();
    let Some(exts) = entry.pax_extensions().map_err(|e| e.to_string())? else {
        return Ok(pax);
    };
    let num = |key: &str, v: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("pax record {key}={v} is not a number"))
    };
    for ext in exts {
        let ext = ext.map_err(|e| e.to_string())?;
        let key = ext
            .key()
            .map_err(|_| "a pax record key is not UTF-8".to_owned())?;
        let value = ext.value_bytes();
        let text = || String::from_utf8_lossy(value).into_owned();
        if key.starts_with("GNU.sparse.") {
            pax.sparse.get_or_insert_with(PaxSparse::default);
        }
        let sparse = pax.sparse.as_mut();
        match (key, sparse) {
            ("mtime", _) => pax.mtime = Some(pax_time(&text())?),
            ("uid", _) => pax.uid = Some(num(key, &text())?),
            ("gid", _) => pax.gid = Some(num(key, &text())?),
            ("GNU.sparse.major", Some(sparse)) => sparse.major = Some(num(key, &text())?),
            ("GNU.sparse.name", Some(sparse)) => sparse.name = Some(value.to_vec()),
            ("GNU.sparse.size" | "GNU.sparse.realsize", Some(sparse)) => {
                sparse.size = Some(num(key, &text())?);
            }
            ("GNU.sparse.map", Some(sparse)) => {
                let nums: Vec<u64> = text()
                    .split(',')
                    .map(|n| num(key, n))
                    .collect::<Result<_, _>>()?;
                if nums.len() % 2 != 0 {
                    return Err("GNU.sparse.map has an odd number of values".into());
                }
                sparse.map = nums.chunks(2).map(|c| (c[0], c[1])).collect();
            }
            ("GNU.sparse.offset", Some(sparse)) => {
                sparse.pending_offset = Some(num(key, &text())?);
            }
            ("GNU.sparse.numbytes", Some(s)) => {
                let off = s
                    .pending_offset
                    .take()
                    .ok_or("GNU.sparse.numbytes without an offset")?;
                let len = num(key, &text())?;
                s.map.push((off, len));
            }
            _ => {}
        }
    }
    Ok(pax)
}

/// A pax time (`seconds[.fraction]`, possibly negative).
fn pax_time(v: &str) -> Result<Timespec, String> {
    let bad = || format!("pax mtime {v:?} is not a time");
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let tv_sec: i64 = secs.parse().map_err(|_| bad())?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let tv_nsec = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().map_err(|_| bad())?
    };
    // A negative time with a fraction counts the fraction down from the seconds.
    Ok(if tv_sec < 0 && tv_nsec > 0 {
        Timespec {
            tv_sec: tv_sec - 1,
            tv_nsec: 1_000_000_000 - tv_nsec,
        }
    } else {
        Timespec { tv_sec, tv_nsec }
    })
}

/// The metadata lifeboat applies: header fields, overridden by pax records; a field neither can
/// say is a refusal (restoring it as 0 would be restoring it wrong).
fn meta_of(h: &tar::Header, pax: &Pax, same_owner: bool) -> Result<Meta, String> {
    let mode = h.mode().map_err(|e| format!("unreadable mode: {e}"))?;
    // Owners are read only when they are applied.
    let (uid, gid) = if same_owner {
        (
            pax.uid
                .map_or_else(|| h.uid(), Ok)
                .map_err(|e| format!("unreadable uid: {e}"))?,
            pax.gid
                .map_or_else(|| h.gid(), Ok)
                .map_err(|e| format!("unreadable gid: {e}"))?,
        )
    } else {
        (0, 0)
    };
    let mtime = match pax.mtime {
        Some(t) => t,
        None => Timespec {
            tv_sec: header_mtime(h)?,
            tv_nsec: 0,
        },
    };
    Ok(Meta {
        mode,
        uid,
        gid,
        mtime,
    })
}

/// The header's mtime, including GNU's base-256 negative times (before 1970).
fn header_mtime(h: &tar::Header) -> Result<i64, String> {
    let raw = &h.as_old().mtime;
    if raw[0] == 0xff {
        // Two's complement, big-endian, in the whole field.
        let mut v: i64 = -1;
        for &b in &raw[1..] {
            v = (v << 8) | i64::from(b);
        }
        return Ok(v);
    }
    h.mtime()
        .map_err(|e| format!("unreadable mtime: {e}"))
        .and_then(|t| i64::try_from(t).map_err(|_| "mtime out of range".into()))
}

/// The archive's entry kinds, as lifeboat treats them.
enum Kind {
    Dir,
    File,
    Symlink,
    HardLink,
    /// Carries nothing to restore (a volume label, a pax global header with only comments).
    Skip,
}

fn kind_of(entry: &mut tar::Entry<'_, impl Read>, name: &[u8]) -> Result<Kind, String> {
    use tar::EntryType as T;
    Ok(match entry.header().entry_type() {
        T::Directory => Kind::Dir,
        // V7 archives have no directory type: a "file" whose name ends in a slash.
        T::Regular if name.ends_with(b"/") => Kind::Dir,
        T::Regular | T::Continuous | T::GNUSparse => Kind::File,
        T::Symlink => Kind::Symlink,
        T::Link => Kind::HardLink,
        // A GNU volume label names the archive, not a file.
        other if other.as_byte() == b'V' => Kind::Skip,
        T::XGlobalHeader => {
            let mut data = Vec::new();
            entry
                .read_to_end(&mut data)
                .map_err(|e| format!("unreadable pax global header: {e}"))?;
            for ext in tar::PaxExtensions::new(&data) {
                let key = ext
                    .map_err(|e| format!("unreadable pax global header: {e}"))?
                    .key()
                    .map_err(|_| "a pax global header key is not UTF-8".to_owned())?
                    .to_owned();
                if key != "comment" {
                    return Err(format!(
                        "pax global header sets {key}, which lifeboat does not apply"
                    ));
                }
            }
            Kind::Skip
        }
        T::Fifo | T::Char | T::Block => {
            return Err("devices and FIFOs are not restored".into());
        }
        other => return Err(format!("unsupported entry type {other:?}")),
    })
}

/// Extracts the archive read from `raw` (compressed as `compression`) into the directory `root`
/// (restore's staging directory), listing refused entries in the report.
///
/// Owners and set-id bits are the archive's word, and an archive is only as trustworthy as
/// whoever could write it: they are applied only with `same_owner` (GNU tar's `--same-owner`).
/// Without it the files belong to the restoring user and setuid/setgid bits are dropped, even as
/// root; with it, set-id bits only with `keep_set_id`. Each entry goes where `places` says.
fn extract_into(
    raw: impl Read + Send,
    compression: CompressionKind,
    places: &mut dyn Place,
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    crate::decompress::decode(
        compression,
        raw,
        crate::decompress::default_threads(),
        |reader| extract_from(reader, places, opts),
    )
}

/// [`extract_into`], from the decompressed tar stream.
fn extract_from(
    reader: &mut dyn Read,
    places: &mut dyn Place,
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let same_owner = opts.same_owner;
    let set_id_mask = if same_owner && opts.keep_set_id {
        0o7777
    } else {
        0o7777 & !SET_ID_BITS
    };
    let reader = without_volume_label(reader).map_err(|source| RestoreError::Read { source })?;
    let mut watched = EofWatch {
        inner: reader,
        eof: false,
    };
    let mut archive = tar::Archive::new(&mut watched);
    let mut report = RestoreReport::default();
    // Directory modes and times are applied last, deepest first, so a read-only directory does
    // not block its own contents.
    let mut dirs: Vec<(usize, Vec<Vec<u8>>, Meta)> = Vec::new();
    let mut parents = Parents::default();
    // The root the cached parents belong to.
    let mut parents_of = 0;
    let umask = current_umask();
    // One copy buffer for every file (allocating and zeroing one per file cost more than the
    // copying, for small files).
    let mut copy_buf = vec![0u8; COPY_BLOCK];
    let entries = archive
        .entries()
        .map_err(|source| RestoreError::Read { source })?;
    for entry in entries {
        let mut entry = entry.map_err(|source| RestoreError::Read { source })?;
        let name_bytes = entry.path_bytes().into_owned();
        let mut name = String::from_utf8_lossy(&name_bytes).into_owned();
        let outcome = (|| {
            let kind = kind_of(&mut entry, &name_bytes).map_err(Outcome::Refused)?;
            if matches!(kind, Kind::Skip) {
                return Ok(false);
            }
            let pax = pax_of(&mut entry).map_err(Outcome::Refused)?;
            let mut meta = meta_of(entry.header(), &pax, same_owner).map_err(Outcome::Refused)?;
            meta.mode &= set_id_mask;
            let mut real_name = name_bytes.clone();
            if let Some(sparse) = &pax.sparse
                && let Some(n) = &sparse.name
            {
                real_name.clone_from(n);
                name = String::from_utf8_lossy(n).into_owned();
            }
            let comps = safe_components(&real_name).map_err(Outcome::Refused)?;
            let (at, comps) = match places.place(&comps, matches!(kind, Kind::Dir))? {
                Placed::In(at, comps) => (at, comps),
                Placed::Skip => return Ok(false),
                Placed::Outside => return Err(Outcome::Outside),
            };
            if at != parents_of {
                parents = Parents::default();
                parents_of = at;
            }
            let root = places.root(at);
            let Some((last, dir_comps)) = comps.split_last() else {
                // `./`: the target itself, which restore does not change.
                return match kind {
                    Kind::Dir => Ok(false),
                    _ => Err(Outcome::Refused("empty path".into())),
                };
            };
            let last = OsStr::from_bytes(last);
            let rel = rel_path(&comps);
            match kind {
                Kind::Dir => {
                    parents.get(root, &comps)?;
                    dirs.push((at, comps.clone(), meta));
                }
                Kind::File => {
                    let parent = parents.get(root, dir_comps)?;
                    // Most names are new: an earlier entry of the same name is cleared only
                    // when the create finds it.
                    let mut file = match create_file(parent, last, meta.mode) {
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                            clear(parent, last, &rel)?;
                            create_file(parent, last, meta.mode)
                        }
                        created => created,
                    }
                    .map_err(failed(&rel))?;
                    let len = match pax.sparse {
                        Some(sparse) => write_pax_sparse(&mut entry, &mut file, sparse, &rel)?,
                        None => write_data(&mut entry, &mut file, &rel, &mut copy_buf)?,
                    };
                    report.bytes += len;
                    // Created with its permission bits: chmod only what the umask took away, or
                    // what creation cannot set.
                    let created = (meta.mode & 0o777 & !umask) | u32::from(same_owner) << 31;
                    apply_to_fd(&file, &meta, same_owner, Some(created)).map_err(failed(&rel))?;
                }
                Kind::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| Outcome::Refused("symlink without a target".into()))?
                        .into_owned();
                    let parent = parents.get(root, dir_comps)?;
                    clear(parent, last, &rel)?;
                    // symlinkat, not cap-std's symlink: the link's text is data (an absolute or
                    // dangling target is fine); it is never followed, here or later.
                    rustix::fs::symlinkat(OsStr::from_bytes(&target), parent, last)
                        .map_err(|e| failed(&rel)(e.into()))?;
                    apply_to_symlink(parent, last, &meta, same_owner).map_err(failed(&rel))?;
                }
                Kind::HardLink => {
                    let link = entry
                        .link_name_bytes()
                        .ok_or_else(|| Outcome::Refused("hard link without a target".into()))?
                        .into_owned();
                    let tcomps = safe_components(&link)
                        .map_err(|r| Outcome::Refused(format!("hard link target: {r}")))?;
                    let not_restored = || {
                        Outcome::Refused(format!(
                            "hard link target {} is not a file restored in the target",
                            String::from_utf8_lossy(&link)
                        ))
                    };
                    // The target must have been restored to the same place.
                    let tcomps = match places.place(&tcomps, false)? {
                        Placed::In(t, tcomps) if t == at => tcomps,
                        _ => return Err(not_restored()),
                    };
                    let root = places.root(at);
                    let (tlast, tparents) = tcomps
                        .split_last()
                        .ok_or_else(|| Outcome::Refused("hard link to the target itself".into()))?;
                    let tlast = OsStr::from_bytes(tlast);
                    let source = existing_dir(root, tparents).ok_or_else(not_restored)?;
                    match source.symlink_metadata(tlast) {
                        Ok(m) if m.is_file() => {}
                        _ => return Err(not_restored()),
                    }
                    let parent = parents.get(root, dir_comps)?;
                    if dir_comps == tparents && last == tlast {
                        return Ok(true);
                    }
                    clear(parent, last, &rel)?;
                    source
                        .hard_link(tlast, parent, last)
                        .map_err(failed(&rel))?;
                }
                Kind::Skip => unreachable!("handled above"),
            }
            Ok(true)
        })();
        match outcome {
            Ok(true) => report.entries += 1,
            Ok(false) => {}
            Err(Outcome::Refused(reason)) => {
                tracing::warn!(entry = %name, %reason, "refused");
                report.refused.push(Refusal { name, reason });
            }
            Err(Outcome::Outside) => report.outside.push(name),
            Err(Outcome::Failed(e)) => return Err(e),
        }
    }
    if watched.eof {
        return Err(RestoreError::Corrupt {
            what: "it ends without the end-of-archive marker (truncated)".into(),
        });
    }
    // After the marker, a tar stream holds only zeros (padding to its record size).
    let mut buf = vec![0u8; COPY_BLOCK];
    loop {
        let n = watched.read(&mut buf).map_err(|e| RestoreError::Corrupt {
            what: format!("after the end-of-archive marker: {e}"),
        })?;
        if n == 0 {
            break;
        }
        if buf[..n] != ZEROS[..n] {
            return Err(RestoreError::Corrupt {
                what: "data follows the end-of-archive marker".into(),
            });
        }
    }
    dirs.sort_by(|a, b| (b.0, &b.1).cmp(&(a.0, &a.1)));
    // Deepest first, siblings together: the walk keeps the shared parents open.
    let mut walk = Parents::default();
    let mut walk_of = None;
    for (at, comps, meta) in dirs {
        let rel = rel_path(&comps);
        let (last, parent_comps) = comps.split_last().expect("directories have a name");
        if walk_of != Some(at) {
            walk = Parents::default();
            walk_of = Some(at);
        }
        let root = places.root(at);
        let parent = match walk.get(root, parent_comps) {
            Ok(parent) => parent,
            Err(Outcome::Failed(e)) => return Err(e),
            Err(Outcome::Refused(reason)) => return Err(write_err(&rel)(io::Error::other(reason))),
            Err(Outcome::Outside) => unreachable!("directories are placed when they are read"),
        };
        let dir = open_for_metadata(parent, OsStr::from_bytes(last)).map_err(write_err(&rel))?;
        apply_to_fd(&dir, &meta, same_owner, None).map_err(write_err(&rel))?;
    }
    Ok(report)
}

/// GNU tar's volume label (`tar -V`) is a header before the first entry, naming the archive, not
/// a file; its blank size field stops the tar crate, so a valid one (checksum and all) is
/// dropped here.
fn without_volume_label(mut r: impl Read) -> io::Result<impl Read> {
    let mut first = vec![0u8; 512];
    let n = read_full(&mut r, &mut first)?;
    first.truncate(n);
    if n == 512 && first[156] == b'V' {
        let field = std::str::from_utf8(&first[148..156]).unwrap_or_default();
        let stored = u32::from_str_radix(field.trim_matches(|c| c == ' ' || c == '\0'), 8).ok();
        let sum: u32 = first
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(b)
                }
            })
            .sum();
        if stored == Some(sum) {
            first.clear();
        }
    }
    Ok(io::Cursor::new(first).chain(r))
}

enum Outcome {
    Refused(String),
    /// No route takes the entry.
    Outside,
    Failed(RestoreError),
}

impl From<RestoreError> for Outcome {
    fn from(e: RestoreError) -> Self {
        Self::Failed(e)
    }
}

fn failed(rel: &Path) -> impl Fn(io::Error) -> Outcome + '_ {
    move |source| {
        Outcome::Failed(RestoreError::Write {
            path: rel.to_owned(),
            source,
        })
    }
}

fn rel_path(comps: &[Vec<u8>]) -> PathBuf {
    comps.iter().map(|c| OsStr::from_bytes(c)).collect()
}

/// The entry name as relative components (empty for `./`); refuses absolute names and `..`.
fn safe_components(name: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    if name.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    let mut out = Vec::new();
    for c in name.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("path contains `..`".into()),
            c => out.push(c.to_vec()),
        }
    }
    if out.is_empty() && name.is_empty() {
        return Err("empty path".into());
    }
    Ok(out)
}

/// The directories leading to the last entry, each kept open: archives list a directory's
/// entries together and walk into subdirectories and back, so an entry needs at most the
/// directories its path does not share with the previous one opened (a file needs none).
#[derive(Default)]
struct Parents {
    /// `(name, handle)` of `root/comps[0]`, `root/comps[0]/comps[1]`, …
    chain: Vec<(Vec<u8>, Dir)>,
}

impl Parents {
    /// `root/comps`, walked one name at a time with `open_dir_nofollow`, creating missing
    /// directories; a step that is a symlink or not a directory is a refusal.
    fn get<'a>(&'a mut self, root: &'a Dir, comps: &[Vec<u8>]) -> Result<&'a Dir, Outcome> {
        let shared = self
            .chain
            .iter()
            .zip(comps)
            .take_while(|((have, _), want)| have == *want)
            .count();
        self.chain.truncate(shared);
        for (i, c) in comps.iter().enumerate().skip(shared) {
            let name = OsStr::from_bytes(c);
            let base = self.chain.last().map_or(root, |(_, d)| d);
            let here = || rel_path(&comps[..=i]);
            let next = match base.open_dir_nofollow(name) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    base.create_dir(name).map_err(failed(&here()))?;
                    base.open_dir_nofollow(name).map_err(failed(&here()))?
                }
                Err(_) => {
                    let what = match base.symlink_metadata(name) {
                        Ok(m) if m.file_type().is_symlink() => {
                            "is a symlink: refusing to write through it"
                        }
                        _ => "is not a directory",
                    };
                    // Nothing of this walk is kept: the next entry starts again from here.
                    return Err(Outcome::Refused(format!("{} {what}", here().display())));
                }
            };
            self.chain.push((c.clone(), next));
        }
        Ok(self.chain.last().map_or(root, |(_, d)| d))
    }
}

/// `root/comps` if every step is a real directory (no symlink followed), without creating any.
fn existing_dir(root: &Dir, comps: &[Vec<u8>]) -> Option<Dir> {
    let mut cur = root.try_clone().ok()?;
    for c in comps {
        cur = cur.open_dir_nofollow(OsStr::from_bytes(c)).ok()?;
    }
    Some(cur)
}

/// The directory `parent/name` opened for reading, so `fchmod`, `fchown` and `futimens` work on it
/// (a `Dir` handle is `O_PATH`); never through a symlink, and only if it is a directory.
fn open_for_metadata(parent: &Dir, name: &OsStr) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).maybe_dir(true).follow(FollowSymlinks::No);
    let file = parent.open_with(name, &opts)?.into_std();
    if !file.metadata()?.is_dir() {
        return Err(io::Error::other("no longer a directory"));
    }
    Ok(file)
}

/// Makes room for a new non-directory entry at `parent/name`: an existing file or symlink (an
/// earlier entry of the same name) is unlinked, never followed; a directory is a refusal.
fn clear(parent: &Dir, name: &OsStr, rel: &Path) -> Result<(), Outcome> {
    match parent.symlink_metadata(name) {
        Ok(m) if m.is_dir() => Err(Outcome::Refused(format!(
            "{} is a directory",
            rel.display()
        ))),
        Ok(_) => parent.remove_file_or_symlink(name).map_err(failed(rel)),
        Err(_) => Ok(()),
    }
}

/// A new file with permission bits `mode` (less the umask), never through a symlink. It is
/// written inside the staging directory, which only its owner can enter.
fn create_file(parent: &Dir, name: &OsStr, mode: u32) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.write(true)
        .create_new(true)
        .follow(FollowSymlinks::No)
        .mode(mode & 0o777);
    parent
        .open_with(name, &opts)
        .map(cap_std::fs::File::into_std)
}

/// Writes the entry's data, leaving holes for runs of zeros; the length written.
fn write_data(
    entry: &mut impl Read,
    file: &mut File,
    rel: &Path,
    buf: &mut [u8],
) -> Result<u64, Outcome> {
    let mut len: u64 = 0;
    let mut ends_in_hole = false;
    loop {
        let n = read_full(entry, buf)
            .map_err(|source| Outcome::Failed(RestoreError::Read { source }))?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        ends_in_hole = chunk == &ZEROS[..n];
        if ends_in_hole {
            file.seek(SeekFrom::Current(n as i64))
                .map_err(failed(rel))?;
        } else {
            file.write_all(chunk).map_err(failed(rel))?;
        }
        len += n as u64;
    }
    // A hole at the end is a seek past the data: the length makes it part of the file.
    if ends_in_hole {
        file.set_len(len).map_err(failed(rel))?;
    }
    Ok(len)
}

/// Writes a pax sparse entry: its data regions at their offsets, holes between them, the real
/// size; format 1.0 keeps the map at the start of the data, in 512-byte blocks.
fn write_pax_sparse(
    entry: &mut impl Read,
    file: &mut File,
    mut sparse: PaxSparse,
    rel: &Path,
) -> Result<u64, Outcome> {
    let size = sparse
        .size
        .ok_or_else(|| Outcome::Refused("pax sparse entry without its real size".into()))?;
    let read_err = |source| Outcome::Failed(RestoreError::Read { source });
    if sparse.major == Some(1) {
        let mut numbers = Vec::new();
        let mut line = Vec::new();
        let mut consumed = 0u64;
        let mut byte = [0u8; 1];
        let mut count: Option<u64> = None;
        while count.is_none_or(|c| (numbers.len() as u64) < 2 * c) {
            entry.read_exact(&mut byte).map_err(read_err)?;
            consumed += 1;
            if byte[0] != b'\n' {
                line.push(byte[0]);
                if line.len() > 20 {
                    return Err(Outcome::Refused("pax sparse map is malformed".into()));
                }
                continue;
            }
            let n: u64 = std::str::from_utf8(&line)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Outcome::Refused("pax sparse map is malformed".into()))?;
            line.clear();
            match count {
                None => count = Some(n),
                Some(_) => numbers.push(n),
            }
        }
        let pad = (512 - consumed % 512) % 512;
        io::copy(&mut entry.take(pad), &mut io::sink()).map_err(read_err)?;
        sparse.map = numbers.chunks(2).map(|c| (c[0], c[1])).collect();
    }
    let mut end = 0u64;
    for &(offset, len) in &sparse.map {
        let stop = offset.checked_add(len);
        if offset < end || stop.is_none_or(|s| s > size) {
            return Err(Outcome::Refused(
                "pax sparse map regions overlap or lie beyond the file".into(),
            ));
        }
        file.seek(SeekFrom::Start(offset)).map_err(failed(rel))?;
        let copied = io::copy(&mut entry.take(len), file).map_err(read_err)?;
        if copied != len {
            return Err(Outcome::Failed(RestoreError::Corrupt {
                what: format!("{} ends inside its data", rel.display()),
            }));
        }
        end = offset + len;
    }
    let mut rest = [0u8; 1];
    if entry.read(&mut rest).map_err(read_err)? != 0 {
        return Err(Outcome::Refused(
            "pax sparse entry holds more data than its map describes".into(),
        ));
    }
    file.set_len(size).map_err(failed(rel))?;
    Ok(size)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The process's umask (read by setting it and setting it back, before any file is created).
fn current_umask() -> u32 {
    let mask = rustix::process::umask(Mode::from_raw_mode(0o077));
    rustix::process::umask(mask);
    mask.bits()
}

/// Set-id bits: applied only with the archive's owners.
const SET_ID_BITS: u32 = 0o6000;

fn ids(meta: &Meta) -> io::Result<(rustix::fs::Uid, rustix::fs::Gid)> {
    let range = || io::Error::new(io::ErrorKind::InvalidData, "uid or gid out of range");
    let uid = u32::try_from(meta.uid).map_err(|_| range())?;
    let gid = u32::try_from(meta.gid).map_err(|_| range())?;
    if uid == u32::MAX || gid == u32::MAX {
        return Err(range());
    }
    Ok((
        rustix::fs::Uid::from_raw(uid),
        rustix::fs::Gid::from_raw(gid),
    ))
}

/// Owner (with `same_owner`), mode and mtime, on the open file or directory. Owner first: chown
/// clears set-id bits. Without `same_owner` the set-id bits are dropped. `mode_now` is the mode
/// the file already has, if known: no chmod when it is the one wanted.
fn apply_to_fd(
    fd: impl AsFd,
    meta: &Meta,
    same_owner: bool,
    mode_now: Option<u32>,
) -> io::Result<()> {
    let keep = if same_owner {
        let (uid, gid) = ids(meta)?;
        rustix::fs::fchown(&fd, Some(uid), Some(gid))?;
        0o7777
    } else {
        0o7777 & !SET_ID_BITS
    };
    let wanted = meta.mode & keep;
    if mode_now != Some(wanted) {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(wanted))?;
    }
    rustix::fs::futimens(&fd, &times(meta))?;
    Ok(())
}

/// Owner (with `same_owner`) and mtime of the symlink `parent/name` itself.
fn apply_to_symlink(parent: &Dir, name: &OsStr, meta: &Meta, same_owner: bool) -> io::Result<()> {
    if same_owner {
        let (uid, gid) = ids(meta)?;
        rustix::fs::chownat(
            parent,
            name,
            Some(uid),
            Some(gid),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
    }
    rustix::fs::utimensat(parent, name, &times(meta), AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

fn times(meta: &Meta) -> Timestamps {
    Timestamps {
        last_access: meta.mtime,
        last_modification: meta.mtime,
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn tar_with(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            h.set_mtime(1_700_000_000);
            // Write raw names so hostile ones get into the archive unchecked.
            let raw = h.as_old_mut();
            raw.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                raw.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn refuses_escapes_and_writes_nothing_outside() {
        let outer = tempfile::tempdir().unwrap();
        let target = outer.path().join("target");
        let archive = tar_with(&[
            ("../escape.txt", tar::EntryType::Regular, b"x", None),
            ("/tmp/abs.txt", tar::EntryType::Regular, b"x", None),
            ("link", tar::EntryType::Symlink, b"", Some("..")),
            ("link/through.txt", tar::EntryType::Regular, b"x", None),
            ("ok/file.txt", tar::EntryType::Regular, b"fine", None),
            ("hard", tar::EntryType::Link, b"", Some("../outside")),
        ]);
        let root = open_target(&target).unwrap();
        let report = extract_into(
            &archive[..],
            CompressionKind::None,
            &mut One(&root),
            &RestoreOptions::default(),
        )
        .unwrap();
        let reasons: Vec<_> = report.refused.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            reasons,
            vec!["../escape.txt", "/tmp/abs.txt", "link/through.txt", "hard"],
            "{:?}",
            report.refused
        );
        assert!(!outer.path().join("escape.txt").exists());
        assert!(!outer.path().join("through.txt").exists());
        assert_eq!(fs::read(target.join("ok/file.txt")).unwrap(), b"fine");
    }

    #[test]
    fn zeros_become_holes_with_the_right_length() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 3 * COPY_BLOCK];
        data[COPY_BLOCK + 5] = 7;
        let root = open_target(dir.path()).unwrap();
        let mut file = create_file(&root, OsStr::new("sparse"), 0o600).unwrap();
        let mut buf = vec![0u8; COPY_BLOCK];
        let len = write_data(&mut &data[..], &mut file, Path::new("sparse"), &mut buf).ok();
        assert_eq!(len, Some(data.len() as u64));
        assert_eq!(fs::read(dir.path().join("sparse")).unwrap(), data);
    }

    /// The race restore closes: a directory of the target is swapped for a symlink to somewhere
    /// else just as restore is about to merge into it. Path-based code then writes through the
    /// symlink; through a directory handle opened without following, the files land in the
    /// directory that was checked (wherever it was moved), and nothing reaches the symlink's
    /// target.
    #[test]
    fn a_directory_swapped_for_a_symlink_while_merging_is_not_followed() {
        let outer = tempfile::tempdir().unwrap();
        let target = outer.path().join("target");
        let elsewhere = outer.path().join("elsewhere");
        fs::create_dir_all(target.join("etc")).unwrap();
        fs::create_dir_all(&elsewhere).unwrap();
        let archive = tar_with(&[
            ("etc/", tar::EntryType::Directory, b"", None),
            ("etc/passwd", tar::EntryType::Regular, b"restored", None),
        ]);
        let root = open_target(&target).unwrap();
        let staging = Staging::create(&root, &target).unwrap();
        extract_into(
            &archive[..],
            CompressionKind::None,
            &mut One(&staging.dir),
            &RestoreOptions::default(),
        )
        .unwrap();
        move_into(&staging.dir, &root, Path::new(""), &mut |at| {
            assert_eq!(at, Path::new("etc"));
            fs::rename(target.join("etc"), outer.path().join("moved-away")).unwrap();
            std::os::unix::fs::symlink(&elsewhere, target.join("etc")).unwrap();
        })
        .unwrap();
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
        assert_eq!(
            fs::read(outer.path().join("moved-away/passwd")).unwrap(),
            b"restored"
        );
    }

    #[test]
    fn a_stream_cut_at_an_entry_boundary_or_followed_by_data_is_refused() {
        let whole = tar_with(&[
            ("a.txt", tar::EntryType::Regular, b"one", None),
            ("b.txt", tar::EntryType::Regular, b"two", None),
        ]);
        // Header and one data block per entry; the end marker after them.
        let cut = &whole[..2 * 1024];
        let mut garbage = whole.clone();
        garbage.extend_from_slice(b"appended after the end");
        for (what, bytes) in [("cut", cut), ("garbage", &garbage[..])] {
            let dir = tempfile::tempdir().unwrap();
            let err = restore(
                bytes,
                CompressionKind::None,
                dir.path(),
                &RestoreOptions::default(),
            )
            .unwrap_err();
            assert!(matches!(err, RestoreError::Corrupt { .. }), "{what}: {err}");
            assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "{what}");
        }
    }

    /// Routes take what they name, each to its place: a directory's contents, a file as
    /// itself; directories above a route are passed over, anything else is listed as outside;
    /// a hard link may not reach into another route's place.
    #[test]
    fn routes_restore_only_what_they_name_each_to_its_place() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path();
        let mut archive = tar_with(&[
            ("var/", tar::EntryType::Directory, b"", None),
            ("var/lib/app/", tar::EntryType::Directory, b"", None),
            ("var/lib/app/db", tar::EntryType::Regular, b"state", None),
            (
                "var/lib/app/again",
                tar::EntryType::Link,
                b"",
                Some("var/lib/app/db"),
            ),
            ("etc/app.conf", tar::EntryType::Regular, b"conf", None),
            ("etc/cron.d/job", tar::EntryType::Regular, b"evil", None),
            ("var/log/x", tar::EntryType::Regular, b"log", None),
        ]);
        // A setuid file within a route, whose bits are dropped without keep_set_id.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o4755);
        h.set_size(2);
        h.set_cksum();
        b.append_data(&mut h, "var/lib/app/tool", &b"#!"[..])
            .unwrap();
        let end = archive.len() - 1024;
        archive.truncate(end);
        archive.extend(b.into_inner().unwrap());
        let routes = [
            Route {
                archived: "/var/lib/app".into(),
                to: t.join("volume"),
            },
            Route {
                archived: "/etc/app.conf".into(),
                to: t.join("conf/app.conf"),
            },
        ];
        let report = restore_routed(
            &archive[..],
            CompressionKind::None,
            &routes,
            &RestoreOptions::default(),
        )
        .unwrap();
        assert_eq!(report.outside, vec!["etc/cron.d/job", "var/log/x"]);
        assert_eq!(fs::read(t.join("volume/db")).unwrap(), b"state");
        assert_eq!(fs::read(t.join("volume/again")).unwrap(), b"state");
        assert_eq!(fs::read(t.join("conf/app.conf")).unwrap(), b"conf");
        let mode = fs::metadata(t.join("volume/tool"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7000, 0, "{mode:o}");
        let mut names: Vec<_> = fs::read_dir(t)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["conf", "volume"],
            "nothing else, and no staging left"
        );

        // A hard link from one place into another is refused, and nothing is restored.
        let linked = tar_with(&[
            ("etc/app.conf", tar::EntryType::Regular, b"conf", None),
            (
                "var/lib/app/conf",
                tar::EntryType::Link,
                b"",
                Some("etc/app.conf"),
            ),
        ]);
        let other = tempfile::tempdir().unwrap();
        let routes = routes.map(|r| Route {
            to: other.path().join(r.to.strip_prefix(t).unwrap()),
            ..r
        });
        let err = restore_routed(
            &linked[..],
            CompressionKind::None,
            &routes,
            &RestoreOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, RestoreError::Refused { .. }), "{err}");
        assert!(!other.path().join("conf/app.conf").exists());
    }
}
