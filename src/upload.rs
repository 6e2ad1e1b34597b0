//! The upload stage: turns a byte stream into one S3 object, with no temporary file.
//!
//! [`ObjectWriter`] is a blocking [`Write`] (the archive and compression run on a blocking thread)
//! that cuts the stream into parts and uploads them from the async runtime. What it may hold is
//! [`Parts`]: a pool of memory for the part being filled and the parts in flight, and a most in
//! flight. The writer takes a part's memory from the pool before it starts filling it and the
//! pool gets it back when the part is uploaded, so memory stays within the pool however the
//! parts grow (×2 every 900 parts, up to S3's 5 GiB, so any stream fits in 10,000 parts): bigger
//! parts mean fewer in flight. A part bigger than half the pool is staged ([`staged`]): uploaded
//! as an object of pool-sized parts, then copied in, so memory stays within the pool up to S3's
//! largest object.
//! A stream smaller than one part becomes a single PutObject. Every part and every single put
//! carries a CRC32C checksum that S3 verifies; the algorithm is declared at
//! CreateMultipartUpload. A part's attempt may take as long as its size needs at a slow
//! connection's speed ([`part_attempt_timeout`]).
//!
//! Nothing half-written is ever presented as complete: the object appears only at
//! CompleteMultipartUpload, and [`ObjectWriter::abort`] removes the upload on every failure path.
//! It knows nothing of tar.

use std::io::{self, Write};
use std::sync::{Arc, OnceLock};

use aws_sdk_s3::Client;
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ServerSideEncryption, StorageClass,
};
use bytes::Bytes;
pub use lifeboat_common::sdk::sdk_message;
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{MAX_PART_SIZE, MIN_PART_SIZE, S3Config};

pub mod staged;

/// S3's limit on the number of parts.
pub const MAX_PARTS: i32 = 10_000;
/// Parts per size tier before the part size doubles.
const PARTS_PER_TIER: i32 = 900;

/// Why an upload failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// CreateMultipartUpload failed.
    #[error("starting the multipart upload of s3://{bucket}/{key}: {message}")]
    Create {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// S3's or the connection's error.
        message: String,
    },
    /// An UploadPart failed after the SDK's retries.
    #[error("uploading part {part} of s3://{bucket}/{key}: {message}")]
    Part {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// Part number.
        part: i32,
        /// S3's or the connection's error.
        message: String,
    },
    /// CompleteMultipartUpload failed.
    #[error("completing the multipart upload of s3://{bucket}/{key}: {message}")]
    Complete {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// S3's or the connection's error.
        message: String,
    },
    /// PutObject failed.
    #[error("uploading s3://{bucket}/{key}: {message}")]
    Put {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// S3's or the connection's error.
        message: String,
    },
    /// AbortMultipartUpload failed: the upload may still exist.
    #[error("aborting multipart upload {upload_id} of s3://{bucket}/{key}: {message}")]
    Abort {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// The upload left behind.
        upload_id: String,
        /// S3's or the connection's error.
        message: String,
    },
    /// The stream needs more than 10,000 parts even with growing part sizes.
    #[error("s3://{bucket}/{key}: the stream exceeds S3's 10,000 parts")]
    TooManyParts {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
    },
    /// The upload was cancelled (signal or deadline).
    #[error("upload cancelled")]
    Cancelled,
}

/// Where the object goes and how it is stored.
#[derive(Debug, Clone)]
pub struct Destination {
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: String,
    /// Content type of the object.
    pub content_type: String,
    storage_class: StorageClass,
    sse: Option<ServerSideEncryption>,
    kms_key_id: Option<String>,
    expected_bucket_owner: Option<String>,
    metadata: Option<std::collections::HashMap<String, String>>,
}

impl Destination {
    /// Where final part `number` of this object is staged ([`staged`]): STANDARD storage, the
    /// same encryption and owner check, no metadata.
    fn staged(&self, number: i32) -> Self {
        Self {
            key: staged::staging_key(&self.key, number),
            content_type: "application/octet-stream".into(),
            metadata: None,
            ..self.clone()
        }
        .standard()
    }

    /// Stored as STANDARD whatever `s3.storage_class` says: for objects that must stay readable
    /// at once (manifests; an archive tier would need a restore first) or that live seconds.
    pub fn standard(mut self) -> Self {
        self.storage_class = StorageClass::Standard;
        self
    }

    /// Adds user metadata (`x-amz-meta-NAME`) to the object.
    pub fn with_metadata(mut self, name: &str, value: &str) -> Self {
        self.metadata
            .get_or_insert_with(Default::default)
            .insert(name.to_owned(), value.to_owned());
        self
    }

