//! Extraction into a target directory that never writes outside it, whatever the archive holds.
//!
//! Every entry name is checked before anything is written: absolute names and `..` components are
//! refused; each parent directory is walked from the target one component at a time and must be a
//! real directory (a symlink planted by an earlier entry is never followed); an existing file or
//! link at the final name is unlinked, never written through; hard links must point at a path
//! inside the target. Devices and FIFOs are refused. Every refusal is reported with its reason.
//! Long runs of zeros are written as holes, so sparse files stay sparse.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::CompressionKind;

/// Block size for hole detection and copying.
const COPY_BLOCK: usize = 128 * 1024;

/// Compared against with `memcmp`, which is fast in every build profile (a byte loop is not, in a
/// debug build, over the gigabytes of zeros a sparse file expands to).
static ZEROS: [u8; COPY_BLOCK] = [0; COPY_BLOCK];

/// Why extraction stopped.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The target directory could not be created.
    #[error("creating the target directory {path}: {source}")]
    Target {
        /// Target.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// The archive stream is unreadable (corrupt, truncated, or the download failed).
    #[error("reading the archive: {source}")]
    Read {
        /// Decoder or download error.
        source: io::Error,
    },
    /// Writing a restored entry failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file being written.
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
    /// Apply the archive's owners and set-id bits (GNU tar's `--same-owner`).
    pub same_owner: bool,
    /// Replace existing files in the target (directories are merged either way).
    pub overwrite: bool,
    /// Check the stream against this before anything is moved into the target; `None` restores
    /// unverified (`--force-unverified`).
    pub expected: Option<Expected>,
}

