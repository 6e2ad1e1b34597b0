//! The bucket's side of getting data back: listing backups, reading manifests, and opening an
//! archive as a blocking byte stream (for `verify` and `restore`, which run on blocking threads).

use std::io::Read;

use aws_sdk_s3::Client;
use aws_sdk_s3::error::ProvideErrorMetadata;
use time::OffsetDateTime;
use tokio::task::JoinSet;

use crate::config::S3Config;
use crate::manifest;
use crate::upload::sdk_message;

/// User metadata on the manifest object that says whether the backup is complete or partial,
/// so `list` needs a HEAD, not the whole manifest.
pub const STATUS_METADATA: &str = "lifeboat-status";

/// Why the bucket could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Listing the prefix failed.
    #[error("listing s3://{bucket}/{prefix}: {message}")]
    List {
        /// Bucket.
        bucket: String,
        /// Prefix.
        prefix: String,
        /// S3's error.
        message: String,
    },
    /// Reading an object failed.
    #[error("reading s3://{bucket}/{key}: {message}")]
    Get {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// S3's error.
        message: String,
    },
    /// The object is in an archive tier and S3 has not restored a readable copy.
    #[error(
        "s3://{bucket}/{key} is in the {class} storage class: S3 must restore a copy before it \
         can be read. Start that with `aws s3api restore-object --bucket {bucket} --key {key} \
         --restore-request '{{\"Days\":1,\"GlacierJobParameters\":{{\"Tier\":\"Standard\"}}}}'` \
         (hours; Bulk is cheaper, Expedited faster except in DEEP_ARCHIVE), or with `lifeboat \
         restore --request-restore`, and run this again once `aws s3api head-object` shows \
         ongoing-request=\"false\""
    )]
    Archived {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// The object's storage class.
        class: String,
    },
    /// The object is not there.
    #[error("s3://{bucket}/{key} does not exist")]
    NotFound {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
    },
    /// The manifest is not valid JSON of the expected shape.
    #[error("s3://{bucket}/{key} is not a lifeboat manifest: {message}")]
    BadManifest {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// The parser's error.
        message: String,
    },
    /// The key does not name an archive.
    #[error("{key} is not an archive key (expected .tar.gz, .tar.zst or .tar)")]
    NotAnArchive {
        /// The key given.
        key: String,
    },
    /// No backup matches.
    #[error("no backup of instance {instance_id} under s3://{bucket}/{prefix}")]
    NoBackup {
        /// Bucket.
        bucket: String,
        /// Prefix.
        prefix: String,
        /// Instance asked for.
        instance_id: String,
    },
}

/// State of a backup as seen from the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupStatus {
    /// Archive and manifest present; everything configured is in it.
    Complete,
    /// Archive and manifest present; cut short by a deadline.
    Partial,
    /// Archive present without a manifest (the job failed after the upload).
    NoManifest,
    /// The manifest could not be read (no `s3:GetObject` on it, with the per-instance policy).
    Unknown,
}

impl BackupStatus {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Partial => "partial",
            Self::NoManifest => "no-manifest",
            Self::Unknown => "unknown",
        }
    }
}

/// One backup in the bucket.
#[derive(Debug, Clone)]
pub struct BackupEntry {
    /// Archive key.
    pub key: String,
    /// Archive size in bytes.
    pub size: u64,
    /// Group (from the key).
    pub group: String,
    /// Instance id (from the key).
    pub instance_id: String,
    /// The archive's file name, which starts with its UTC time.
    pub name: String,
    /// Status.
    pub status: BackupStatus,
    /// When S3 stored the archive (Unix seconds; 0 if S3 did not say). S3's clock, not a name an
    /// instance chose.
    pub modified: i64,
}

/// Which backups [`list`] returns.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this instance's.
    pub instance_id: Option<String>,
    /// Only this group's: the listing itself is narrowed to the group's prefix.
    pub group: Option<String>,
    /// Only those started at or after this time (the UTC time their names begin with).
    pub since: Option<OffsetDateTime>,
    /// At most this many, newest first.
    pub limit: Option<usize>,
}

