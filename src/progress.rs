//! Progress on an interactive terminal: bytes read, entries and rate on one refreshed stderr line.
//! Silent when stderr is not a terminal or when running under systemd (journald gets no `\r`).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::archive::Counters;

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
    /// Starts refreshing the line from the counters `source` returns, if [`wanted`].
    pub fn start(source: impl Fn() -> Option<Arc<Counters>> + Send + 'static) -> Self {
        if !wanted() {
            return Self { task: None };
        }
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let Some(counters) = source() else { continue };
                let read = counters.bytes_read.load(Ordering::Relaxed);
                let entries = counters.entries.load(Ordering::Relaxed);
                let rate = (read as f64 / started.elapsed().as_secs_f64().max(0.001)) as u64;
                eprint!(
                    "\r\x1b[2K  {} read, {entries} entries, {}/s",
                    bytes(read),
                    bytes(rate)
                );
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
