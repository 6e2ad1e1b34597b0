//! Parts too large for the part pool, staged: such a part is uploaded as an object of its own,
//! in parts the pool holds, then copied into the archive's upload as one part (UploadPartCopy)
//! and the staged object deleted.
//!
//! Parts double every 900 parts so that any stream fits S3's 10,000 parts: a 5 TiB stream ends
//! in parts of gibibytes, more than `backup.memory_limit` holds. Staging keeps what the agent
//! holds within the pool whatever the stream's size, for the price of a server-side copy of
//! each staged part (the bytes cross the instance's network once) and, for the seconds between
//! a staged object's completion and its deletion, that part's storage twice. Only parts past
//! half the pool are staged: at the default limit, after 49 GiB of compressed stream at two
//! workers, 21 GiB at sixteen.
//!
//! A staged object's key is the archive's key plus `.staging/part-NNNNN`: under the instance's
//! own prefix, which its IAM policy already lets it write and read, and never taken for an
//! archive by `list` or `restore`. Deleting it needs `s3:DeleteObject` and
//! `s3:DeleteObjectVersion` on `*.staging/*` only (the packaged policies grant that; without
//! it the backup still succeeds and the object is left, logged). It is stored as STANDARD
//! whatever `s3.storage_class` says: an object that lives seconds must not pay a class's
//! minimum storage duration. The [`Registry`] lists what exists, so that an abort removes staged
//! uploads and objects with the archive's upload.

use std::sync::{Arc, Mutex};

use aws_sdk_s3::Client;
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use tokio::task::JoinSet;

use super::{Destination, UploadError, sdk_message};

/// Whether a part of `size` bytes is staged with a part pool of `pool` bytes: when it is more
/// than half the pool, so one part fills while another uploads.
pub fn is_staged(size: u64, pool: u64) -> bool {
    size.saturating_mul(2) > pool
}

/// The key of final part `number`'s staged object.
pub fn staging_key(archive_key: &str, number: i32) -> String {
    format!("{archive_key}.staging/part-{number:05}")
}

/// A staged object and how far it got.
#[derive(Debug, Clone)]
enum State {
    /// Its multipart upload is open.
    Uploading(String),
    /// It exists, as this version (`None` in an unversioned bucket).
    Stored(Option<String>),
}

/// Staged uploads and objects not yet removed, shared by the writer, its tasks and its abort
/// handle. A completion holds the gate until its outcome is recorded, even when its task is
/// aborted meanwhile, so that an abort never mistakes a just-completed object for an upload.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    all: Arc<Mutex<Vec<(String, State)>>>,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl Registry {
    fn set(&self, key: &str, state: State) {
        let mut all = self.all.lock().expect("not poisoned");
        match all.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = state,
            None => all.push((key.to_owned(), state)),
        }
    }

    fn remove(&self, key: &str) {
        self.all
            .lock()
            .expect("not poisoned")
            .retain(|(k, _)| k != key);
    }

    /// Records the open upload of a staged object.
    pub fn started(&self, key: &str, upload_id: &str) {
        self.set(key, State::Uploading(upload_id.to_owned()));
    }

    /// Removes every staged upload and object still listed; failures are logged.
    pub async fn clean(&self, client: &Client, dest: &Destination) {
        let _gate = self.gate.lock().await;
        let all = std::mem::take(&mut *self.all.lock().expect("not poisoned"));
        for (key, state) in all {
            let result = match &state {
                State::Uploading(id) => match client
                    .abort_multipart_upload()
                    .bucket(&dest.bucket)
                    .key(&key)
                    .upload_id(id)
                    .set_expected_bucket_owner(dest.expected_bucket_owner.clone())
                    .send()
                    .await
                {
                    Ok(_) => Ok(()),
                    // Completed by a request whose answer never came back: the object exists
                    // (in a versioned bucket this leaves a delete marker over it).
                    Err(e) if e.code() == Some("NoSuchUpload") => {
                        delete(client, dest, &key, None).await
                    }
                    Err(e) => Err(sdk_message(&e)),
                },
                State::Stored(version) => delete(client, dest, &key, version.clone()).await,
            };
            if let Err(message) = result {
                tracing::error!(
                    bucket = %dest.bucket,
                    %key,
                    %message,
                    "could not remove a staged part: delete it by hand"
                );
            }
        }
    }
}