    /// The object `key` in the configured bucket, stored as configured.
    pub fn new(s3: &S3Config, key: String, content_type: &str) -> Self {
        Self {
            bucket: s3.bucket.clone(),
            key,
            content_type: content_type.to_owned(),
            storage_class: StorageClass::from(s3.storage_class.as_str()),
            sse: (!s3.sse.is_empty()).then(|| ServerSideEncryption::from(s3.sse.as_str())),
            kms_key_id: (!s3.kms_key_id.is_empty()).then(|| s3.kms_key_id.clone()),
            expected_bucket_owner: (!s3.expected_bucket_owner.is_empty())
                .then(|| s3.expected_bucket_owner.clone()),
            metadata: None,
        }
    }
}

/// Part sizes: `base` for the first 900 parts, then doubling every 900 parts, capped at 5 GiB.
/// With the default 16 MiB this holds over 20 TiB in 10,000 parts, and memory grows only for
/// archives past 14 GiB; even the smallest part size (5 MiB) holds more than 5 TiB.
#[derive(Debug, Clone, Copy)]
pub struct PartSizer {
    base: u64,
}

impl PartSizer {
    /// Starts at `base` bytes.
    pub fn new(base: u64) -> Self {
        Self { base }
    }

    /// The size of part `number` (1-based).
    pub fn size(&self, number: i32) -> u64 {
        let tier = u32::try_from((number.max(1) - 1) / PARTS_PER_TIER).unwrap_or(0);
        self.base
            .checked_shl(tier)
            .unwrap_or(MAX_PART_SIZE)
            .min(MAX_PART_SIZE)
    }

    /// The largest stream that fits in 10,000 parts.
    pub fn capacity(&self) -> u64 {
        (1..=MAX_PARTS).map(|n| self.size(n)).sum()
    }
}

/// How final part `number` travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The part's size.
    pub size: u64,
    /// The largest buffer it is filled in: the part itself, or its pieces when it is staged.
    pub piece: u64,
}

impl Layout {
    /// Part `number`'s layout with parts from `sizer` and a part pool of `pool` bytes: parts
    /// past half the pool are staged in pieces of the first part's size (at most half the pool,
    /// at least S3's smallest part).
    pub fn of(sizer: PartSizer, pool: u64, number: i32) -> Self {
        let size = sizer.size(number);
        let piece = if staged::is_staged(size, pool) {
            sizer.size(1).min(pool / 2).max(MIN_PART_SIZE).min(size)
        } else {
            size
        };
        Self { size, piece }
    }

    /// Whether the part is staged.
    pub fn staged(&self) -> bool {
        self.piece < self.size
    }
}

/// How much the upload may hold: parts start at `size` bytes, at most `in_flight` upload at
/// once, and the part being filled plus those in flight never hold more than `memory` bytes
/// (a single part larger than that is filled and uploaded alone).
#[derive(Debug, Clone, Copy)]
pub struct Parts {
    /// The first part's size.
    pub size: u64,
    /// Parts uploading at once, at most.
    pub in_flight: usize,
    /// Bytes for the part being filled and the parts in flight.
    pub memory: u64,
}

/// The slowest a part is assumed to travel before any has been measured, and the floor of
/// the assumption afterwards.
const SLOWEST_RATE: u64 = 2 * 1024 * 1024;
/// No attempt gets less time than this (nor more than the retry budget) however small its part.
const SHORTEST_ATTEMPT: std::time::Duration = std::time::Duration::from_secs(120);

/// How long one attempt at uploading a part of `size` bytes may take: the time the part needs
/// at a quarter of the slowest recent part's speed (`measured`, bytes per second; [`SLOWEST_RATE`]
/// before any was measured and at least), never less than two minutes or `retry_budget` if that
/// is shorter. A fixed timeout fails every large part on a slow link, or waits minutes for a
/// small one that hangs.
pub fn part_attempt_timeout(
    size: u64,
    measured: Option<u64>,
    retry_budget: std::time::Duration,
) -> std::time::Duration {
    let rate = measured.map_or(SLOWEST_RATE, |r| (r / 4).max(SLOWEST_RATE));
    let needed = std::time::Duration::from_secs(size.div_ceil(rate));
    needed.max(SHORTEST_ATTEMPT.min(retry_budget))
}

/// The speed of recent parts, each over its own connection: the slowest of the last few.
#[derive(Debug, Default)]
struct PartSpeed {
    recent: std::sync::Mutex<std::collections::VecDeque<u64>>,
}

impl PartSpeed {
    const KEPT: usize = 8;

