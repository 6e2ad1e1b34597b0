//! Checks an archive against its manifest: the SHA-256 and size of the stored bytes, and every
//! entry (name, kind, size, mode, mtime) against the manifest's file list, in one streaming pass.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::archive::{EntryKind, archive_name};
use crate::config::CompressionKind;
use crate::manifest::Manifest;

/// The verdict.
#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    /// Entries read from the archive.
    pub entries: u64,
    /// SHA-256 of the stored bytes.
    pub sha256: String,
    /// Bytes in the stored object.
    pub bytes: u64,
    /// Everything that does not match; empty means verified.
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// Whether the archive matches its manifest.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Counts and hashes the raw bytes on their way to the decompressor.
struct Hashing<R> {
    inner: R,
    sha: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

fn kind_of(t: tar::EntryType) -> Option<EntryKind> {
    Some(match t {
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
            EntryKind::File
        }
        tar::EntryType::Directory => EntryKind::Dir,
        tar::EntryType::Symlink => EntryKind::Symlink,
        tar::EntryType::Link => EntryKind::Hardlink,
        _ => return None,
    })
}

/// Reads the whole archive from `raw` and compares it with `manifest`.
pub fn verify(
    raw: impl Read + Send,
    compression: CompressionKind,
    manifest: &Manifest,
) -> VerifyReport {
    let mut report = VerifyReport::default();
    // Expected entries by their name in the archive.
    let mut expected: HashMap<Vec<u8>, &crate::archive::FileRecord> = HashMap::new();
    for f in &manifest.files {
        let bytes = f.path.bytes();
        if let Some(name) = archive_name(Path::new(OsStr::from_bytes(&bytes))) {
            expected.insert(name.as_os_str().as_bytes().to_vec(), f);
        }
    }
    let mut hashing = Hashing {
        inner: raw,
        sha: Sha256::new(),
        bytes: 0,
    };
    let threads = crate::decompress::default_threads();
    let read_result = crate::decompress::decode(compression, &mut hashing, threads, |decoder| {
        let mut archive = tar::Archive::new(decoder);
        for entry in archive.entries()? {
            let mut entry = entry?;
            report.entries += 1;
            let mut name = entry.path_bytes().into_owned();
            if name.last() == Some(&b'/') {
                name.pop();
            }
            let shown = String::from_utf8_lossy(&name).into_owned();
            // The file's size: a sparse entry's header holds only the size of its data.
            let size = entry.size();
            let h = entry.header();
            match expected.remove(&name) {
                None => report
                    .problems
                    .push(format!("{shown}: in the archive but not in the manifest")),
                Some(f) => {
                    let kind = kind_of(h.entry_type());
                    if kind != Some(f.kind) {
                        report.problems.push(format!(
                            "{shown}: kind {:?} in the archive, {:?} in the manifest",
                            h.entry_type(),
                            f.kind
                        ));
                    } else if size != f.size {
                        report.problems.push(format!(
                            "{shown}: {size} bytes in the archive, {} in the manifest",
                            f.size
                        ));
                    } else if f.kind != EntryKind::Symlink
                        && f.kind != EntryKind::Hardlink
                        && (h.mode().ok().map(|m| m & 0o7777) != Some(f.mode)
                            || h.mtime().ok() != u64::try_from(f.mtime).ok())
                    {
                        report
                            .problems
                            .push(format!("{shown}: mode or mtime differ from the manifest"));
                    }
                }
            }
            // Read the data through, so the decoder checks it.
            io::copy(&mut entry, &mut io::sink())?;
        }
        Ok::<(), io::Error>(())
    });
    if let Err(e) = read_result {
        report
            .problems
            .push(format!("the archive is unreadable: {e}"));
    }
    // Hash whatever follows the tar end marker too: the whole object is what the manifest hashed.
    if let Err(e) = io::copy(&mut hashing, &mut io::sink()) {
        report.problems.push(format!("reading the archive: {e}"));
    }
    for (name, _) in expected {
        report.problems.push(format!(
            "{}: in the manifest but not in the archive",
            String::from_utf8_lossy(&name)
        ));
    }
    report.sha256 = hex::encode(hashing.sha.finalize());
    report.bytes = hashing.bytes;
    if report.sha256 != manifest.sha256 {
        report.problems.push(format!(
            "SHA-256 {} does not match the manifest's {}",
            report.sha256, manifest.sha256
        ));
    }
    if report.bytes != manifest.bytes_stored {
        report.problems.push(format!(
            "{} bytes stored, the manifest says {}",
            report.bytes, manifest.bytes_stored
        ));
    }
    report
}
