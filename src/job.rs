//! The backup job: one backup, walk → tar → compress → S3, on a blocking thread with the upload on
//! the async runtime. It hashes the stored bytes, writes the manifest once the archive is complete,
//! and on any failure or cancellation aborts the multipart upload so nothing is left behind.
//!
//! It also owns the vocabulary of a job's outcome ([`JobStatus`], [`ActionOutcome`],
//! [`JobResult`]), which the runner fills in, `state` records and the CLI maps to exit codes. The
//! story around a job (deadline, heartbeats, completion, report) is [`crate::runner`]'s.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::archive::{self, ArchiveError, ArchiveOptions, ArchiveReport, Counters, TarSink};
use crate::compress::{self, Compressor};
use crate::config::Config;
use crate::identity::InstanceIdentity;
use crate::lifecycle::LifecycleResult;
use crate::manifest::{self, Manifest};
use crate::upload::{self, Destination, ObjectWriter, Parts, StoredObject, UploadError};
use crate::watch::NoticeSource;

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Everything configured is in S3.
    Succeeded,
    /// A valid archive is in S3 but the deadline cut it short.
    Partial,
    /// Nothing usable was stored.
    Failed,
    /// Interrupted (SIGINT / SIGTERM): the upload was aborted and the lifecycle action left
    /// pending, so that the next daemon (or the hook's timeout) decides.
    #[serde(alias = "cancelled")]
    Interrupted,
}

impl JobStatus {
    /// A usable archive is in S3.
    pub fn stored(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Partial)
    }

    /// The word used in reports and `status`.
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Succeeded => "succeeded",
            JobStatus::Partial => "partial",
            JobStatus::Failed => "failed",
            JobStatus::Interrupted => "interrupted",
        }
    }
}

/// What happened to the lifecycle action a job was asked to complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum ActionOutcome {
    /// This job completed it with `result`.
    Completed {
        /// CONTINUE or ABANDON.
        result: LifecycleResult,
    },
    /// There was no active action any more: someone else completed it, or it timed out.
    AlreadyDone,
    /// Deliberately not completed (the job was interrupted): the next daemon runs the backup again
    /// while the hook holds the instance.
    LeftPending {
        /// Why.
        why: String,
    },
    /// Completion was wanted and did not happen (no group or hook, access denied, out of time).
    NotCompleted {
        /// What went wrong.
        error: String,
    },
}

impl ActionOutcome {
    /// The action ended: this job completed it, or someone else did.
    pub fn settled(&self) -> bool {
        matches!(
            self,
            ActionOutcome::Completed { .. } | ActionOutcome::AlreadyDone
        )
    }

    /// The result this job sent, if it completed the action.
    pub fn result_sent(&self) -> Option<LifecycleResult> {
        match self {
            ActionOutcome::Completed { result, .. } => Some(*result),
            _ => None,
        }
    }
}

impl std::fmt::Display for ActionOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ActionOutcome::Completed { result, .. } => {
                write!(f, "completed with {}", result.as_str())
            }
            ActionOutcome::AlreadyDone => f.write_str("already completed"),
            ActionOutcome::LeftPending { why } => write!(f, "left pending: {why}"),
            ActionOutcome::NotCompleted { error } => write!(f, "not completed: {error}"),
        }
    }
}

/// A job's result, as returned to every notice that joined it and kept in the state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobResult {
    /// How it ended.
    pub status: JobStatus,
    /// Why it ran.
    pub reason: String,
    /// Where the notice came from.
    pub source: NoticeSource,
    /// `s3://bucket/key` of the archive, when stored.
    pub object_url: Option<String>,
    /// What failed.
    pub error: Option<String>,
    /// What happened to the lifecycle action (`None`: none was to be completed).
    pub lifecycle: Option<ActionOutcome>,
    /// Start.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// End.
    #[serde(with = "time::serde::rfc3339")]
    pub finished_at: OffsetDateTime,
    /// Regular files archived.
    pub file_count: u64,
    /// File bytes read.
    pub bytes_read: u64,
    /// Bytes stored in S3.
    pub bytes_stored: u64,
    /// Paths skipped.
    pub skipped: u64,
    /// Files that changed while read.
    pub changed: u64,
    /// `s3://bucket/key` of the job's log lines, stored beside the archive.
    #[serde(default)]
    pub log_url: Option<String>,
    /// Wall time of the job.
    pub duration_seconds: f64,
    /// The token of the lifecycle action this job was for (a duplicate trigger with the same
    /// token gets this result instead of a second backup, once the action is settled).
    #[serde(default)]
    pub token: Option<String>,
}