async fn delete(
    client: &Client,
    dest: &Destination,
    key: &str,
    version: Option<String>,
) -> Result<(), String> {
    client
        .delete_object()
        .bucket(&dest.bucket)
        .key(key)
        .set_version_id(version)
        .set_expected_bucket_owner(dest.expected_bucket_owner.clone())
        .send()
        .await
        .map(|_| ())
        .map_err(|e| sdk_message(&e))
}

/// `bucket/key?versionId=…`, percent-encoded as `x-amz-copy-source` wants it.
fn copy_source(bucket: &str, key: &str, version: Option<&str>) -> String {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    const KEEP: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    let mut out = format!(
        "{}/{}",
        utf8_percent_encode(bucket, KEEP),
        utf8_percent_encode(key, KEEP)
    );
    if let Some(v) = version {
        out.push_str("?versionId=");
        out.extend(utf8_percent_encode(v, KEEP));
    }
    out
}

/// A staged part whose bytes have all been handed to uploads.
pub struct Filled {
    /// The final part's number.
    pub number: i32,
    /// The staged object.
    pub staged: Arc<Destination>,
    /// Its multipart upload.
    pub upload_id: String,
    /// Its part uploads, running or done.
    pub tasks: JoinSet<Result<CompletedPart, UploadError>>,
    /// Its parts already uploaded.
    pub parts: Vec<CompletedPart>,
    /// The base64 CRC32C of all its bytes: the final part's checksum.
    pub crc32c: String,
    /// Its size.
    pub bytes: u64,
}

/// The slowest S3 is assumed to copy a part server-side.
const SLOWEST_COPY_RATE: u64 = 16 * 1024 * 1024;

/// How long one attempt at copying a part of `bytes` in may take: its size at
/// [`SLOWEST_COPY_RATE`] (5 min 20 s for S3's largest part), at least two minutes.
pub fn copy_attempt_timeout(bytes: u64) -> std::time::Duration {
    std::time::Duration::from_secs(bytes.div_ceil(SLOWEST_COPY_RATE).max(120))
}