    fn record(&self, bytes: usize, took: std::time::Duration) {
        let rate = (bytes as f64 / took.as_secs_f64().max(1e-3)) as u64;
        let mut recent = self.recent.lock().expect("not poisoned");
        if recent.len() == Self::KEPT {
            recent.pop_front();
        }
        recent.push_back(rate);
    }

    fn slowest(&self) -> Option<u64> {
        self.recent
            .lock()
            .expect("not poisoned")
            .iter()
            .copied()
            .min()
    }
}

/// The pool counts memory in units of this many bytes (a semaphore counts in `u32`).
const MEMORY_UNIT: u64 = 64 * 1024;

/// What was stored.
#[derive(Debug, Clone)]
pub struct StoredObject {
    /// Bytes in the object.
    pub size: u64,
    /// Parts (1 for a single put).
    pub parts: i32,
    /// The object's ETag.
    pub etag: String,
}

/// A blocking writer that streams into one S3 object. Call [`ObjectWriter::finish`] to make the
/// object, or [`ObjectWriter::abort`] on any failure; dropping it without either leaves an upload
/// open (and is a bug).
pub struct ObjectWriter {
    client: Client,
    dest: Arc<Destination>,
    runtime: Handle,
    cancel: CancellationToken,
    sizer: PartSizer,
    buf: Vec<u8>,
    next_part: i32,
    upload_id: Arc<OnceLock<String>>,
    slots: Arc<Semaphore>,
    /// The part memory pool, in [`MEMORY_UNIT`]s.
    memory: Arc<Semaphore>,
    memory_units: u32,
    /// The pool's share held by the part being filled.
    held: Option<OwnedSemaphorePermit>,
    /// The pool in bytes: parts past half of it are staged.
    pool: u64,
    /// The final part being staged, if any.
    staging: Option<Staging>,
    registry: staged::Registry,
    /// Staging has been logged.
    staging_logged: bool,
    speed: Arc<PartSpeed>,
    retry_budget: std::time::Duration,
    tasks: JoinSet<Result<CompletedPart, UploadError>>,
    parts: Vec<CompletedPart>,
    failed: Option<String>,
    total: u64,
}

impl ObjectWriter {
    /// A writer for `dest` holding at most `parts`. `runtime` runs the uploads; `cancel` stops
    /// them.
    pub fn new(
        client: Client,
        dest: Destination,
        parts: Parts,
        retry_budget: std::time::Duration,
        runtime: Handle,
        cancel: CancellationToken,
    ) -> Self {
        let sizer = PartSizer::new(parts.size);
        // Rounded down: the pool never exceeds what the budget gave it.
        let memory_units =
            u32::try_from((parts.memory / MEMORY_UNIT).max(1)).unwrap_or(u32::MAX >> 3);
        let memory_units = memory_units.min(Semaphore::MAX_PERMITS as u32);
        Self {
            client,
            dest: Arc::new(dest),
            runtime,
            cancel,
            buf: Vec::new(),
            sizer,
            next_part: 1,
            upload_id: Arc::new(OnceLock::new()),
            slots: Arc::new(Semaphore::new(parts.in_flight.max(1))),
            memory: Arc::new(Semaphore::new(memory_units as usize)),
            memory_units,
            held: None,
            pool: u64::from(memory_units) * MEMORY_UNIT,
            staging: None,
            registry: staged::Registry::default(),
            staging_logged: false,
            speed: Arc::default(),
            retry_budget,
            tasks: JoinSet::new(),
            parts: Vec::new(),
            failed: None,
            total: 0,
        }
    }

