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
//!
//! With a launch lifecycle hook the instance waits in `Pending:Wait` while the restore runs:
//! [`held_by_hook`] finds the action, [`keep_alive`] heartbeats it, and the caller completes it
//! CONTINUE once the data is in place (or there was none and `if_none = "continue"`), ABANDON
//! as `if_none` / `on_failure` say otherwise. Without a hook, the restore runs at first boot,
//! before the units that require `lifeboat-restore.service`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_s3::Client;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::lifecycle::{ActionRef, Hook, LAUNCHING, Lifecycle, LifecycleError, PENDING_WAIT};

use crate::catalog::{self, BackupEntry, BackupStatus, CatalogError, ListFilter};
use crate::config::{RestoreConfig, RestoreFrom, S3Config};
use crate::identity::InstanceIdentity;
use crate::manifest::Summary;

/// Why the launch action could not be found.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// An Auto Scaling call failed.
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    /// The instance waits in Pending:Wait, but the group has no launch hook by that name, or
    /// several and none is configured.
    #[error(
        "instance {instance_id} waits in Pending:Wait, but group {group} has {found}: set \
         restore.hook_name to the launch hook lifeboat completes"
    )]
    Hook {
        /// The instance.
        instance_id: String,
        /// The group.
        group: String,
        /// What the group has.
        found: String,
    },
}

/// How long the calls that find the action may keep retrying.
const FIND_BUDGET: Duration = Duration::from_secs(60);

/// The launch lifecycle action holding `instance_id` in `Pending:Wait`, with its hook; `None`
/// when the instance is not held (no launch hook, not in a group, or already in service).
pub async fn held_by_hook(
    lifecycle: &Lifecycle,
    instance_id: &str,
    configured: Option<&str>,
) -> Result<Option<(ActionRef, Hook)>, LaunchError> {
    let until = Instant::now() + FIND_BUDGET;
    let Some((group, state)) = lifecycle.describe_instance(instance_id, until).await? else {
        return Ok(None);
    };
    if state != PENDING_WAIT {
        return Ok(None);
    }
    let hooks = lifecycle
        .hooks(&group, LAUNCHING, instance_id, until)
        .await?;
    let names = || {
        hooks
            .iter()
            .map(|h| h.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let hook = match configured {
        Some(name) => hooks.iter().find(|h| h.name == name).cloned(),
        None if hooks.len() == 1 => hooks.first().cloned(),
        None => None,
    };
    let Some(hook) = hook else {
        return Err(LaunchError::Hook {
            instance_id: instance_id.to_owned(),
            group,
            found: match (configured, hooks.len()) {
                (Some(name), _) => format!("no launch hook named {name} (it has: {})", names()),
                (None, 0) => "no launch hook".into(),
                (None, _) => format!("several launch hooks ({})", names()),
            },
        });
    };
    let action = ActionRef {
        group,
        hook: hook.name.clone(),
        instance_id: instance_id.to_owned(),
        token: None,
    };
    Ok(Some((action, hook)))
}

/// Heartbeats `action` every half of `hook`'s heartbeat timeout (at least every 5 s) until the
/// returned task is aborted; failures are logged, and the next beat tries again.
pub fn keep_alive(
    lifecycle: Lifecycle,
    action: ActionRef,
    hook: &Hook,
) -> tokio::task::JoinHandle<()> {
    let every = (hook.heartbeat_timeout / 2).max(Duration::from_secs(5));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match lifecycle.heartbeat(&action, Instant::now() + every).await {
                Ok(true) => tracing::debug!(hook = %action.hook, "launch action heartbeat"),
                Ok(false) => {
                    tracing::warn!(hook = %action.hook, "the launch action is no longer active");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "launch action heartbeat failed"),
            }
        }
    })
}

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

/// Takes the launch restore's lock (`state_dir/restore-on-launch.lock`), waiting while another
/// run holds it: the boot unit and the Run Command path may both start one, and the second
/// must find the first's record instead of restoring the same data again beside it.
pub async fn lock(state_dir: &Path) -> std::io::Result<std::fs::File> {
    let (file, _) = crate::state::lock_file(&state_dir.join("restore-on-launch.lock"), || {
        println!("another launch restore is running on this instance: waiting for it");
    })
    .await?;
    Ok(file)
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
