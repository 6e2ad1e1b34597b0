//! Progress: where a running job is ([`Snapshot`], for `status`, systemd and `--json`), and on an
//! interactive terminal the same as one refreshed stderr line.
//! Silent when stderr is not a terminal or when running under systemd (journald gets no `\r`).

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::archive::Counters;

/// Where a running job is, for `lifeboat status`, systemd's `STATUS=` and `--json`: bytes read
/// so far, the rate, and, when the previous job on this instance says how much there was, the
/// percent and the time left (a guess: the data may have grown or shrunk since).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// Why the job runs.
    pub reason: String,
    /// `archiving` (walking, reading, compressing and uploading are one stream).
    pub phase: String,
    /// File bytes read so far.
    pub bytes_read: u64,
    /// Entries archived so far.
    pub entries: u64,
    /// Seconds since the job started.
    pub elapsed_seconds: u64,
    /// Bytes read per second, on average.
    pub rate: u64,
    /// The previous job's bytes read, the estimate of this one's.
    pub expected_bytes: Option<u64>,
    /// Of the expected bytes, read so far (at most 99 until the job ends).
    pub percent: Option<u8>,
    /// Seconds left at the average rate.
    pub eta_seconds: Option<u64>,
    /// Seconds left before the termination deadline, when there is one.
    pub deadline_seconds: Option<u64>,
}

impl Snapshot {
    /// The snapshot of a job that started `elapsed` ago.
    pub fn of(
        reason: &str,
        counters: &Counters,
        elapsed: Duration,
        expected_bytes: Option<u64>,
        deadline: Option<Duration>,
    ) -> Self {
        let read = counters.bytes_read.load(Ordering::Relaxed);
        let rate = (read as f64 / elapsed.as_secs_f64().max(0.001)) as u64;
        let expected = expected_bytes.filter(|e| *e > 0);
        let percent = expected.map(|e| ((read.saturating_mul(100) / e).min(99)) as u8);
        let eta_seconds = expected
            .filter(|_| rate > 0)
            .map(|e| e.saturating_sub(read) / rate);
        Self {
            reason: reason.to_owned(),
            phase: "archiving".into(),
            bytes_read: read,
            entries: counters.entries.load(Ordering::Relaxed),
            elapsed_seconds: elapsed.as_secs(),
            rate,
            expected_bytes: expected,
            percent,
            eta_seconds,
            deadline_seconds: deadline.map(|d| d.as_secs()),
        }
    }

    /// One line: `archiving (scale-in): 1.2 GiB of ~3.4 GiB (35%), 80 MiB/s, ETA 28s,
    /// deadline in 1m 40s`.
    pub fn line(&self) -> String {
        let mut out = format!(
            "{} ({}): {}",
            self.phase,
            self.reason,
            bytes(self.bytes_read)
        );
        if let (Some(e), Some(p)) = (self.expected_bytes, self.percent) {
            out.push_str(&format!(" of ~{} ({p}%)", bytes(e)));
        }
        out.push_str(&format!(", {}/s", bytes(self.rate)));
        if let Some(eta) = self.eta_seconds {
            out.push_str(&format!(
                ", ETA {}",
                humantime::format_duration(Duration::from_secs(eta))
            ));
        }
        if let Some(d) = self.deadline_seconds {
            out.push_str(&format!(
                ", deadline in {}",
                humantime::format_duration(Duration::from_secs(d))
            ));
        }
        out
    }
}

/// Whether progress should be shown.
pub fn wanted() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("JOURNAL_STREAM").is_none()
}

/// Human-readable bytes (`1.5 GiB`).
pub fn bytes(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}

/// Draws the progress line.
pub fn line(read: u64, entries: u64) {
    eprint!("\r\x1b[2K  {} read, {entries} entries", bytes(read));
    let _ = std::io::stderr().flush();
}

/// Clears the progress line.
pub fn clear() {
    eprint!("\r\x1b[2K");
    let _ = std::io::stderr().flush();
}

/// A running progress line; [`Progress::stop`] clears it.
pub struct Progress {
    task: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts refreshing the line from the snapshots `source` returns (the same line as
    /// `lifeboat status`: bytes, percent and ETA against the previous backup, rate, deadline),
    /// if [`wanted`].
    pub fn start(source: impl Fn() -> Option<Snapshot> + Send + 'static) -> Self {
        if !wanted() {
            return Self { task: None };
        }
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let Some(snapshot) = source() else { continue };
                eprint!("\r\x1b[2K  {}", snapshot.line());
                let _ = std::io::stderr().flush();
            }
        });
        Self { task: Some(task) }
    }

    /// Stops and clears the line.
    pub fn stop(self) {
        if let Some(task) = self.task {
            task.abort();
            clear();
        }
    }
}