    /// A handle that aborts the multipart upload this writer may start, usable after the writer
    /// itself was dropped on a failure path (dropping it also stops its part uploads).
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle {
            client: self.client.clone(),
            dest: Arc::clone(&self.dest),
            upload_id: Arc::clone(&self.upload_id),
            registry: self.registry.clone(),
        }
    }

    /// The size of the buffer being filled: the next part, or the next piece of a staged one.
    fn part_limit(&self) -> usize {
        let bytes = match &self.staging {
            Some(st) => st.sub_size.min(st.size - st.shipped),
            None => self.sizer.size(self.next_part),
        };
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }

    /// Collects finished part uploads (the archive's, and the staged part's pieces); remembers
    /// the first failure.
    fn reap(&mut self) {
        while let Some(done) = self.tasks.try_join_next() {
            record(&mut self.parts, &mut self.failed, done);
        }
        if let Some(st) = &mut self.staging {
            while let Some(done) = st.tasks.try_join_next() {
                record(&mut st.parts, &mut self.failed, done);
            }
        }
    }

    fn check(&self) -> io::Result<()> {
        if self.cancel.is_cancelled() {
            return Err(io::Error::other(UploadError::Cancelled));
        }
        match &self.failed {
            Some(msg) => Err(io::Error::other(msg.clone())),
            None => Ok(()),
        }
    }

    /// Takes the next part's memory from the pool (blocking until uploads give it back), before
    /// the part is filled.
    fn reserve(&mut self) -> io::Result<()> {
        let layout = Layout::of(self.sizer, self.pool, self.next_part);
        if self.staging.is_none() && layout.staged() {
            let part = layout.size;
            if !self.staging_logged {
                self.staging_logged = true;
                tracing::info!(
                    part = self.next_part,
                    part_bytes = part,
                    pool_bytes = self.pool,
                    "parts have grown past half of backup.memory_limit's share for parts: \
                     staging each as an object of smaller parts, then copying it in"
                );
            }
            self.staging = Some(Staging {
                number: self.next_part,
                size: part,
                sub_size: layout.piece,
                dest: Arc::new(self.dest.staged(self.next_part)),
                upload_id: None,
                next_sub: 1,
                shipped: 0,
                crc: crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi),
                tasks: JoinSet::new(),
                parts: Vec::new(),
            });
        }
        let size = self.part_limit() as u64;
        let wanted = u32::try_from(size.div_ceil(MEMORY_UNIT)).unwrap_or(u32::MAX);
        let units = wanted.min(self.memory_units);
        self.held = Some(self.acquire(&self.memory, units)?);
        self.buf = Vec::with_capacity(self.part_limit());
        Ok(())
    }

    /// Sends the filled buffer: the next part, or the next piece of a staged part.
    fn ship(&mut self) -> io::Result<()> {
        if self.staging.is_some() {
            self.ship_staged()
        } else {
            self.ship_part()
        }
    }

    /// The archive's multipart upload, started on first use.
    fn ensure_upload(&mut self) -> io::Result<String> {
        if self.next_part > MAX_PARTS {
            return Err(io::Error::other(UploadError::TooManyParts {
                bucket: self.dest.bucket.clone(),
                key: self.dest.key.clone(),
            }));
        }
        if let Some(id) = self.upload_id.get() {
            return Ok(id.clone());
        }
        let id = self.create(&self.dest)?;
        let _ = self.upload_id.set(id.clone());
        Ok(id)
    }

    /// Starts a multipart upload of `dest` (blocking, cancellable).
    fn create(&self, dest: &Destination) -> io::Result<String> {
        let id = self
            .runtime
            .block_on(cancellable(&self.cancel, create_upload(&self.client, dest)))
            .map_err(io::Error::other)?;
        tracing::debug!(upload_id = %id, key = %dest.key, "multipart upload started");
        Ok(id)
    }

    /// `n` permits of `pool` (blocking until they are free), unless cancelled first.
    fn acquire(&self, pool: &Arc<Semaphore>, n: u32) -> io::Result<OwnedSemaphorePermit> {
        let (pool, cancel) = (Arc::clone(pool), self.cancel.clone());
        self.runtime
            .block_on(async move {
                tokio::select! {
                    permit = pool.acquire_many_owned(n) => permit.ok(),
                    () = cancel.cancelled() => None,
                }
            })
            .ok_or_else(|| io::Error::other(UploadError::Cancelled))
    }

    /// An upload slot (blocking until one is free), then failures reaped again.
    fn slot(&mut self) -> io::Result<OwnedSemaphorePermit> {
        let permit = self.acquire(&self.slots, 1)?;
        self.reap();
        self.check()?;
        Ok(permit)
    }

    /// Sends the filled buffer as the next piece of the staged part (blocking until a slot is
    /// free); the last piece seals it.
    fn ship_staged(&mut self) -> io::Result<()> {
        self.reap();
        self.check()?;
        let archive_upload = self.ensure_upload()?;
        let (dest, started) = {
            let st = self.staging.as_ref().expect("staging");
            (Arc::clone(&st.dest), st.upload_id.clone())
        };
        let staged_upload = match started {
            Some(id) => id,
            None => {
                let id = self.create(&dest)?;
                self.registry.started(&dest.key, &id);
                self.staging.as_mut().expect("staging").upload_id = Some(id.clone());
                id
            }
        };
        let permit = self.slot()?;
        let st = self.staging.as_mut().expect("staging");
        let data = Bytes::from(std::mem::take(&mut self.buf));
        st.ship(
            data,
            (permit, self.held.take()),
            &self.client,
            &staged_upload,
            (Arc::clone(&self.speed), self.retry_budget),
            &self.runtime,
        );
        if st.shipped == st.size {
            self.seal(archive_upload);
        }
        Ok(())
    }

    /// Hands the staged part, all its bytes shipped, to a task that copies it in.
    fn seal(&mut self, archive_upload: String) {
        let Some(st) = self.staging.take() else {
            return;
        };
        self.next_part += 1;
        let filled = st.filled();
        let (client, dest, registry) = (
            self.client.clone(),
            Arc::clone(&self.dest),
            self.registry.clone(),
        );
        let cancel = self.cancel.clone();
        self.tasks.spawn_on(
            async move {
                tokio::select! {
                    r = staged::copy_in(client, dest, archive_upload, filled, registry) => r,
                    () = cancel.cancelled() => Err(UploadError::Cancelled),
                }
            },
            &self.runtime,
        );
    }

    /// Sends the filled buffer as the next part (blocking until a slot is free).
    fn ship_part(&mut self) -> io::Result<()> {
        self.reap();
        self.check()?;
        self.ensure_upload()?;
        let permit = self.slot()?;
        let number = self.next_part;
        self.next_part += 1;
        let data = Bytes::from(std::mem::take(&mut self.buf));
        let memory = self.held.take();
        let client = self.client.clone();
        let dest = Arc::clone(&self.dest);
        let upload_id = self.upload_id.get().cloned().expect("created above");
        let cancel = self.cancel.clone();
        let (speed, budget) = (Arc::clone(&self.speed), self.retry_budget);
        self.tasks.spawn_on(
            async move {
                let _permit = (permit, memory);
                tokio::select! {
                    r = upload_part(&client, &dest, &upload_id, number, data, &speed, budget) => r,
                    () = cancel.cancelled() => Err(UploadError::Cancelled),
                }
            },
            &self.runtime,
        );
        Ok(())
    }

    /// Uploads what is left and makes the object. Call from async code once writing is done.
    pub async fn finish(mut self) -> Result<StoredObject, UploadError> {
        let Some(upload_id) = self.upload_id.get().cloned() else {
            let cancel = self.cancel.clone();
            return cancellable(&cancel, self.put_single()).await;
        };
        let cancel = self.cancel.clone();
        let result = cancellable(&cancel, self.complete(&upload_id)).await;
        if result.is_err() {
            // Keep nothing that could be mistaken for data: the upload goes.
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
            self.abort_handle().abort().await;
        }
        result
    }

    async fn complete(&mut self, upload_id: &str) -> Result<StoredObject, UploadError> {
        // A staged part with pieces shipped gets the rest as its last piece and is sealed; one
        // with none is only what the buffer holds, sent below as an ordinary last part.
        if let Some(st) = self.staging.as_mut().filter(|st| st.upload_id.is_some()) {
            if !self.buf.is_empty() {
                let permit = Arc::clone(&self.slots)
                    .acquire_owned()
                    .await
                    .map_err(|_| UploadError::Cancelled)?;
                let data = Bytes::from(std::mem::take(&mut self.buf));
                let staged_upload = st.upload_id.clone().expect("filtered");
                st.ship(
                    data,
                    (permit, self.held.take()),
                    &self.client,
                    &staged_upload,
                    (Arc::clone(&self.speed), self.retry_budget),
                    &Handle::current(),
                );
            }
            self.seal(upload_id.to_owned());
        }
        self.staging = None;
        if !self.buf.is_empty() {
            // The last part may be smaller than 5 MiB; block_in_place is not needed: no slot
            // wait happens when the buffer is shipped from here, we wait on the tasks below.
            let slots = Arc::clone(&self.slots);
            let permit = slots
                .acquire_owned()
                .await
                .map_err(|_| UploadError::Cancelled)?;
            let number = self.next_part;
            self.next_part += 1;
            let data = Bytes::from(std::mem::take(&mut self.buf));
            let permit = (permit, self.held.take());
            let (client, dest, id) = (
                self.client.clone(),
                Arc::clone(&self.dest),
                upload_id.to_owned(),
            );
            let (speed, budget) = (Arc::clone(&self.speed), self.retry_budget);
            self.tasks.spawn(async move {
                let _permit = permit;
                upload_part(&client, &dest, &id, number, data, &speed, budget).await
            });
        }
        while let Some(done) = self.tasks.join_next().await {
            record(&mut self.parts, &mut self.failed, done);
        }
        if self.cancel.is_cancelled() {
            return Err(UploadError::Cancelled);
        }
        if let Some(message) = self.failed.take() {
            return Err(UploadError::Part {
                bucket: self.dest.bucket.clone(),
                key: self.dest.key.clone(),
                part: 0,
                message,
            });
        }
        self.parts.sort_by_key(|p| p.part_number());
        staged::report_leftovers(&self.registry, &self.dest.bucket);
        tracing::debug!(parts = self.parts.len(), "completing the multipart upload");
        let parts = i32::try_from(self.parts.len()).unwrap_or(i32::MAX);
        let out = self
            .client
            .complete_multipart_upload()
            .bucket(&self.dest.bucket)
            .key(&self.dest.key)
            .upload_id(upload_id)
            .set_expected_bucket_owner(self.dest.expected_bucket_owner.clone())
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(std::mem::take(&mut self.parts)))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| UploadError::Complete {
                bucket: self.dest.bucket.clone(),
                key: self.dest.key.clone(),
                message: sdk_message(&e),
            })?;
        Ok(StoredObject {
            size: self.total,
            parts,
            etag: out.e_tag().unwrap_or_default().to_owned(),
        })
    }

    async fn put_single(self) -> Result<StoredObject, UploadError> {
        if self.cancel.is_cancelled() {
            return Err(UploadError::Cancelled);
        }
        let etag = put_small(&self.client, &self.dest, self.buf)
            .await
            .map_err(|message| UploadError::Put {
                bucket: self.dest.bucket.clone(),
                key: self.dest.key.clone(),
                message,
            })?;
        Ok(StoredObject {
            size: self.total,
            parts: 1,
            etag,
        })
    }
}