impl JobResult {
    /// This result answers a later trigger for the same termination: the data is stored and the
    /// action (if there was one) settled. An interrupted or failed job answers nothing: the next
    /// trigger runs the backup again.
    pub fn settles_termination(&self) -> bool {
        self.status.stored() && self.lifecycle.as_ref().is_none_or(ActionOutcome::settled)
    }
}

/// Why a backup failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Writing the archive failed (this includes upload failures seen while streaming).
    #[error("{0}")]
    Archive(#[from] ArchiveError),
    /// Starting or closing the compressor failed.
    #[error("compressing the archive: {0}")]
    Compress(std::io::Error),
    /// No pipeline fits the memory limit.
    #[error("sizing the backup to backup.memory_limit: {0}")]
    Budget(crate::budget::BudgetError),
    /// The upload failed.
    #[error("{0}")]
    Upload(#[from] UploadError),
    /// The manifest could not be stored; the archive is in S3 but not marked complete.
    #[error("storing the manifest s3://{bucket}/{key}: {message}")]
    Manifest {
        /// Bucket.
        bucket: String,
        /// Manifest key.
        key: String,
        /// S3's error.
        message: String,
    },
    /// The job was cancelled (signal); the upload was aborted.
    #[error("backup interrupted; the upload was aborted and nothing was stored")]
    Cancelled,
    /// The blocking pipeline thread (or the job's task) panicked.
    #[error("the archive thread failed: {0}")]
    Thread(String),
}

/// What a stored backup amounts to, for the result and the report (the manifest without its
/// file lists).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// `s3://bucket/key` of the archive.
    pub object_url: String,
    /// The deadline cut the archive short.
    pub partial: bool,
    /// Regular files archived.
    pub file_count: u64,
    /// File bytes read.
    pub bytes_read: u64,
    /// Bytes stored in S3.
    pub bytes_stored: u64,
    /// Paths skipped.
    pub skipped: u64,
    /// Files that changed while read.
    pub changed: u64,
}

impl From<&Manifest> for Stored {
    fn from(m: &Manifest) -> Self {
        Stored {
            object_url: format!("s3://{}/{}", m.bucket, m.key),
            partial: m.partial,
            file_count: m.file_count,
            bytes_read: m.bytes_read,
            bytes_stored: m.bytes_stored,
            skipped: m.skipped.len() as u64,
            changed: m.changed.len() as u64,
        }
    }
}

/// What a finished backup stored.
#[derive(Debug, Clone)]
pub struct BackupOutcome {
    /// The manifest, as stored.
    pub manifest: Manifest,
    /// Wall time of the whole job.
    pub elapsed: std::time::Duration,
}

/// Everything a backup needs from outside.
pub struct BackupJob<'a> {
    /// The validated configuration.
    pub config: &'a Config,
    /// Why it runs.
    pub reason: String,
    /// Who the instance is.
    pub identity: InstanceIdentity,
    /// The S3 client.
    pub s3: aws_sdk_s3::Client,
    /// Cancelled on SIGINT / SIGTERM.
    pub cancel: CancellationToken,
    /// Live counters for a progress display.
    pub counters: Arc<Counters>,
    /// Set when the deadline nears: the archive stops taking files and closes as `partial`.
    pub stop: Arc<AtomicBool>,
}