/// Waits for a staged part's uploads, completes its object, copies it into the archive's upload
/// `upload_id` as part `filled.number`, and deletes it. The copy's checksum, when S3 gives one,
/// must be the one computed from the bytes as they were written.
pub async fn copy_in(
    client: Client,
    archive: Arc<Destination>,
    upload_id: String,
    mut filled: Filled,
    registry: Registry,
) -> Result<CompletedPart, UploadError> {
    let staged = Arc::clone(&filled.staged);
    let part_error = |message: String| UploadError::Part {
        bucket: archive.bucket.clone(),
        key: staged.key.clone(),
        part: filled.number,
        message,
    };
    while let Some(done) = filled.tasks.join_next().await {
        match done {
            Ok(Ok(part)) => filled.parts.push(part),
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(part_error(format!("part upload task failed: {e}"))),
        }
    }
    filled.parts.sort_by_key(|p| p.part_number());
    // Completed and recorded in a task of its own, which an abort of this one does not stop.
    let gate = Arc::clone(&registry.gate).lock_owned().await;
    let completion = tokio::spawn({
        let (client, staged, registry) = (client.clone(), Arc::clone(&staged), registry.clone());
        let (upload_id, parts) = (filled.upload_id.clone(), std::mem::take(&mut filled.parts));
        async move {
            let _gate = gate;
            let out = client
                .complete_multipart_upload()
                .bucket(&staged.bucket)
                .key(&staged.key)
                .upload_id(upload_id)
                .set_expected_bucket_owner(staged.expected_bucket_owner.clone())
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| UploadError::Complete {
                    bucket: staged.bucket.clone(),
                    key: staged.key.clone(),
                    message: sdk_message(&e),
                })?;
            let version = out.version_id().map(str::to_owned);
            registry.set(&staged.key, State::Stored(version.clone()));
            Ok(version)
        }
    });
    let version = completion
        .await
        .map_err(|e| part_error(format!("completing the staged part: {e}")))??;
    let copied = client
        .upload_part_copy()
        .bucket(&archive.bucket)
        .key(&archive.key)
        .upload_id(&upload_id)
        .part_number(filled.number)
        .copy_source(copy_source(&staged.bucket, &staged.key, version.as_deref()))
        .set_expected_bucket_owner(archive.expected_bucket_owner.clone())
        .set_expected_source_bucket_owner(archive.expected_bucket_owner.clone())
        .customize()
        .config_override({
            let attempt = copy_attempt_timeout(filled.bytes);
            aws_sdk_s3::config::Builder::default().timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(std::time::Duration::from_secs(5))
                    .operation_attempt_timeout(attempt)
                    .operation_timeout(2 * attempt)
                    .build(),
            )
        })
        .send()
        .await
        .map_err(|e| UploadError::Part {
            bucket: archive.bucket.clone(),
            key: archive.key.clone(),
            part: filled.number,
            message: format!("copying {} in: {}", staged.key, sdk_message(&e)),
        })?;
    let result = copied.copy_part_result();
    if let Some(theirs) = result.and_then(|r| r.checksum_crc32_c())
        && theirs != filled.crc32c
    {
        return Err(UploadError::Part {
            bucket: archive.bucket.clone(),
            key: archive.key.clone(),
            part: filled.number,
            message: format!(
                "the copy of {} has CRC32C {theirs}, but its bytes had {}",
                staged.key, filled.crc32c
            ),
        });
    }
    match delete(&client, &staged, &staged.key, version).await {
        Ok(()) => registry.remove(&staged.key),
        // Kept listed: an abort tries again; a finished backup logs it.
        Err(message) => tracing::warn!(
            key = %staged.key,
            %message,
            "could not delete a staged part after copying it in"
        ),
    }
    tracing::debug!(part = filled.number, key = %staged.key, "staged part copied in");
    Ok(CompletedPart::builder()
        .part_number(filled.number)
        .set_e_tag(result.and_then(|r| r.e_tag()).map(str::to_owned))
        .checksum_crc32_c(filled.crc32c)
        .build())
}

/// Staged objects a finished backup could not delete, logged once each.
pub fn report_leftovers(registry: &Registry, bucket: &str) {
    for (key, _) in registry.all.lock().expect("not poisoned").iter() {
        tracing::warn!(
            %bucket,
            %key,
            "a staged part was left behind (no s3:DeleteObject on *.staging/*?): delete it by hand"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_sources_are_percent_encoded_but_keep_slashes() {
        assert_eq!(
            copy_source(
                "b-1",
                "lb/web/arn:aws:ec2:us-east-1:1:instance/i-0a/x.tar.gz.staging/part-00901",
                Some("v+1")
            ),
            "b-1/lb/web/arn%3Aaws%3Aec2%3Aus-east-1%3A1%3Ainstance/i-0a/x.tar.gz.staging/part-00901?versionId=v%2B1"
        );
        assert_eq!(copy_source("b", "a b", None), "b/a%20b");
    }

    #[test]
    fn copies_of_large_parts_get_time_for_their_size() {
        use std::time::Duration;
        assert_eq!(copy_attempt_timeout(64 << 20), Duration::from_secs(120));
        assert_eq!(copy_attempt_timeout(5 << 30), Duration::from_secs(320));
    }

    #[test]
    fn parts_past_half_the_pool_are_staged() {
        assert!(!is_staged(32 << 20, 64 << 20));
        assert!(is_staged((32 << 20) + 1, 64 << 20));
    }
}