/// Files a finished part upload into `parts`, or its failure into `failed` (the first one kept).
fn record(
    parts: &mut Vec<CompletedPart>,
    failed: &mut Option<String>,
    done: Result<Result<CompletedPart, UploadError>, tokio::task::JoinError>,
) {
    match done {
        Ok(Ok(part)) => parts.push(part),
        Ok(Err(e)) => {
            failed.get_or_insert(e.to_string());
        }
        Err(e) => {
            failed.get_or_insert(format!("part upload task failed: {e}"));
        }
    }
}

/// A final part too big for the pool, being uploaded as its own object ([`staged`]).
struct Staging {
    /// The final part's number.
    number: i32,
    /// Its size (unless the stream ends first).
    size: u64,
    /// The size of its pieces.
    sub_size: u64,
    /// The staged object.
    dest: Arc<Destination>,
    /// Its multipart upload, once the first piece ships.
    upload_id: Option<String>,
    next_sub: i32,
    /// Bytes handed to piece uploads.
    shipped: u64,
    crc: crc_fast::Digest,
    tasks: JoinSet<Result<CompletedPart, UploadError>>,
    parts: Vec<CompletedPart>,
}

impl Staging {
    /// Uploads `data` as the next piece, holding `permit` (its slot and memory) until done.
    fn ship(
        &mut self,
        data: Bytes,
        permit: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
        client: &Client,
        upload_id: &str,
        (speed, budget): (Arc<PartSpeed>, std::time::Duration),
        runtime: &Handle,
    ) {
        self.crc.update(&data);
        self.shipped += data.len() as u64;
        let number = self.next_sub;
        self.next_sub += 1;
        let (client, dest, id) = (client.clone(), Arc::clone(&self.dest), upload_id.to_owned());
        self.tasks.spawn_on(
            async move {
                let _permit = permit;
                upload_part(&client, &dest, &id, number, data, &speed, budget).await
            },
            runtime,
        );
    }