/// Restores the archive read from `raw` into `target`, proving it first: the stream is extracted
/// into a staging directory inside the target (the same file system, even when the target is a
/// mount point) while its size and SHA-256 are computed; only when they match the manifest, and
/// nothing in the target would be replaced (unless `overwrite`), are the entries moved into
/// place. On any failure the staging directory is removed and the target is as it was.
pub fn restore(
    raw: impl Read,
    compression: CompressionKind,
    target: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    fs::create_dir_all(target).map_err(|source| RestoreError::Target {
        path: target.to_owned(),
        source,
    })?;
    let staging = tempfile::Builder::new()
        .prefix(".lifeboat-restore-")
        .tempdir_in(target)
        .map_err(|source| RestoreError::Target {
            path: target.to_owned(),
            source,
        })?;
    let mut hashing = HashingReader {
        inner: raw,
        sha: sha2::Sha256::default(),
        len: 0,
    };
    let report = extract(&mut hashing, compression, staging.path(), opts.same_owner)?;
    // Whatever follows the end-of-archive marker is part of the stored object too.
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
    if !opts.overwrite
        && let Some(path) = first_conflict(staging.path(), target)?
    {
        return Err(RestoreError::Conflict { path });
    }
    move_into(staging.path(), target)?;
    Ok(report)
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

fn write_err(path: &Path) -> impl Fn(io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Write {
        path: path.to_owned(),
        source,
    }
}

/// The first path under `dest` that an entry of `staged` would replace: anything but a directory
/// meeting a directory. Directories that exist on both sides are merged.
fn first_conflict(staged: &Path, dest: &Path) -> Result<Option<PathBuf>, RestoreError> {
    let mut names: Vec<_> = fs::read_dir(staged)
        .map_err(write_err(staged))?
        .collect::<Result<_, _>>()
        .map_err(write_err(staged))?;
    names.sort_by_key(fs::DirEntry::file_name);
    for entry in names {
        let there = dest.join(entry.file_name());
        let Ok(existing) = fs::symlink_metadata(&there) else {
            continue;
        };
        let file_type = entry.file_type().map_err(write_err(&entry.path()))?;
        if !(existing.is_dir() && file_type.is_dir()) {
            return Ok(Some(there));
        }
        if let Some(p) = first_conflict(&entry.path(), &there)? {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// Moves everything in `staged` into `dest`: a name not in `dest` is renamed in whole, a directory
/// on both sides is merged, anything else in `dest` is replaced (checked before, unless
/// `--overwrite`). Never follows a symlink in `dest`.
fn move_into(staged: &Path, dest: &Path) -> Result<(), RestoreError> {
    for entry in fs::read_dir(staged).map_err(write_err(staged))? {
        let entry = entry.map_err(write_err(staged))?;
        let from = entry.path();
        let to = dest.join(entry.file_name());
        match fs::symlink_metadata(&to) {
            Err(_) => fs::rename(&from, &to).map_err(write_err(&to))?,
            Ok(existing) if existing.is_dir() && entry.file_type().is_ok_and(|t| t.is_dir()) => {
                move_into(&from, &to)?;
            }
            Ok(existing) => {
                if existing.is_dir() {
                    fs::remove_dir_all(&to).map_err(write_err(&to))?;
                } else {
                    fs::remove_file(&to).map_err(write_err(&to))?;
                }
                fs::rename(&from, &to).map_err(write_err(&to))?;
            }
        }
    }
    Ok(())
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
}

/// Extracts the archive read from `raw` (compressed as `compression`) into `target`, in place
/// and unverified ([`restore`] proves the archive first and is what the CLI runs).
///
/// Owners and set-id bits are the archive's word, and an archive is only as trustworthy as
/// whoever could write it: they are applied only with `same_owner` (GNU tar's `--same-owner`).
/// Without it the files belong to the restoring user and setuid/setgid bits are dropped, even as
/// root.
pub fn extract(
    raw: impl Read,
    compression: CompressionKind,
    target: &Path,
    same_owner: bool,
) -> Result<RestoreReport, RestoreError> {
    fs::create_dir_all(target).map_err(|source| RestoreError::Target {
        path: target.to_owned(),
        source,
    })?;
    let reader = crate::compress::decompressor(compression, raw)
        .map_err(|source| RestoreError::Read { source })?;
    let mut archive = tar::Archive::new(reader);
    let mut report = RestoreReport::default();
    // Directory modes and times are applied last, deepest first, so a read-only directory does
    // not block its own contents.
    let mut dirs: Vec<(PathBuf, tar::Header)> = Vec::new();
    let entries = archive
        .entries()
        .map_err(|source| RestoreError::Read { source })?;
    for entry in entries {
        let mut entry = entry.map_err(|source| RestoreError::Read { source })?;
        let name_bytes = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&name_bytes).into_owned();
        let refuse = |report: &mut RestoreReport, reason: String| {
            tracing::warn!(entry = %name, %reason, "refused");
            report.refused.push(Refusal {
                name: name.clone(),
                reason,
            });
        };
        let components = match safe_components(&name_bytes) {
            Ok(c) => c,
            Err(reason) => {
                refuse(&mut report, reason);
                continue;
            }
        };
        let kind = entry.header().entry_type();
        let header = entry.header().clone();
        let result = match kind {
            tar::EntryType::Directory => match safe_dir(target, &components) {
                Ok(path) => {
                    dirs.push((path, header));
                    Ok(())
                }
                Err(reason) => Err(Outcome::Refused(reason)),
            },
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                place(target, &components).and_then(|path| {
                    write_file(&mut entry, &path, &mut report)?;
                    apply_metadata(&path, &header, same_owner, false)?;
                    Ok(())
                })
            }
            tar::EntryType::Symlink => place(target, &components).and_then(|path| {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| Outcome::Refused("symlink without a target".into()))?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&link), &path).map_err(|source| {
                    Outcome::Failed(RestoreError::Write {
                        path: path.clone(),
                        source,
                    })
                })?;
                apply_metadata(&path, &header, same_owner, true)?;
                Ok(())
            }),
            tar::EntryType::Link => {
                let link = entry.link_name_bytes().map(|b| b.into_owned());
                match link.as_deref().map(safe_components) {
                    None => Err(Outcome::Refused("hard link without a target".into())),
                    Some(Err(reason)) => {
                        Err(Outcome::Refused(format!("hard link target: {reason}")))
                    }
                    Some(Ok(tcomps)) => safe_existing(target, &tcomps).and_then(|from| {
                        let path = place(target, &components)?;
                        fs::hard_link(&from, &path)
                            .map_err(|source| Outcome::Failed(RestoreError::Write { path, source }))
                    }),
                }
            }
            tar::EntryType::Fifo | tar::EntryType::Char | tar::EntryType::Block => Err(
                Outcome::Refused("devices and FIFOs are not restored".into()),
            ),
            other => Err(Outcome::Refused(format!(
                "unsupported entry type {other:?}"
            ))),
        };
        match result {
            Ok(()) => report.entries += 1,
            Err(Outcome::Refused(reason)) => refuse(&mut report, reason),
            Err(Outcome::Failed(e)) => return Err(e),
        }
    }
    dirs.sort_by(|a, b| b.0.cmp(&a.0));
    for (path, header) in dirs {
        if let Err(Outcome::Failed(e)) = apply_metadata(&path, &header, same_owner, false) {
            return Err(e);
        }
    }
    Ok(report)
}

enum Outcome {
    Refused(String),
    Failed(RestoreError),
}

/// The entry name as relative components; refuses absolute names and `..`.
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
    if out.is_empty() {
        return Err("empty path".into());
    }
    Ok(out)
}

/// Walks `target/comps[..n]`, creating missing directories; every step must be a real
/// directory, never a symlink.
fn walk_dirs(target: &Path, comps: &[Vec<u8>]) -> Result<PathBuf, Outcome> {
    let mut cur = target.to_path_buf();
    for c in comps {
        cur.push(OsStr::from_bytes(c));
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Outcome::Refused(format!(
                    "{} is a symlink: refusing to write through it",
                    cur.display()
                )));
            }
            Ok(_) => {
                return Err(Outcome::Refused(format!(
                    "{} is not a directory",
                    cur.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(|source| {
                    Outcome::Failed(RestoreError::Write {
                        path: cur.clone(),
                        source,
                    })
                })?;
            }
            Err(source) => return Err(Outcome::Failed(RestoreError::Write { path: cur, source })),
        }
    }
    Ok(cur)
}

