//! The job's own story, kept: while a backup job runs, its log lines (info and above, from
//! lifeboat's own modules) are also collected here, and the job stores them beside its archive
//! (`<archive stem>.log`) once the lifecycle action is completed, so what happened on an
//! instance that is gone can still be read. The SNS report names the object.
//!
//! One job at a time per process collects (the runner runs one job at a time); at most
//! [`LIMIT`] bytes are kept, then a line says how much was left out.

use std::fmt::Write as _;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// The most a job's log keeps.
pub const LIMIT: usize = 1 << 20;

/// The lines collected for the running job, when one collects.
static ACTIVE: Mutex<Option<Collected>> = Mutex::new(None);

#[derive(Default)]
struct Collected {
    text: String,
    dropped: u64,
}

/// The layer that collects; installed with the process's other log layers.
pub fn layer() -> JobLog {
    JobLog
}

/// See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct JobLog;

/// A job's collection: started with [`start`], ended with [`Capture::finish`].
#[derive(Debug)]
pub struct Capture(());

/// Starts collecting the log lines of a job (dropping what an earlier, unfinished one held).
pub fn start() -> Capture {
    *ACTIVE.lock().expect("not poisoned") = Some(Collected::default());
    Capture(())
}

impl Capture {
    /// Stops collecting; the lines collected.
    pub fn finish(self) -> String {
        let c = ACTIVE
            .lock()
            .expect("not poisoned")
            .take()
            .unwrap_or_default();
        let mut text = c.text;
        if c.dropped > 0 {
            let _ = writeln!(
                text,
                "… {} more lines left out (the job log keeps {LIMIT} bytes)",
                c.dropped
            );
        }
        text
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        ACTIVE.lock().expect("not poisoned").take();
    }
}

/// `message key=value …` of an event.
#[derive(Default)]
struct Line(String, String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.1, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.1, " {}={value}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for JobLog {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() > Level::INFO || !meta.target().starts_with("lifeboat") {
            return;
        }
        let mut active = ACTIVE.lock().expect("not poisoned");
        let Some(c) = active.as_mut() else {
            return;
        };
        let mut line = Line::default();
        event.record(&mut line);
        let now = time::OffsetDateTime::now_utc();
        let text = format!(
            "{} {:>5} {}{}\n",
            crate::manifest::rfc3339(now),
            meta.level(),
            line.0,
            line.1
        );
        if c.text.len() + text.len() > LIMIT {
            c.dropped += 1;
        } else {
            c.text.push_str(&text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::prelude::*;

    #[test]
    fn a_job_keeps_its_info_lines_and_nothing_after_it_finishes() {
        let subscriber = tracing_subscriber::registry().with(layer());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("before the job");
            let capture = start();
            tracing::info!(key = "a/b.tar.gz", "backup started");
            tracing::debug!("too detailed");
            tracing::warn!(error = "slow", "heartbeat failed");
            let text = capture.finish();
            tracing::info!("after the job");
            assert!(
                text.contains(" INFO backup started key=a/b.tar.gz\n"),
                "{text}"
            );
            assert!(
                text.contains(" WARN heartbeat failed error=slow\n"),
                "{text}"
            );
            assert!(
                !text.contains("too detailed") && !text.contains("before"),
                "{text}"
            );
            assert!(ACTIVE.lock().unwrap().is_none());
        });
    }
}
