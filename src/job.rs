//! The backup job: the only place that knows the whole story. It finds out who the instance is,
//! runs walk → tar → compress → S3 on a blocking thread with the upload on the async runtime,
//! hashes the stored bytes, writes the manifest once the archive is complete, and on any failure
//! or cancellation aborts the multipart upload so nothing is left behind.

use std::io::{BufWriter, Write};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::archive::{self, ArchiveError, ArchiveOptions, ArchiveReport, Counters};
use crate::compress;
use crate::config::Config;
use crate::identity::InstanceIdentity;
use crate::manifest::{self, Manifest};
use crate::upload::{self, Destination, ObjectWriter, StoredObject, UploadError};

/// Buffer between the tar writer and the compressor: large reads from files, few small writes.
const TAR_BUFFER: usize = 256 * 1024;

/// Why a backup failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Writing the archive failed (this includes upload failures seen while streaming).
    #[error("{0}")]
    Archive(#[from] ArchiveError),
    /// Starting or closing the compressor failed.
    #[error("compressing the archive: {0}")]
    Compress(std::io::Error),
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
    #[error("backup cancelled; the upload was aborted and nothing was stored")]
    Cancelled,
    /// The blocking pipeline thread panicked.
    #[error("the archive thread failed: {0}")]
    Thread(String),
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

        let writer = ObjectWriter::new(
            self.s3.clone(),
            dest.clone(),
            cfg.s3.part_size,
            cfg.s3.concurrency,
            tokio::runtime::Handle::current(),
            self.cancel.clone(),
        );
        let aborter = writer.abort_handle();
        let pipeline = {
            let backup = cfg.backup.clone();
            let counters = Arc::clone(&self.counters);
            let stop = Arc::clone(&self.stop);
            tokio::task::spawn_blocking(move || {
                // The walk checks `stop` between entries and while reading (deadlines);
                // cancellation stops the stream at the upload writer instead.
                let opts = ArchiveOptions {
                    paths: &backup.paths,
                    exclude: &backup.exclude_set,
                    one_file_system: backup.one_file_system,
                };
                let hashing = Hashing {
                    inner: writer,
                    sha: Sha256::new(),
                };
                let compressor = compress::compressor(
                    backup.compression,
                    backup.level,
                    compress::default_threads(),
                    hashing,
                )
                .map_err(JobError::Compress)?;
                let out = BufWriter::with_capacity(TAR_BUFFER, compressor);
                let (out, report) = archive::write_archive(&opts, out, &counters, &stop)?;
                let compressor = out
                    .into_inner()
                    .map_err(|e| JobError::Compress(e.into_error()))?;
                let hashing = compressor.finish().map_err(JobError::Compress)?;
                Ok::<_, JobError>((hashing.inner, hex::encode(hashing.sha.finalize()), report))
            })
        };
        let streamed = match pipeline.await {
            Ok(r) => r,
            Err(e) => Err(JobError::Thread(e.to_string())),
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
        let manifest = self.manifest(started, &dest, &stored, sha256, report);
        self.store_manifest(&manifest).await?;
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
        let dest = Destination::new(&self.config.s3, key.clone(), "application/json")
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