    fn filled(self) -> staged::Filled {
        let crc = self.crc.finalize() as u32;
        staged::Filled {
            number: self.number,
            staged: self.dest,
            upload_id: self.upload_id.expect("a sealed staged part has an upload"),
            tasks: self.tasks,
            parts: self.parts,
            crc32c: aws_smithy_types::base64::encode(crc.to_be_bytes()),
            bytes: self.shipped,
        }
    }
}

/// How long aborting a multipart upload may take (the bucket's `AbortIncompleteMultipartUpload`
/// rule removes one this could not).
const ABORT_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs an S3 request unless `cancel` fires first (a signal must end a request that hangs).
pub async fn cancellable<T>(
    cancel: &CancellationToken,
    request: impl std::future::Future<Output = Result<T, UploadError>>,
) -> Result<T, UploadError> {
    tokio::select! {
        r = request => r,
        () = cancel.cancelled() => Err(UploadError::Cancelled),
    }
}

/// Aborts the multipart upload of an [`ObjectWriter`], if it started one.
#[derive(Clone)]
pub struct AbortHandle {
    client: Client,
    dest: Arc<Destination>,
    upload_id: Arc<OnceLock<String>>,
    registry: staged::Registry,
}

impl AbortHandle {
    /// Aborts the upload; failures are logged (the bucket rule `AbortIncompleteMultipartUpload`
    /// is the last line of defence) and returned.
    pub async fn abort(&self) -> Option<UploadError> {
        // Staged parts first: their uploads and objects exist only for this one.
        let _ =
            tokio::time::timeout(ABORT_BUDGET, self.registry.clean(&self.client, &self.dest)).await;
        let upload_id = self.upload_id.get()?;
        tracing::info!(upload_id, key = %self.dest.key, "aborting multipart upload");
        // Bounded: an interrupted process must end within seconds even against a hung S3.
        let result = tokio::time::timeout(
            ABORT_BUDGET,
            self.client
                .abort_multipart_upload()
                .bucket(&self.dest.bucket)
                .key(&self.dest.key)
                .upload_id(upload_id)
                .set_expected_bucket_owner(self.dest.expected_bucket_owner.clone())
                .send(),
        )
        .await;
        let result = match result {
            Ok(r) => r,
            Err(_) => {
                let err = UploadError::Abort {
                    bucket: self.dest.bucket.clone(),
                    key: self.dest.key.clone(),
                    upload_id: upload_id.clone(),
                    message: format!("no answer within {ABORT_BUDGET:?}"),
                };
                tracing::error!(error = %err, "could not abort the multipart upload");
                return Some(err);
            }
        };
        match result {
            Ok(_) => None,
            // Already gone: nothing is left behind.
            Err(e) if e.code() == Some("NoSuchUpload") => None,
            Err(e) => {
                let err = UploadError::Abort {
                    bucket: self.dest.bucket.clone(),
                    key: self.dest.key.clone(),
                    upload_id: upload_id.clone(),
                    message: sdk_message(&e),
                };
                tracing::error!(error = %err, "could not abort the multipart upload");
                Some(err)
            }
        }
    }
}

