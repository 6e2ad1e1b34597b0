//! The download stage of restore and verify: an archive object as a blocking reader, fetched in
//! byte ranges, several at once, delivered in order.
//!
//! One connection to S3 carries a few tens of MB/s to a hundred; a restore that decompresses and
//! extracts faster than that would wait on it. [`open`] asks for the first [`RANGE`] bytes; when
//! S3 answers with a part (206) it learns the object's size and ETag, and the following ranges are
//! fetched [`IN_FLIGHT`] at a time, each on its own connection, each only if the object still has
//! that ETag (`If-Match`: an object replaced mid-download is an error, not a mix of two). A
//! server that ignores ranges (200) is read as one stream. A range that fails is fetched again,
//! up to [`ATTEMPTS`] times. Memory: at most `IN_FLIGHT + 2` ranges.
//!
//! A connection that stops delivering fails the download after `read_timeout` without a byte.

use std::io::{self, Read};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

/// Bytes per range.
pub const RANGE: u64 = 2 * 1024 * 1024;
/// Ranges downloading at once (each on its own connection).
pub const IN_FLIGHT: usize = 4;
/// Attempts per range.
pub const ATTEMPTS: u32 = 3;

/// Where the object is and how patient to be.
#[derive(Debug, Clone)]
pub struct Source {
    /// S3 client.
    pub client: Client,
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: String,
    /// Expected bucket owner, if configured.
    pub expected_bucket_owner: Option<String>,
    /// How long a connection may go without delivering a byte.
    pub read_timeout: Duration,
}

/// The first answer to a ranged GET, as the caller got it (its errors are the caller's).
pub struct First {
    /// The body.
    pub body: ByteStream,
    /// `Content-Range`, when S3 sent a part.
    pub content_range: Option<String>,
    /// The object's ETag.
    pub etag: Option<String>,
    /// The body's length.
    pub content_length: u64,
}

/// The `Range` header of the first request.
pub fn first_range() -> String {
    format!("bytes=0-{}", RANGE - 1)
}

/// The object's total size from a `Content-Range` of `bytes A-B/TOTAL`.
fn total_of(content_range: &str) -> Option<u64> {
    content_range.rsplit_once('/')?.1.trim().parse().ok()
}

/// A blocking reader of the whole object, given the answer to the first ranged GET; the size.
/// Must be called within a Tokio runtime (the ranges are fetched on it).
pub fn open(source: Source, first: First) -> (Box<dyn Read + Send>, u64) {
    let total = first.content_range.as_deref().and_then(total_of);
    let (tx, rx) = mpsc::channel(1);
    let size = match total {
        // A part: the rest comes in ranges.
        Some(total) => {
            tokio::spawn(ranges(source, first, total, tx));
            total
        }
        // The whole object in one answer.
        None => {
            let size = first.content_length;
            tokio::spawn(async move {
                forward(first.body, source.read_timeout, &tx).await;
            });
            size
        }
    };
    (
        Box::new(Chunks {
            rx,
            current: Bytes::new(),
        }),
        size,
    )
}

/// Streams `body` into `tx` chunk by chunk (one answer that is the whole object).
async fn forward(
    mut body: ByteStream,
    read_timeout: Duration,
    tx: &mpsc::Sender<io::Result<Bytes>>,
) {
    loop {
        let next = match tokio::time::timeout(read_timeout, body.next()).await {
            Err(_) => Err(stalled(read_timeout)),
            Ok(None) => return,
            Ok(Some(chunk)) => chunk.map_err(io::Error::other),
        };
        let failed = next.is_err();
        if tx.send(next).await.is_err() || failed {
            return;
        }
    }
}

fn stalled(read_timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("the download timed out: no data for {read_timeout:?} (s3.read_timeout)"),
    )
}

/// Fetches the ranges after the first, `IN_FLIGHT` at once, and sends them in order.
async fn ranges(source: Source, first: First, total: u64, tx: mpsc::Sender<io::Result<Bytes>>) {
    let etag = first.etag.clone();
    let mut queue = std::collections::VecDeque::new();
    let first_len = first.content_length;
    let timeout = source.read_timeout;
    queue.push_back(tokio::spawn(async move {
        collect(first.body, timeout, first_len).await
    }));
    let mut next = first_len.min(total);
    loop {
        while queue.len() < IN_FLIGHT && next < total {
            let end = (next + RANGE).min(total);
            let (source, etag) = (source.clone(), etag.clone());
            queue.push_back(tokio::spawn(async move {
                fetch(&source, etag, next, end).await
            }));
            next = end;
        }
        let Some(task) = queue.pop_front() else {
            return;
        };
        let chunk = match task.await {
            Ok(chunk) => chunk,
            Err(e) => Err(io::Error::other(format!("a download task failed: {e}"))),
        };
        let failed = chunk.is_err();
        if tx.send(chunk).await.is_err() || failed {
            // The reader is gone or the download failed: stop the ranges in flight.
            for task in queue {
                task.abort();
            }
            return;
        }
    }
}

/// The bytes `[start, end)`, retried up to [`ATTEMPTS`] times.
async fn fetch(source: &Source, etag: Option<String>, start: u64, end: u64) -> io::Result<Bytes> {
    let mut attempt = 1;
    loop {
        let result = async {
            let out = source
                .client
                .get_object()
                .bucket(&source.bucket)
                .key(&source.key)
                .range(format!("bytes={start}-{}", end - 1))
                .set_if_match(etag.clone())
                .set_expected_bucket_owner(source.expected_bucket_owner.clone())
                .send()
                .await
                .map_err(|e| {
                    let message = crate::upload::sdk_message(&e);
                    let kind = if message.contains("PreconditionFailed") {
                        io::ErrorKind::InvalidData
                    } else {
                        io::ErrorKind::Other
                    };
                    io::Error::new(kind, format!("bytes {start}-{}: {message}", end - 1))
                })?;
            collect(out.body, source.read_timeout, end - start).await
        }
        .await;
        match result {
            // The object changed: fetching again cannot help.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("the archive changed during the download ({e})"),
                ));
            }
            Err(e) if attempt < ATTEMPTS => {
                tracing::debug!(start, end, attempt, error = %e, "range failed, fetching it again");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// The whole body, which must be `len` bytes.
async fn collect(mut body: ByteStream, read_timeout: Duration, len: u64) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(usize::try_from(len).unwrap_or(0));
    loop {
        match tokio::time::timeout(read_timeout, body.next()).await {
            Err(_) => return Err(stalled(read_timeout)),
            Ok(None) => break,
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.map_err(io::Error::other)?),
        }
    }
    if buf.len() as u64 != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("a range ended after {} of {len} bytes", buf.len()),
        ));
    }
    Ok(buf.freeze())
}

/// The chunks, in order, as a blocking reader.
struct Chunks {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(chunk) => self.current = chunk?,
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_comes_from_the_content_range() {
        assert_eq!(total_of("bytes 0-4194303/10485760"), Some(10_485_760));
        assert_eq!(total_of("bytes 0-9/10"), Some(10));
        assert_eq!(total_of("bytes */10"), Some(10));
        assert_eq!(total_of("bytes 0-9/*"), None);
        assert_eq!(first_range(), "bytes=0-2097151");
    }
}
