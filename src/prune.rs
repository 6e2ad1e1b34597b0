//! `lifeboat prune`: applies `[retention]` to the archives under the prefix, per instance.
//!
//! An archive is kept if any rule keeps it: it is its instance's newest complete archive
//! (always, whatever the rules say, so that an instance's data can always come back), one of
//! its instance's newest `keep_last`, or stored within `keep_within`. Ages and order are S3's
//! (`LastModified`), not the names instances chose. Everything else is deleted with its
//! manifest, only with `--apply`; without it, prune says what it would delete. Deleting needs
//! `s3:DeleteObject` on the archives, which the per-instance policy does not grant: prune is an
//! operator's command (or a role's made for it). In a versioned bucket a deleted archive stays
//! recoverable as a noncurrent version until the bucket's lifecycle rule expires it.

use std::collections::BTreeMap;

use aws_sdk_s3::Client;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};

use crate::catalog::{self, BackupEntry, BackupStatus, CatalogError, ListFilter};
use crate::config::{RetentionConfig, S3Config};
use crate::manifest;
use crate::upload::sdk_message;

/// Why prune could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// No rule is configured: everything would be deleted but the newest.
    #[error(
        "no retention rule in {path}: set retention.keep_last or retention.keep_within (prune \
         never deletes an instance's newest complete archive, but would delete every other)"
    )]
    NoRules {
        /// The configuration file.
        path: String,
    },
    /// Listing failed.
    #[error(transparent)]
    List(#[from] CatalogError),
    /// DeleteObjects failed, or refused some keys.
    #[error("deleting from s3://{bucket}: {message}")]
    Delete {
        /// Bucket.
        bucket: String,
        /// S3's error, or the keys it refused and why.
        message: String,
    },
}

/// What prune does with one archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Kept, and the first rule that keeps it.
    Keep(&'static str),
    /// Deleted, with its manifest.
    Delete,
}