/// Stores an object in one PutObject with a CRC32C checksum; returns its ETag.
pub async fn put_small(client: &Client, d: &Destination, body: Vec<u8>) -> Result<String, String> {
    let data = Bytes::from(body);
    client
        .put_object()
        .bucket(&d.bucket)
        .key(&d.key)
        .content_type(&d.content_type)
        .storage_class(d.storage_class.clone())
        .set_server_side_encryption(d.sse.clone())
        .set_ssekms_key_id(d.kms_key_id.clone())
        .set_expected_bucket_owner(d.expected_bucket_owner.clone())
        .set_metadata(d.metadata.clone())
        .checksum_algorithm(ChecksumAlgorithm::Crc32C)
        .checksum_crc32_c(crc32c_base64(&data))
        .content_length(i64::try_from(data.len()).unwrap_or(i64::MAX))
        .body(ByteStream::from(data))
        .send()
        .await
        .map(|out| out.e_tag().unwrap_or_default().to_owned())
        .map_err(|e| sdk_message(&e))
}

impl Write for ObjectWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.check()?;
        if self.held.is_none() {
            self.reserve()?;
        }
        let room = self.part_limit() - self.buf.len();
        let n = buf.len().min(room);
        self.buf.extend_from_slice(&buf[..n]);
        self.total += n as u64;
        if self.buf.len() == self.part_limit() {
            self.ship()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.check()
    }
}

/// The base64 CRC32C of `data`, as S3's `x-amz-checksum-crc32c` wants it.
pub fn crc32c_base64(data: &[u8]) -> String {
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32;
    aws_smithy_types::base64::encode(crc.to_be_bytes())
}

/// Proves `d` is writable the way a backup writes it (CreateMultipartUpload with the configured
/// encryption, storage class and owner check), then aborts, leaving nothing behind. Needs only
/// the permissions a backup needs (`s3:PutObject`, `s3:AbortMultipartUpload`).
pub async fn probe_write(client: &Client, d: &Destination) -> Result<(), UploadError> {
    let upload_id = create_upload(client, d).await?;
    client
        .abort_multipart_upload()
        .bucket(&d.bucket)
        .key(&d.key)
        .upload_id(upload_id)
        .set_expected_bucket_owner(d.expected_bucket_owner.clone())
        .send()
        .await
        .map_err(|e| UploadError::Create {
            bucket: d.bucket.clone(),
            key: d.key.clone(),
            message: format!("created, but the abort failed: {}", sdk_message(&e)),
        })?;
    Ok(())
}

