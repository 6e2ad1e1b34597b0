//! The manifest stored beside every archive, and the object layout both follow:
//! `PREFIX<group>/<instance-id>/<UTC time>-<reason>.tar.gz` with
//! `PREFIX<group>/<instance-id>/<UTC time>-<reason>.manifest.json` beside it. The manifest is
//! written only after the archive is complete, so its presence marks a finished backup.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::archive::{ChangeRecord, FileRecord, SkipRecord};
use crate::config::CompressionKind;
use crate::identity::InstanceIdentity;

/// The manifest format version.
pub const FORMAT: u32 = 1;
/// Suffix of manifest keys.
pub const MANIFEST_SUFFIX: &str = ".manifest.json";
/// Archive suffixes, longest first.
pub const ARCHIVE_SUFFIXES: [&str; 3] = [".tar.gz", ".tar.zst", ".tar"];

/// Everything known about one backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format: u32,
    /// The lifeboat version that wrote it.
    pub lifeboat_version: String,
    /// The instance backed up.
    pub instance: InstanceIdentity,
    /// Why the backup ran (`manual`, `scale-in`, `spot-interruption`, …).
    pub reason: String,
    /// When archiving started (RFC 3339, UTC).
    pub started_at: String,
    /// When the archive was complete in S3 (RFC 3339, UTC).
    pub finished_at: String,
    /// Bucket of the archive.
    pub bucket: String,
    /// Key of the archive.
    pub key: String,
    /// The configured paths, in archive order.
    pub paths: Vec<String>,
    /// `gzip`, `zstd` or `none`.
    pub compression: String,
    /// Regular files archived.
    pub file_count: u64,
    /// File bytes read.
    pub bytes_read: u64,
    /// Bytes stored in S3 (the archive object's size).
    pub bytes_stored: u64,
    /// S3 parts of the archive.
    pub parts: i32,
    /// SHA-256 of the archive object, hex.
    pub sha256: String,
    /// The archive was cut short (deadline): valid, but not everything is in it.
    pub partial: bool,
    /// Every entry in the archive.
    pub files: Vec<FileRecord>,
    /// Paths left out, with reasons.
    pub skipped: Vec<SkipRecord>,
    /// Files that changed while read.
    pub changed: Vec<ChangeRecord>,
}

impl Manifest {
    /// The key of the manifest that belongs to this archive.
    pub fn key(&self) -> String {
        manifest_key(&self.key)
    }
}

/// A UTC time as RFC 3339.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// Makes a free-text reason safe for a key: lower case, `[a-z0-9-]`, at most 40 characters.
pub fn key_reason(reason: &str) -> String {
    let mut out = String::new();
    for c in reason.trim().chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out: String = out.trim_matches('-').chars().take(40).collect();
    let out = out.trim_end_matches('-').to_owned();
    if out.is_empty() { "manual".into() } else { out }
}

/// The archive key for a backup of `identity` started at `started`.
pub fn archive_key(
    prefix: &str,
    identity: &InstanceIdentity,
    started: OffsetDateTime,
    reason: &str,
    compression: CompressionKind,
) -> String {
    let stamp = started
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .unwrap_or_default();
    format!(
        "{prefix}{}/{}/{stamp}-{}.{}",
        identity.group,
        identity.instance_id,
        key_reason(reason),
        compression.extension()
    )
}

/// The archive key without its archive suffix, if it has one.
fn stem(archive_key: &str) -> Option<&str> {
    ARCHIVE_SUFFIXES
        .iter()
        .find_map(|s| archive_key.strip_suffix(s))
}

/// The manifest key beside `archive_key`.
pub fn manifest_key(archive_key: &str) -> String {
    format!(
        "{}{MANIFEST_SUFFIX}",
        stem(archive_key).unwrap_or(archive_key)
    )
}

/// Whether `key` names an archive.
pub fn is_archive_key(key: &str) -> bool {
    stem(key).is_some()
}

/// The compression of an archive, from its key.
pub fn compression_of(archive_key: &str) -> Option<CompressionKind> {
    if archive_key.ends_with(".tar.gz") {
        Some(CompressionKind::Gzip)
    } else if archive_key.ends_with(".tar.zst") {
        Some(CompressionKind::Zstd)
    } else if archive_key.ends_with(".tar") {
        Some(CompressionKind::None)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_layout() {
        let id = InstanceIdentity {
            instance_id: "i-0abc".into(),
            group: "web".into(),
            region: "us-east-1".into(),
            availability_zone: "us-east-1a".into(),
            instance_type: "m7g.large".into(),
            on_ec2: true,
        };
        let t = time::macros::datetime!(2026-11-20 08:22:01 UTC);
        let k = archive_key("lifeboat/", &id, t, "Scale In!", CompressionKind::Gzip);
        assert_eq!(k, "lifeboat/web/i-0abc/20261120T082201Z-scale-in.tar.gz");
        assert_eq!(
            manifest_key(&k),
            "lifeboat/web/i-0abc/20261120T082201Z-scale-in.manifest.json"
        );
        assert_eq!(compression_of(&k), Some(CompressionKind::Gzip));
        assert!(!is_archive_key(&manifest_key(&k)));
    }

    #[test]
    fn reasons_are_made_key_safe() {
        assert_eq!(key_reason(""), "manual");
        assert_eq!(key_reason("../../etc"), "etc");
        assert_eq!(key_reason("spot interruption"), "spot-interruption");
    }
}
