//! The manifest stored beside every archive, and the object layout both follow:
//! `PREFIX<group>/<owner>/<UTC time>-<reason>.tar.gz` with
//! `PREFIX<group>/<owner>/<UTC time>-<reason>.manifest.json` beside it. The manifest is
//! written only after the archive is complete, so its presence marks a finished backup.
//!
//! `<owner>` is the instance's ARN on EC2 (`arn:aws:ec2:REGION:ACCOUNT:instance/i-…`, so the
//! key reads `…/<group>/arn:aws:ec2:REGION:ACCOUNT:instance/i-…/<file>`): it is what the
//! instance policy's `${ec2:SourceInstanceARN}` variable names, so each instance can write only
//! its own keys. Off EC2 it is the host name; keys written by earlier versions (and by
//! operators' own credentials) have the bare instance id there, and are read alike. A `/` in
//! the group name is written as `%2F`, so the key always has the same number of segments.

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

/// What restore needs of a manifest: read without the file lists (which serde skips without
/// building them: a manifest of a million files does not cost restore a million records).
#[derive(Debug, Clone, Deserialize)]
pub struct Summary {
    /// The instance backed up.
    pub instance: SummaryInstance,
    /// Bytes stored in S3 (the archive object's size).
    pub bytes_stored: u64,
    /// SHA-256 of the archive object, hex.
    pub sha256: String,
    /// The archive was cut short (deadline).
    pub partial: bool,
}

/// The instance in a [`Summary`].
#[derive(Debug, Clone, Deserialize)]
pub struct SummaryInstance {
    /// Its id.
    pub instance_id: String,
    /// Its availability zone.
    #[serde(default)]
    pub availability_zone: String,
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
    format!(
        "{}{}-{}.{}",
        owner_prefix(prefix, identity),
        key_time(started),
        key_reason(reason),
        compression.extension()
    )
}

/// `PREFIX<group>/<owner>/`: where this instance's objects go (see the module docs).
pub fn owner_prefix(prefix: &str, identity: &InstanceIdentity) -> String {
    let owner = identity
        .instance_arn()
        .unwrap_or_else(|| identity.instance_id.clone());
    format!("{prefix}{}/{owner}/", key_group(&identity.group))
}

/// A time as archive names begin with it (`20261127T080000Z`, UTC): sorts as it compares.
pub fn key_time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .unwrap_or_default()
}

/// The time and reason an archive's file name begins with (`20261127T080000Z-scale-in.tar.gz`).
pub fn name_parts(name: &str) -> Option<(OffsetDateTime, &str)> {
    let (time, rest) = name.split_once('-')?;
    let at = time::PrimitiveDateTime::parse(
        time,
        time::macros::format_description!("[year][month][day]T[hour][minute][second]Z"),
    )
    .ok()?
    .assume_utc();
    let reason = stem(rest).unwrap_or(rest);
    Some((at, reason))
}

/// A group name as a key segment: `%` and `/` percent-encoded, so keys keep their segments.
pub fn key_group(group: &str) -> String {
    group.replace('%', "%25").replace('/', "%2F")
}

/// The group name a key segment encodes ([`key_group`] undone).
pub fn group_of_key(segment: &str) -> String {
    segment.replace("%2F", "/").replace("%25", "%")
}

/// What an archive or manifest key says, read strictly: anything but exactly
/// `PREFIX<group>/<instance-id>/<file>` or `PREFIX<group>/arn:…:ec2:…:instance/<instance-id>/<file>`
/// (non-empty segments) is not a lifeboat key. The strictness is what makes the per-instance
/// policy hold: an instance may add segments around its own ARN, but a key with more segments
/// is ignored, so no key it can write reads as another instance's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyParts<'a> {
    /// The group (with `%2F` still encoded).
    pub group: &'a str,
    /// The instance ARN the key is filed under, if it has one.
    pub arn: Option<String>,
    /// The instance id (or host name).
    pub instance_id: &'a str,
    /// The file name.
    pub name: &'a str,
}