/// Lists backups under the configured prefix, newest first, as `filter` narrows them. The
/// listing pages through S3 keeping only the key names that pass the filter; the manifests are
/// looked at (one HEAD each) only for the backups returned, so `--limit 20` over a group of
/// 100,000 archives makes 20 HEADs.
pub async fn list(
    client: &Client,
    s3: &S3Config,
    filter: &ListFilter,
) -> Result<Vec<BackupEntry>, CatalogError> {
    let prefix = match &filter.group {
        Some(g) => format!("{}{}/", s3.prefix, manifest::key_group(g)),
        None => s3.prefix.clone(),
    };
    let since = filter.since.map(manifest::key_time);
    let mut pages = client
        .list_objects_v2()
        .bucket(&s3.bucket)
        .prefix(&prefix)
        .set_expected_bucket_owner(owner(s3))
        .into_paginator()
        .send();
    let mut archives = Vec::new();
    let mut manifests = std::collections::HashSet::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| CatalogError::List {
            bucket: s3.bucket.clone(),
            prefix: prefix.clone(),
            message: sdk_message(&e),
        })?;
        for obj in page.contents() {
            let Some(key) = obj.key() else { continue };
            let Some(parts) = manifest::parse_key(&s3.prefix, key) else {
                continue;
            };
            if filter
                .instance_id
                .as_deref()
                .is_some_and(|want| want != parts.instance_id)
                || since.as_deref().is_some_and(|t| parts.name < t)
            {
                continue;
            }
            if key.ends_with(manifest::MANIFEST_SUFFIX) {
                manifests.insert(key.to_owned());
            } else if manifest::is_archive_key(key) {
                archives.push(BackupEntry {
                    key: key.to_owned(),
                    size: u64::try_from(obj.size().unwrap_or(0)).unwrap_or(0),
                    group: manifest::group_of_key(parts.group),
                    instance_id: parts.instance_id.to_owned(),
                    name: parts.name.to_owned(),
                    status: BackupStatus::NoManifest,
                    modified: obj.last_modified().map_or(0, |t| t.secs()),
                });
            }
        }
    }
    // Names start with a sortable UTC time: newest first.
    archives.sort_by(|a, b| b.name.cmp(&a.name).then_with(|| b.key.cmp(&a.key)));
    if let Some(limit) = filter.limit {
        archives.truncate(limit);
    }
    // HEAD each manifest for its status, a few at a time.
    let mut heads = JoinSet::new();
    for i in 0..archives.len() {
        let mkey = manifest::manifest_key(&archives[i].key);
        if !manifests.contains(&mkey) {
            continue;
        }
        let (client, bucket, owner) = (client.clone(), s3.bucket.clone(), owner(s3));
        heads.spawn(async move {
            let head = client
                .head_object()
                .bucket(bucket)
                .key(mkey)
                .set_expected_bucket_owner(owner)
                .send()
                .await;
            let partial = head.ok().map(|h| {
                h.metadata()
                    .and_then(|m| m.get(STATUS_METADATA))
                    .is_some_and(|s| s == "partial")
            });
            (i, partial)
        });
        if heads.len() >= 16 {
            if let Some(Ok((i, partial))) = heads.join_next().await {
                archives[i].status = status(partial);
            }
        }
    }
    while let Some(done) = heads.join_next().await {
        if let Ok((i, partial)) = done {
            archives[i].status = status(partial);
        }
    }
    Ok(archives)
}

/// The status from the manifest's HEAD: `None` when it could not be read.
fn status(partial: Option<bool>) -> BackupStatus {
    match partial {
        Some(true) => BackupStatus::Partial,
        Some(false) => BackupStatus::Complete,
        None => BackupStatus::Unknown,
    }
}

fn owner(s3: &S3Config) -> Option<String> {
    (!s3.expected_bucket_owner.is_empty()).then(|| s3.expected_bucket_owner.clone())
}

/// The newest complete backup of `instance_id` (a partial one is restored only by its key).
pub async fn latest(
    client: &Client,
    s3: &S3Config,
    instance_id: &str,
) -> Result<BackupEntry, CatalogError> {
    // The newest complete one: a partial or unverifiable archive is restored only when named.
    let filter = ListFilter {
        instance_id: Some(instance_id.to_owned()),
        ..ListFilter::default()
    };
    list(client, s3, &filter)
        .await?
        .into_iter()
        .find(|e| e.status == BackupStatus::Complete)
        .ok_or_else(|| CatalogError::NoBackup {
            bucket: s3.bucket.clone(),
            prefix: s3.prefix.clone(),
            instance_id: instance_id.to_owned(),
        })
}

/// Reads the manifest beside `archive_key`, as a whole [`manifest::Manifest`] or as the part of it `M`
/// holds ([`manifest::Summary`]).
pub async fn manifest<M: serde::de::DeserializeOwned>(
    client: &Client,
    s3: &S3Config,
    archive_key: &str,
) -> Result<M, CatalogError> {
    if !manifest::is_archive_key(archive_key) {
        return Err(CatalogError::NotAnArchive {
            key: archive_key.to_owned(),
        });
    }
    let key = manifest::manifest_key(archive_key);
    let body = get(client, s3, &key).await?;
    let bytes = body
        .body
        .collect()
        .await
        .map_err(|e| CatalogError::Get {
            bucket: s3.bucket.clone(),
            key: key.clone(),
            message: e.to_string(),
        })?
        .into_bytes();
    serde_json::from_slice(&bytes).map_err(|e| CatalogError::BadManifest {
        bucket: s3.bucket.clone(),
        key,
        message: e.to_string(),
    })
}