/// The bytes of the stored object pass through here on their way to S3: SHA-256 and size.
struct Hashing<W> {
    inner: W,
    sha: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// How long the walking thread has, after the partial stop, to close the archive itself before it
/// is taken to be stuck in the file system (a healthy one stops within one read).
const STUCK_AFTER_STOP: std::time::Duration = std::time::Duration::from_secs(5);

/// Closes the compressed stream: the upload writer, the stored bytes' SHA-256, the report.
fn close(
    sink: Sink<Hashing<ObjectWriter>>,
    report: ArchiveReport,
) -> Result<(ObjectWriter, String, ArchiveReport), JobError> {
    let hashing = sink.0.finish().map_err(JobError::Compress)?;
    Ok((hashing.inner, hex::encode(hashing.sha.finalize()), report))
}

/// Resolves only if the partial stop came, [`STUCK_AFTER_STOP`] passed, and the walking thread is
/// still in the file system: then the archive is closed without it ([`archive::Shared::abandon`]).
async fn abandon_when_stuck(
    shared: &Arc<archive::Shared<Sink<Hashing<ObjectWriter>>>>,
    stop: &AtomicBool,
) -> Result<(ObjectWriter, String, ArchiveReport), JobError> {
    let mut stopped_at = None;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        if !stop.load(std::sync::atomic::Ordering::Relaxed) {
            continue;
        }
        let since = *stopped_at.get_or_insert_with(Instant::now);
        if since.elapsed() < STUCK_AFTER_STOP {
            continue;
        }
        let shared = Arc::clone(shared);
        // Closing writes into the upload writer, which blocks: not on the async runtime.
        let closed = tokio::task::spawn_blocking(move || {
            shared.abandon().map(|closed| {
                let (sink, report) = closed.map_err(JobError::Compress)?;
                close(sink, report)
            })
        })
        .await;
        match closed {
            Ok(Some(result)) => {
                tracing::warn!(
                    "the walking thread is stuck in the file system: archive closed without it"
                );
                return result;
            }
            Ok(None) => {} // writing (not stuck), or closing the archive itself
            Err(e) => return Err(JobError::Thread(e.to_string())),
        }
    }
}

/// The tar stream's way into the compressor: runs of zeros (a file cut at the deadline) go to
/// the compressor's precomputed units instead of being compressed.
pub struct Sink<W>(pub Box<dyn Compressor<W>>);

impl<W> Write for Sink<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl<W> TarSink for Sink<W> {
    fn write_zeros(&mut self, n: u64) -> std::io::Result<()> {
        self.0.write_zeros(n)
    }
}

