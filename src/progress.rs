//! Progress: where a running job is ([`Snapshot`], for `status`, systemd and `--json`), and on an
//! interactive terminal the same as a progress bar ([`Bar`], indicatif).
//! Silent when stderr is not a terminal or when running under systemd (journald gets no `\r`).

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
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

/// `-q`: no progress either.
static QUIET: AtomicBool = AtomicBool::new(false);

/// Hides progress whatever stderr is (`-q`).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether progress should be shown: stderr is a terminal, not journald, and no `-q`.
pub fn wanted() -> bool {
    !QUIET.load(Ordering::Relaxed)
        && std::io::stderr().is_terminal()
        && std::env::var_os("JOURNAL_STREAM").is_none()
}

/// Human-readable bytes (`1.5 GiB`).
pub fn bytes(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}

/// A job's progress on an interactive terminal (indicatif): a bar when the previous job says how
/// much there is, a spinner when not, and beside it the same line as `lifeboat status`. Hidden
/// when not [`wanted`]; [`Bar::finish`] clears it.
pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    /// A bar on stderr, if [`wanted`]; hidden otherwise.
    pub fn new() -> Self {
        let target = if wanted() {
            ProgressDrawTarget::stderr_with_hz(4)
        } else {
            ProgressDrawTarget::hidden()
        };
        Self::with_target(target)
    }

    /// A bar drawn to `target`.
    pub fn with_target(target: ProgressDrawTarget) -> Self {
        let bar = ProgressBar::with_draw_target(None, target);
        bar.set_style(style("{spinner} {wide_msg}"));
        if !bar.is_hidden() {
            bar.enable_steady_tick(Duration::from_millis(250));
        }
        Self { bar }
    }

    /// Shows where the job is.
    pub fn show(&self, snapshot: &Snapshot) {
        if let Some(expected) = snapshot.expected_bytes {
            if self.bar.length().is_none() {
                self.bar.set_style(style("{spinner} [{bar:24}] {wide_msg}"));
            }
            // The data may have grown since the previous job: the bar stays full, not past it.
            self.bar.set_length(expected.max(snapshot.bytes_read));
        }
        self.bar.set_position(snapshot.bytes_read);
        self.bar.set_message(snapshot.line());
    }

    /// Shows bare counters (a daemon of an earlier version sends no more).
    pub fn show_counts(&self, bytes_read: u64, entries: u64) {
        self.bar
            .set_message(format!("{} read, {entries} entries", bytes(bytes_read)));
    }

    /// Clears the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Default for Bar {
    fn default() -> Self {
        Self::new()
    }
}

/// A progress style of this template (valid by construction: a test draws both).
fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("progress templates are valid")
        .progress_chars("=> ")
}

/// A running progress bar, fed from a job's snapshots; [`Progress::stop`] clears it.
pub struct Progress {
    bar: Arc<Bar>,
    task: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts showing the snapshots `source` returns (the same line as `lifeboat status`: bytes,
    /// percent and ETA against the previous backup, rate, deadline), if [`wanted`].
    pub fn start(source: impl Fn() -> Option<Snapshot> + Send + 'static) -> Self {
        let bar = Arc::new(Bar::new());
        if !wanted() {
            return Self { bar, task: None };
        }
        let shown = Arc::clone(&bar);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                if let Some(snapshot) = source() {
                    shown.show(&snapshot);
                }
            }
        });
        Self {
            bar,
            task: Some(task),
        }
    }

    /// Stops and clears the bar.
    pub fn stop(self) {
        if let Some(task) = self.task {
            task.abort();
        }
        self.bar.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::Counters;

    fn snapshot(read: u64, expected: Option<u64>) -> Snapshot {
        let counters = Counters::default();
        counters.bytes_read.store(read, Ordering::Relaxed);
        counters.entries.store(42, Ordering::Relaxed);
        Snapshot::of(
            "scale-in",
            &counters,
            Duration::from_secs(10),
            expected,
            Some(Duration::from_secs(100)),
        )
    }

    #[test]
    fn the_bar_shows_the_status_line_and_fills_to_the_expected_bytes() {
        let term = indicatif::InMemoryTerm::new(4, 160);
        let bar = Bar::with_target(ProgressDrawTarget::term_like(Box::new(term.clone())));
        bar.show(&snapshot(350 << 20, Some(1000 << 20)));
        bar.bar.tick();
        let drawn = term.contents();
        assert!(
            drawn.contains("archiving (scale-in): 350.0 MiB of ~1000.0 MiB (35%), 35.0 MiB/s"),
            "{drawn}"
        );
        assert!(drawn.contains("ETA 18s"), "{drawn}");
        assert!(drawn.contains("deadline in 1m 40s"), "{drawn}");
        // 35% of a 24-cell bar: 8 cells filled, then the head.
        assert!(drawn.contains("[========>"), "{drawn}");
        bar.finish();
        assert_eq!(term.contents().trim(), "", "finish clears the bar");
    }

    #[test]
    fn without_a_previous_job_it_is_a_spinner_with_bytes_and_rate() {
        let term = indicatif::InMemoryTerm::new(4, 160);
        let bar = Bar::with_target(ProgressDrawTarget::term_like(Box::new(term.clone())));
        bar.show(&snapshot(5 << 20, None));
        bar.bar.tick();
        let drawn = term.contents();
        assert!(
            drawn.contains("archiving (scale-in): 5.0 MiB, 512.0 KiB/s"),
            "{drawn}"
        );
        assert!(!drawn.contains('['), "{drawn}");
        bar.show_counts(7 << 20, 9);
        bar.bar.tick();
        assert!(term.contents().contains("7.0 MiB read, 9 entries"));
    }
}