async fn get(
    client: &Client,
    s3: &S3Config,
    key: &str,
) -> Result<aws_sdk_s3::operation::get_object::GetObjectOutput, CatalogError> {
    client
        .get_object()
        .bucket(&s3.bucket)
        .key(key)
        .set_expected_bucket_owner(owner(s3))
        .send()
        .await
        .map_err(|e| get_error(s3, key, &e))
}

/// A GetObject failure: [`CatalogError::NotFound`] when the object is not there.
fn get_error(
    s3: &S3Config,
    key: &str,
    e: &aws_sdk_s3::error::SdkError<aws_sdk_s3::operation::get_object::GetObjectError>,
) -> CatalogError {
    use aws_sdk_s3::operation::get_object::GetObjectError;
    if let Some(GetObjectError::InvalidObjectState(state)) = e.as_service_error() {
        return CatalogError::Archived {
            bucket: s3.bucket.clone(),
            key: key.to_owned(),
            class: state
                .storage_class()
                .map_or("GLACIER or DEEP_ARCHIVE", |c| c.as_str())
                .to_owned(),
        };
    }
    if e.code() == Some("NoSuchKey") || e.raw_response().is_some_and(|r| r.status().as_u16() == 404)
    {
        CatalogError::NotFound {
            bucket: s3.bucket.clone(),
            key: key.to_owned(),
        }
    } else {
        CatalogError::Get {
            bucket: s3.bucket.clone(),
            key: key.to_owned(),
            message: sdk_message(e),
        }
    }
}

/// Asks S3 to restore a readable copy of an archive in an archive tier for a day (Standard
/// tier): `true` when asked now, `false` when a restore was already in progress.
pub async fn request_restore(
    client: &Client,
    s3: &S3Config,
    key: &str,
) -> Result<bool, CatalogError> {
    use aws_sdk_s3::types::{GlacierJobParameters, RestoreRequest, Tier};
    let job = GlacierJobParameters::builder()
        .tier(Tier::Standard)
        .build()
        .map_err(|e| CatalogError::Get {
            bucket: s3.bucket.clone(),
            key: key.to_owned(),
            message: e.to_string(),
        })?;
    let sent = client
        .restore_object()
        .bucket(&s3.bucket)
        .key(key)
        .set_expected_bucket_owner(owner(s3))
        .restore_request(
            RestoreRequest::builder()
                .days(1)
                .glacier_job_parameters(job)
                .build(),
        )
        .send()
        .await;
    match sent {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some("RestoreAlreadyInProgress") => Ok(false),
        Err(e) => Err(CatalogError::Get {
            bucket: s3.bucket.clone(),
            key: key.to_owned(),
            message: format!("RestoreObject: {}", sdk_message(&e)),
        }),
    }
}

/// Opens an archive as a blocking reader (for use on a blocking thread), fetched in ranges
/// ([`crate::download`]), and returns its size.
pub async fn open_archive(
    client: &Client,
    s3: &S3Config,
    key: &str,
) -> Result<(Box<dyn Read + Send>, u64), CatalogError> {
    if !manifest::is_archive_key(key) {
        return Err(CatalogError::NotAnArchive {
            key: key.to_owned(),
        });
    }
    let first = client
        .get_object()
        .bucket(&s3.bucket)
        .key(key)
        .range(crate::download::first_range())
        .set_expected_bucket_owner(owner(s3))
        .send()
        .await;
    let first = match first {
        Ok(out) => out,
        // An empty object has no first byte to ask for.
        Err(e) if e.code() == Some("InvalidRange") => get(client, s3, key).await?,
        Err(e) => return Err(get_error(s3, key, &e)),
    };
    let source = crate::download::Source {
        client: client.clone(),
        bucket: s3.bucket.clone(),
        key: key.to_owned(),
        expected_bucket_owner: owner(s3),
        read_timeout: s3.read_timeout,
    };
    Ok(crate::download::open(
        source,
        crate::download::First {
            content_range: first.content_range().map(str::to_owned),
            etag: first.e_tag().map(str::to_owned),
            content_length: u64::try_from(first.content_length().unwrap_or(0)).unwrap_or(0),
            body: first.body,
        },
    ))
}