async fn create_upload(client: &Client, d: &Destination) -> Result<String, UploadError> {
    let out = client
        .create_multipart_upload()
        .bucket(&d.bucket)
        .key(&d.key)
        .content_type(&d.content_type)
        .storage_class(d.storage_class.clone())
        .set_server_side_encryption(d.sse.clone())
        .set_ssekms_key_id(d.kms_key_id.clone())
        .set_expected_bucket_owner(d.expected_bucket_owner.clone())
        .set_metadata(d.metadata.clone())
        .checksum_algorithm(ChecksumAlgorithm::Crc32C)
        .send()
        .await
        .map_err(|e| UploadError::Create {
            bucket: d.bucket.clone(),
            key: d.key.clone(),
            message: sdk_message(&e),
        })?;
    out.upload_id()
        .map(str::to_owned)
        .ok_or_else(|| UploadError::Create {
            bucket: d.bucket.clone(),
            key: d.key.clone(),
            message: "S3 returned no upload id".into(),
        })
}

async fn upload_part(
    client: &Client,
    d: &Destination,
    upload_id: &str,
    number: i32,
    data: Bytes,
    speed: &PartSpeed,
    retry_budget: std::time::Duration,
) -> Result<CompletedPart, UploadError> {
    let checksum = crc32c_base64(&data);
    let len = data.len();
    let attempt = part_attempt_timeout(len as u64, speed.slowest(), retry_budget);
    let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .operation_attempt_timeout(attempt)
        // Room for at least one retry of a part that needs its whole attempt.
        .operation_timeout(retry_budget.max(2 * attempt))
        .build();
    let started = std::time::Instant::now();
    let out = client
        .upload_part()
        .bucket(&d.bucket)
        .key(&d.key)
        .upload_id(upload_id)
        .part_number(number)
        .set_expected_bucket_owner(d.expected_bucket_owner.clone())
        .checksum_algorithm(ChecksumAlgorithm::Crc32C)
        .checksum_crc32_c(&checksum)
        .content_length(i64::try_from(len).unwrap_or(i64::MAX))
        .body(ByteStream::from(data))
        .customize()
        .config_override(aws_sdk_s3::config::Builder::default().timeout_config(timeouts))
        .send()
        .await
        .map_err(|e| UploadError::Part {
            bucket: d.bucket.clone(),
            key: d.key.clone(),
            part: number,
            message: sdk_message(&e),
        })?;
    speed.record(len, started.elapsed());
    tracing::trace!(part = number, bytes = len, "part uploaded");
    Ok(CompletedPart::builder()
        .part_number(number)
        .set_e_tag(out.e_tag().map(str::to_owned))
        .checksum_crc32_c(checksum)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes_grow_so_large_streams_fit() {
        let s = PartSizer::new(16 << 20);
        assert_eq!(s.size(1), 16 << 20);
        assert_eq!(s.size(900), 16 << 20);
        assert_eq!(s.size(901), 32 << 20);
        assert_eq!(s.size(10_000), MAX_PART_SIZE);
        // More than 5 TiB (the old S3 object limit) fits; the smallest part size still holds 5 TiB.
        assert!(s.capacity() > 5 << 40, "{}", s.capacity());
        assert!(PartSizer::new(5 << 20).capacity() > 5 << 40);
    }

    #[test]
    fn part_timeouts_grow_with_the_part_and_shrink_with_measured_speed() {
        use std::time::Duration;
        let budget = Duration::from_secs(180);
        // Small parts: the floor.
        assert_eq!(
            part_attempt_timeout(8 << 20, None, budget),
            SHORTEST_ATTEMPT
        );
        assert_eq!(
            part_attempt_timeout(8 << 20, None, Duration::from_secs(30)),
            Duration::from_secs(30)
        );
        // A 5 GiB part before anything was measured: at 2 MiB/s.
        assert_eq!(
            part_attempt_timeout(MAX_PART_SIZE, None, budget),
            Duration::from_secs(2560)
        );
        // Parts measured at 80 MiB/s: a quarter of that.
        assert_eq!(
            part_attempt_timeout(MAX_PART_SIZE, Some(80 << 20), budget),
            Duration::from_secs(256)
        );
        // A measured crawl does not shrink the assumption below the floor.
        assert_eq!(
            part_attempt_timeout(MAX_PART_SIZE, Some(1 << 20), budget),
            Duration::from_secs(2560)
        );
    }

    #[test]
    fn crc32c_matches_the_known_vector() {
        // RFC 3720 test vector: CRC32C("123456789") = 0xE3069283.
        assert_eq!(
            crc32c_base64(b"123456789"),
            aws_smithy_types::base64::encode(0xE306_9283u32.to_be_bytes())
        );
    }
}