/// Decides, per instance, which of `entries` are kept (see the module's rules); `now` is in Unix
/// seconds. Returns every entry with its verdict, each instance's newest first.
pub fn decide(
    entries: Vec<BackupEntry>,
    cfg: &RetentionConfig,
    now: i64,
) -> Vec<(BackupEntry, Verdict)> {
    let mut by_instance: BTreeMap<String, Vec<BackupEntry>> = BTreeMap::new();
    for e in entries {
        by_instance
            .entry(e.instance_id.clone())
            .or_default()
            .push(e);
    }
    let mut out = Vec::new();
    for (_, mut archives) in by_instance {
        archives.sort_by(|a, b| b.modified.cmp(&a.modified).then_with(|| b.key.cmp(&a.key)));
        let newest_complete = archives
            .iter()
            .position(|e| e.status == BackupStatus::Complete);
        for (i, e) in archives.into_iter().enumerate() {
            let verdict = if Some(i) == newest_complete {
                Verdict::Keep("newest complete")
            } else if cfg.keep_last.is_some_and(|n| i < n) {
                Verdict::Keep("keep_last")
            } else if cfg
                .keep_within
                .is_some_and(|d| now - e.modified <= i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            {
                Verdict::Keep("keep_within")
            } else {
                Verdict::Delete
            };
            out.push((e, verdict));
        }
    }
    out
}

/// Lists the archives `filter` selects and decides on each.
pub async fn plan(
    client: &Client,
    s3: &S3Config,
    cfg: &RetentionConfig,
    filter: &ListFilter,
    source: &std::path::Path,
) -> Result<Vec<(BackupEntry, Verdict)>, PruneError> {
    if cfg.keep_last.is_none() && cfg.keep_within.is_none() {
        return Err(PruneError::NoRules {
            path: source.display().to_string(),
        });
    }
    let entries = catalog::list(client, s3, filter).await?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    Ok(decide(entries, cfg, now))
}

/// Deletes `archives` and their manifests (DeleteObjects, 500 archives a request); returns how
/// many objects went.
pub async fn delete(
    client: &Client,
    s3: &S3Config,
    archives: &[String],
) -> Result<usize, PruneError> {
    let mut deleted = 0;
    for batch in archives.chunks(500) {
        let objects = batch
            .iter()
            .flat_map(|k| [k.clone(), manifest::manifest_key(k), manifest::log_key(k)])
            .map(|k| ObjectIdentifier::builder().key(k).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PruneError::Delete {
                bucket: s3.bucket.clone(),
                message: e.to_string(),
            })?;
        let request = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .map_err(|e| PruneError::Delete {
                bucket: s3.bucket.clone(),
                message: e.to_string(),
            })?;
        let out = client
            .delete_objects()
            .bucket(&s3.bucket)
            .set_expected_bucket_owner(
                (!s3.expected_bucket_owner.is_empty()).then(|| s3.expected_bucket_owner.clone()),
            )
            .delete(request)
            .send()
            .await
            .map_err(|e| PruneError::Delete {
                bucket: s3.bucket.clone(),
                message: sdk_message(&e),
            })?;
        let refused: Vec<String> = out
            .errors()
            .iter()
            .map(|e| {
                format!(
                    "{}: {} {}",
                    e.key().unwrap_or_default(),
                    e.code().unwrap_or_default(),
                    e.message().unwrap_or_default()
                )
            })
            .collect();
        if !refused.is_empty() {
            return Err(PruneError::Delete {
                bucket: s3.bucket.clone(),
                message: format!("{} refused: {}", refused.len(), refused.join("; ")),
            });
        }
        deleted += batch.len() * 3;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(instance: &str, modified: i64, status: BackupStatus) -> BackupEntry {
        BackupEntry {
            key: format!("p/g/{instance}/{modified}-x.tar.gz"),
            size: 1,
            group: "g".into(),
            instance_id: instance.into(),
            name: format!("{modified}-x.tar.gz"),
            status,
            modified,
        }
    }

    fn verdicts(out: &[(BackupEntry, Verdict)]) -> Vec<(String, i64, Verdict)> {
        out.iter()
            .map(|(e, v)| (e.instance_id.clone(), e.modified, *v))
            .collect()
    }

    #[test]
    fn the_newest_complete_archive_of_every_instance_is_kept_whatever_the_rules() {
        use BackupStatus::{Complete, NoManifest, Partial};
        let entries = vec![
            entry("i-a", 100, Complete),
            entry("i-a", 300, Partial),
            entry("i-a", 200, NoManifest),
            entry("i-a", 50, Complete),
            entry("i-b", 10, Complete),
        ];
        let cfg = RetentionConfig {
            keep_last: Some(1),
            keep_within: None,
            after_backup: false,
        };
        assert_eq!(
            verdicts(&decide(entries.clone(), &cfg, 1000)),
            vec![
                ("i-a".into(), 300, Verdict::Keep("keep_last")),
                ("i-a".into(), 200, Verdict::Delete),
                ("i-a".into(), 100, Verdict::Keep("newest complete")),
                ("i-a".into(), 50, Verdict::Delete),
                ("i-b".into(), 10, Verdict::Keep("newest complete")),
            ]
        );
        // By age: what S3 stored within 850 s of now (1000) stays.
        let cfg = RetentionConfig {
            keep_last: None,
            keep_within: Some(Duration::from_secs(850)),
            after_backup: false,
        };
        assert_eq!(
            verdicts(&decide(entries, &cfg, 1000)),
            vec![
                ("i-a".into(), 300, Verdict::Keep("keep_within")),
                ("i-a".into(), 200, Verdict::Keep("keep_within")),
                ("i-a".into(), 100, Verdict::Keep("newest complete")),
                ("i-a".into(), 50, Verdict::Delete),
                ("i-b".into(), 10, Verdict::Keep("newest complete")),
            ]
        );
    }
}