/// Parses `key` below `prefix` (see [`KeyParts`]).
pub fn parse_key<'a>(prefix: &str, key: &'a str) -> Option<KeyParts<'a>> {
    let rel = key.strip_prefix(prefix)?;
    let parts: Vec<&str> = rel.split('/').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    match parts[..] {
        [group, instance_id, name] if !instance_id.starts_with("arn:") => Some(KeyParts {
            group,
            arn: None,
            instance_id,
            name,
        }),
        [group, head, instance_id, name] => {
            let fields: Vec<&str> = head.split(':').collect();
            let arn_head = matches!(fields[..], ["arn", p, "ec2", r, a, "instance"]
                if !p.is_empty() && !r.is_empty() && !a.is_empty());
            arn_head.then(|| KeyParts {
                group,
                arn: Some(format!("{head}/{instance_id}")),
                instance_id,
                name,
            })
        }
        _ => None,
    }
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

/// The key of the job log beside `archive_key` (`src/joblog.rs`).
pub fn log_key(archive_key: &str) -> String {
    format!("{}{LOG_SUFFIX}", stem(archive_key).unwrap_or(archive_key))
}

/// How a job log's key ends.
pub const LOG_SUFFIX: &str = ".log";

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
            account_id: "123456789012".into(),
            partition: "aws".into(),
        };
        let t = time::macros::datetime!(2026-11-20 08:22:01 UTC);
        let k = archive_key("lifeboat/", &id, t, "Scale In!", CompressionKind::Gzip);
        assert_eq!(
            k,
            "lifeboat/web/arn:aws:ec2:us-east-1:123456789012:instance/i-0abc/20261120T082201Z-scale-in.tar.gz"
        );
        let parts = parse_key("lifeboat/", &k).unwrap();
        assert_eq!(parts.instance_id, "i-0abc");
        assert_eq!(parts.group, "web");
        // Off EC2 (or without the account): the bare id, as before.
        let host = InstanceIdentity {
            account_id: String::new(),
            group: "team/web".into(),
            ..id
        };
        let k = archive_key("lifeboat/", &host, t, "manual", CompressionKind::Zstd);
        assert_eq!(
            k,
            "lifeboat/team%2Fweb/i-0abc/20261120T082201Z-manual.tar.zst"
        );
        assert_eq!(parse_key("lifeboat/", &k).unwrap().instance_id, "i-0abc");
        assert_eq!(
            manifest_key(&k),
            "lifeboat/team%2Fweb/i-0abc/20261120T082201Z-manual.manifest.json"
        );
        assert_eq!(compression_of(&k), Some(CompressionKind::Zstd));
        assert!(!is_archive_key(&manifest_key(&k)));
    }

    #[test]
    fn reasons_are_made_key_safe() {
        assert_eq!(key_reason(""), "manual");
        assert_eq!(key_reason("../../etc"), "etc");
        assert_eq!(key_reason("spot interruption"), "spot-interruption");
    }

    #[test]
    fn keys_an_instance_can_write_around_its_own_arn_never_read_as_another_instance() {
        // The instance policy allows `PREFIX<group>/${ec2:SourceInstanceARN}/*` (an older one,
        // still attached somewhere, `PREFIX*/…`): every key below has "/arn:…:instance/i-evil/"
        // in it, so i-evil may write them all.
        let evil = "arn:aws:ec2:us-east-1:123456789012:instance/i-evil";
        let victim = "arn:aws:ec2:us-east-1:123456789012:instance/i-victim";
        for key in [
            format!("lb/web/i-victim/{evil}/99991231T000000Z-x.tar.gz"),
            format!("lb/web/{evil}/x/i-victim/99991231T000000Z-x.tar.gz"),
            format!("lb/web/{evil}/{victim}/99991231T000000Z-x.tar.gz"),
            format!("lb/{victim}/{evil}/99991231T000000Z-x.tar.gz"),
            format!("lb//{evil}/99991231T000000Z-x.tar.gz"),
        ] {
            let parsed = parse_key("lb/", &key);
            assert!(
                parsed.as_ref().is_none_or(|p| p.instance_id == "i-evil"),
                "{key} reads as {parsed:?}"
            );
        }
        let own_key = format!("lb/web/{evil}/1.tar.gz");
        let own = parse_key("lb/", &own_key).unwrap();
        assert_eq!(own.arn.as_deref(), Some(evil));
    }
}
