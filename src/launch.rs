//! Restore on launch: which archive a launching instance takes over from its group
//! (`[restore]`), and the record that it did, so that a reboot does not restore again over
//! newer data.
//!
//! The newest archive is chosen by the time S3 stored it, not by its name: names are chosen by
//! the instance that wrote them. Only complete archives count (partial ones too with
//! `restore.partial`), never the launching instance's own, and none older than
//! `restore.max_age`. With `from = "az"`, the archive's manifest must name this instance's
//! availability zone. The restore itself is `lifeboat restore`'s, verified against the manifest
//! before anything is written.

use std::path::{Path, PathBuf};

use aws_sdk_s3::Client;
use time::OffsetDateTime;

use crate::catalog::{self, BackupEntry, BackupStatus, CatalogError, ListFilter};
use crate::config::{RestoreConfig, RestoreFrom, S3Config};
use crate::identity::InstanceIdentity;
use crate::manifest::Summary;

/// The archive of `identity`'s group that a launch restores, or `None` when there is none.
pub async fn choose(
    client: &Client,
    s3: &S3Config,
    identity: &InstanceIdentity,
    cfg: &RestoreConfig,
    now: OffsetDateTime,
) -> Result<Option<BackupEntry>, CatalogError> {
    let filter = ListFilter {
        group: Some(identity.group.clone()),
        ..ListFilter::default()
    };
    let oldest = cfg
        .max_age
        .map(|age| now.unix_timestamp() - i64::try_from(age.as_secs()).unwrap_or(i64::MAX));
    let mut candidates: Vec<BackupEntry> = catalog::list(client, s3, &filter)
        .await?
        .into_iter()
        .filter(|e| e.instance_id != identity.instance_id)
        .filter(|e| {
            e.status == BackupStatus::Complete || (cfg.partial && e.status == BackupStatus::Partial)
        })
        .filter(|e| oldest.is_none_or(|t| e.modified >= t))
        .collect();
    candidates.sort_by(|a, b| b.modified.cmp(&a.modified).then_with(|| b.key.cmp(&a.key)));
    for entry in candidates {
        if cfg.from == RestoreFrom::Az {
            let summary: Summary = catalog::manifest(client, s3, &entry.key).await?;
            if summary.instance.availability_zone != identity.availability_zone {
                continue;
            }
        }
        return Ok(Some(entry));
    }
    Ok(None)
}

/// Where the record of a launch's restore is kept.
pub fn marker(state_dir: &Path) -> PathBuf {
    state_dir.join("restored-on-launch")
}

/// What an earlier run recorded for `instance_id`: the line it wrote, if it was this instance's.
pub fn already_done(state_dir: &Path, instance_id: &str) -> Option<String> {
    let text = std::fs::read_to_string(marker(state_dir)).ok()?;
    let line = text.lines().next()?.to_owned();
    (line.split(' ').next() == Some(instance_id)).then_some(line)
}

/// Records that this instance's launch restore is done (`what`: the archive, or that there was
/// none), atomically.
pub fn record_done(state_dir: &Path, instance_id: &str, what: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let path = marker(state_dir);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{instance_id} {what}\n"))?;
    std::fs::rename(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_is_per_instance() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(already_done(dir.path(), "i-1"), None);
        record_done(dir.path(), "i-1", "s3://b/k").unwrap();
        assert_eq!(
            already_done(dir.path(), "i-1").as_deref(),
            Some("i-1 s3://b/k")
        );
        // An image made from this instance's disk launches as another instance: it restores.
        assert_eq!(already_done(dir.path(), "i-2"), None);
    }
}