fn safe_dir(target: &Path, comps: &[Vec<u8>]) -> Result<PathBuf, String> {
    walk_dirs(target, comps).map_err(|o| match o {
        Outcome::Refused(r) => r,
        Outcome::Failed(e) => e.to_string(),
    })
}

/// The path for a new non-directory entry: parents are real directories inside `target`, and
/// whatever non-directory was at the name is removed (unlinked, not followed).
fn place(target: &Path, comps: &[Vec<u8>]) -> Result<PathBuf, Outcome> {
    let (last, parents) = comps.split_last().expect("names have a component");
    let mut path = walk_dirs(target, parents)?;
    path.push(OsStr::from_bytes(last));
    match fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => Err(Outcome::Refused(format!(
            "{} is a directory",
            path.display()
        ))),
        Ok(_) => fs::remove_file(&path)
            .map(|()| path.clone())
            .map_err(|source| Outcome::Failed(RestoreError::Write { path, source })),
        Err(_) => Ok(path),
    }
}

/// An existing path inside `target` reached only through real directories (hard link source).
fn safe_existing(target: &Path, comps: &[Vec<u8>]) -> Result<PathBuf, Outcome> {
    let (last, parents) = comps.split_last().expect("names have a component");
    let mut cur = target.to_path_buf();
    for c in parents {
        cur.push(OsStr::from_bytes(c));
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            _ => {
                return Err(Outcome::Refused(format!(
                    "hard link target goes through {}, which is not a directory inside the target",
                    cur.display()
                )));
            }
        }
    }
    cur.push(OsStr::from_bytes(last));
    match fs::symlink_metadata(&cur) {
        Ok(m) if m.is_file() => Ok(cur),
        _ => Err(Outcome::Refused(format!(
            "hard link target {} is not a file restored in the target",
            cur.display()
        ))),
    }
}

/// Writes the entry's data to a new file at `path`, leaving holes for long runs of zeros.
fn write_file(
    entry: &mut impl Read,
    path: &Path,
    report: &mut RestoreReport,
) -> Result<(), Outcome> {
    let failed = |source| {
        Outcome::Failed(RestoreError::Write {
            path: path.to_owned(),
            source,
        })
    };
    let mut file: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .mode(0o600)
        .open(path)
        .map_err(failed)?;
    let mut buf = vec![0u8; COPY_BLOCK];
    let mut len: u64 = 0;
    loop {
        let n = read_full(entry, &mut buf)
            .map_err(|source| Outcome::Failed(RestoreError::Read { source }))?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        if chunk == &ZEROS[..n] {
            file.seek(SeekFrom::Current(n as i64)).map_err(failed)?;
        } else {
            file.write_all(chunk).map_err(failed)?;
        }
        len += n as u64;
    }
    file.set_len(len).map_err(failed)?;
    report.bytes += len;
    Ok(())
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

/// Set-id bits: applied only with the archive's owners.
const SET_ID_BITS: u32 = 0o6000;

/// Owner (with `same_owner`), mode and mtime from the header. Owner first: chown clears set-id
/// bits. Without `same_owner` the set-id bits are dropped.
fn apply_metadata(
    path: &Path,
    h: &tar::Header,
    same_owner: bool,
    is_link: bool,
) -> Result<(), Outcome> {
    let failed = |source| {
        Outcome::Failed(RestoreError::Write {
            path: path.to_owned(),
            source,
        })
    };
    if same_owner {
        let uid = h.uid().ok().and_then(|u| u32::try_from(u).ok());
        let gid = h.gid().ok().and_then(|g| u32::try_from(g).ok());
        std::os::unix::fs::lchown(path, uid, gid).map_err(failed)?;
    }
    let mtime = filetime::FileTime::from_unix_time(h.mtime().unwrap_or(0) as i64, 0);
    if is_link {
        filetime::set_symlink_file_times(path, mtime, mtime).map_err(failed)?;
    } else {
        if let Ok(mode) = h.mode() {
            let keep = if same_owner {
                0o7777
            } else {
                0o7777 & !SET_ID_BITS
            };
            fs::set_permissions(path, fs::Permissions::from_mode(mode & keep)).map_err(failed)?;
        }
        filetime::set_file_times(path, mtime, mtime).map_err(failed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
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
        let report = extract(&archive[..], CompressionKind::None, &target, false).unwrap();
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
        let mut report = RestoreReport::default();
        let path = dir.path().join("sparse");
        assert!(write_file(&mut &data[..], &path, &mut report).is_ok());
        assert_eq!(fs::read(&path).unwrap(), data);
    }
}