impl BackupJob<'_> {
    /// Runs the backup to completion, or aborts everything it started.
    pub async fn run(self) -> Result<BackupOutcome, JobError> {
        let clock = Instant::now();
        let started = OffsetDateTime::now_utc();
        let cfg = self.config;
        let key = manifest::archive_key(
            &cfg.s3.prefix,
            &self.identity,
            started,
            &self.reason,
            cfg.backup.compression,
        );
        let content_type = match cfg.backup.compression {
            crate::config::CompressionKind::Gzip => "application/gzip",
            crate::config::CompressionKind::Zstd => "application/zstd",
            crate::config::CompressionKind::None => "application/x-tar",
        };
        let dest = Destination::new(&cfg.s3, key.clone(), content_type);
        tracing::info!(bucket = %cfg.s3.bucket, %key, reason = %self.reason, "backup started");

        let request = cfg.budget_request(compress::wanted_workers(cfg.backup.workers));
        let plan = crate::budget::plan(request).map_err(JobError::Budget)?;
        if let Err(e) = crate::budget::check(request) {
            tracing::warn!(
                part_size = plan.part_size,
                parts_in_flight = plan.parts_in_flight,
                "{e}; capped to fit"
            );
        }
        tracing::debug!(?plan, "memory plan");
        let writer = ObjectWriter::new(
            self.s3.clone(),
            dest.clone(),
            Parts {
                size: plan.part_size,
                in_flight: plan.parts_in_flight,
                memory: plan.part_memory,
            },
            cfg.s3.retry_budget,
            tokio::runtime::Handle::current(),
            self.cancel.clone(),
        );
        let aborter = writer.abort_handle();
        let hashing = Hashing {
            inner: writer,
            sha: Sha256::new(),
        };
        let compressor = compress::compressor(
            cfg.backup.compression,
            cfg.backup.level,
            plan.pool(),
            hashing,
        )
        .map_err(JobError::Compress)?;
        let shared = Arc::new(archive::Shared::new(Sink(compressor)));
        let mut pipeline = {
            let backup = cfg.backup.clone();
            let counters = Arc::clone(&self.counters);
            let stop = Arc::clone(&self.stop);
            let shared = Arc::clone(&shared);
            tokio::task::spawn_blocking(move || {
                // The walk checks `stop` between entries and while reading (deadlines);
                // cancellation stops the stream at the upload writer instead.
                let opts = ArchiveOptions {
                    paths: &backup.paths,
                    exclude: &backup.exclude_set,
                    one_file_system: backup.one_file_system,
                };
                let (sink, report) = archive::write_shared(&opts, &shared, &counters, &stop)?;
                close(sink, report)
            })
        };
        // The walking thread may get stuck in the file system (a hung NFS or FUSE mount): a
        // cancelled job does not wait for it, and at the deadline the archive is closed without it.
        let streamed = tokio::select! {
            joined = &mut pipeline => match joined {
                Ok(r) => r,
                Err(e) => Err(JobError::Thread(e.to_string())),
            },
            () = self.cancel.cancelled() => Err(JobError::Cancelled),
            closed = abandon_when_stuck(&shared, &self.stop) => closed,
        };
        let (writer, sha256, report) = match streamed {
            Ok(ok) => ok,
            Err(e) => {
                // The writer (and its part uploads) were dropped with the pipeline; remove the
                // multipart upload it may have started.
                aborter.abort().await;
                return Err(self.cancelled_or(e));
            }
        };
        let stored = match writer.finish().await {
            Ok(s) => s,
            Err(e) => return Err(self.cancelled_or(e.into())),
        };
        tracing::debug!(parts = stored.parts, bytes = stored.size, "archive stored");
        let manifest = self.manifest(started, &dest, &stored, sha256, report);
        tokio::select! {
            stored = self.store_manifest(&manifest) => stored?,
            () = self.cancel.cancelled() => return Err(JobError::Cancelled),
        }
        tracing::info!(
            key = %manifest.key,
            files = manifest.file_count,
            bytes_read = manifest.bytes_read,
            bytes_stored = manifest.bytes_stored,
            partial = manifest.partial,
            "backup stored"
        );
        Ok(BackupOutcome {
            manifest,
            elapsed: clock.elapsed(),
        })
    }

    fn cancelled_or(&self, e: JobError) -> JobError {
        if self.cancel.is_cancelled() {
            JobError::Cancelled
        } else {
            e
        }
    }

    fn manifest(
        &self,
        started: OffsetDateTime,
        dest: &Destination,
        stored: &StoredObject,
        sha256: String,
        report: ArchiveReport,
    ) -> Manifest {
        let cfg = self.config;
        Manifest {
            format: manifest::FORMAT,
            lifeboat_version: env!("CARGO_PKG_VERSION").into(),
            instance: self.identity.clone(),
            reason: self.reason.clone(),
            started_at: manifest::rfc3339(started),
            finished_at: manifest::rfc3339(OffsetDateTime::now_utc()),
            bucket: dest.bucket.clone(),
            key: dest.key.clone(),
            paths: cfg
                .backup
                .paths
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            compression: cfg.backup.compression.name().into(),
            file_count: report.file_count() as u64,
            bytes_read: report.bytes_read,
            bytes_stored: stored.size,
            parts: stored.parts,
            sha256,
            partial: report.stopped_early,
            files: report.files,
            skipped: report.skipped,
            changed: report.changed,
        }
    }

    async fn store_manifest(&self, manifest: &Manifest) -> Result<(), JobError> {
        let body = serde_json::to_vec(manifest).expect("manifests serialize");
        let key = manifest.key();
        let status = if manifest.partial {
            "partial"
        } else {
            "complete"
        };
        // STANDARD whatever the archive's class: list, restore and verify read manifests at
        // once, and an archive tier (GLACIER, DEEP_ARCHIVE) would need a restore first.
        let dest = Destination::new(&self.config.s3, key.clone(), "application/json")
            .standard()
            .with_metadata(crate::catalog::STATUS_METADATA, status);
        upload::put_small(&self.s3, &dest, body)
            .await
            .map(|_etag| ())
            .map_err(|e| JobError::Manifest {
                bucket: dest.bucket.clone(),
                key,
                message: e,
            })
    }
}
