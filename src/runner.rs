//! The job runner: one job per instance, and the whole story of a termination around the backup
//! pipeline of [`crate::job`]: lifecycle discovery, deadline, heartbeats, completion, report.
//!
//! - **Single flight.** A notice starts a job unless one is running (then it joins and gets that
//!   job's result) or a termination job already succeeded (then it gets that result at once).
//!   Details a later notice brings (the token, the hook, "complete the action") are merged into
//!   the running job.
//! - **Deadline.** Lifecycle jobs end before the hook's global timeout, Spot jobs before the
//!   interruption time. Before it, the archive stops taking files and closes valid and `partial`,
//!   leaving time to upload, complete and report.
//! - **Never stuck, never early.** Heartbeats run while the job runs; completion waits for
//!   `Terminating:Wait`, then sends CONTINUE on success or `lifecycle.on_failure` on failure,
//!   retrying until shortly before the deadline; the SNS report comes after and never blocks it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::archive::Counters;
use crate::config::{Config, LifecycleResult};
use crate::identity::{InstanceIdentity, STANDALONE};
use crate::job::{BackupJob, JobError};
use crate::lifecycle::{ActionRef, Completed, Hook, Lifecycle, TERMINATING_WAIT};
use crate::report::{self, Report};
use crate::state::StateFile;
use crate::watch::{NoticeSource, TerminationNotice};

/// How long completion waits for the instance to reach `Terminating:Wait`.
const WAIT_FOR_TERMINATING: Duration = Duration::from_secs(120);
/// Time kept after the archive closes for upload, completion and report.
const MIN_RESERVE: Duration = Duration::from_secs(20);
/// Time kept before the deadline for the completion call itself.
const COMPLETE_MARGIN: Duration = Duration::from_secs(5);
/// The most the SNS report may take.
const REPORT_BUDGET: Duration = Duration::from_secs(15);

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
    /// Interrupted (SIGINT / SIGTERM); the upload was aborted.
    Cancelled,
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
    /// What happened to the lifecycle action.
    pub lifecycle: Option<String>,
    /// Start (RFC 3339).
    pub started_at: String,
    /// End (RFC 3339).
    pub finished_at: String,
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
    /// Wall time of the job.
    pub duration_seconds: f64,
    /// The process exit code this result maps to.
    pub exit_code: u8,
    /// The token of the lifecycle action this job completed (a duplicate trigger with the same
    /// token gets this result instead of a second backup).
    #[serde(default)]
    pub token: Option<String>,
}

/// The clients a job needs.
#[derive(Clone)]
pub struct Services {
    /// S3.
    pub s3: aws_sdk_s3::Client,
    /// Auto Scaling.
    pub lifecycle: Lifecycle,
    /// SNS.
    pub sns: aws_sdk_sns::Client,
}

impl Services {
    /// The clients from the standard chain (`region_hint` from instance metadata).
    pub async fn connect(config: &Config, region_hint: Option<&str>) -> Self {
        Self::from_sdk_config(&crate::aws::sdk_config(region_hint).await, config)
    }

    /// The clients for an SDK configuration already loaded.
    pub fn from_sdk_config(conf: &aws_config::SdkConfig, config: &Config) -> Self {
        Self {
            s3: crate::aws::s3_client(conf, config.s3.retry_budget),
            lifecycle: Lifecycle::new(crate::aws::autoscaling_client(conf)),
            sns: crate::aws::sns_client(conf),
        }
    }
}

/// What later notices add to a running job.
#[derive(Debug, Default, Clone)]
struct Hints {
    complete_lifecycle: bool,
    group: Option<String>,
    hook: Option<String>,
    token: Option<String>,
    deadline: Option<SystemTime>,
}

impl Hints {
    fn merge(&mut self, n: &TerminationNotice) {
        self.complete_lifecycle |= n.complete_lifecycle;
        self.group = self.group.take().or_else(|| n.group.clone());
        self.hook = self.hook.take().or_else(|| n.hook.clone());
        self.token = self.token.take().or_else(|| n.token.clone());
        self.deadline = match (self.deadline, n.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

struct Running {
    result: watch::Receiver<Option<JobResult>>,
    hints: Arc<Mutex<Hints>>,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Slots {
    running: Option<Running>,
    termination_done: Option<JobResult>,
}

/// Runs jobs, one at a time, for every notice source.
pub struct Runner {
    config: Arc<Config>,
    identity: InstanceIdentity,
    services: Services,
    state: Arc<StateFile>,
    shutdown: CancellationToken,
    slots: Mutex<Slots>,
}

fn is_termination(n: &TerminationNotice) -> bool {
    n.complete_lifecycle
        || matches!(
            n.source,
            NoticeSource::Spot | NoticeSource::TargetLifecycleState
        )
}

fn instant_of(t: SystemTime) -> Instant {
    match t.duration_since(SystemTime::now()) {
        Ok(ahead) => Instant::now() + ahead,
        Err(_) => Instant::now(),
    }
}

fn now_rfc3339() -> String {
    crate::manifest::rfc3339(time::OffsetDateTime::now_utc())
}

impl Runner {
    /// A runner for this instance; `shutdown` cancels a running job (SIGTERM).
    pub fn new(
        config: Arc<Config>,
        identity: InstanceIdentity,
        services: Services,
        state: Arc<StateFile>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            identity,
            services,
            state,
            shutdown,
            slots: Mutex::new(Slots::default()),
        })
    }

    /// Live counters of the running job, if any.
    pub fn progress(&self) -> Option<Arc<Counters>> {
        let slots = self.slots.lock().expect("runner lock");
        slots.running.as_ref().map(|r| Arc::clone(&r.counters))
    }

    /// Runs or joins the job for `notice` and returns its result.
    pub async fn submit(self: &Arc<Self>, notice: TerminationNotice) -> JobResult {
        self.state.record_notice(&notice);
        let mut rx = {
            let mut slots = self.slots.lock().expect("runner lock");
            if is_termination(&notice)
                && let Some(done) = &slots.termination_done
            {
                tracing::info!(reason = %notice.reason, "termination already backed up; returning that result");
                return done.clone();
            }
            if let Some(running) = &slots.running {
                running.hints.lock().expect("hints lock").merge(&notice);
                tracing::info!(reason = %notice.reason, "joining the running job");
                running.result.clone()
            } else {
                let (tx, rx) = watch::channel(None);
                let mut hints = Hints::default();
                hints.merge(&notice);
                let hints = Arc::new(Mutex::new(hints));
                let counters = Arc::new(Counters::default());
                slots.running = Some(Running {
                    result: rx.clone(),
                    hints: Arc::clone(&hints),
                    counters: Arc::clone(&counters),
                });
                let this = Arc::clone(self);
                tokio::spawn(async move {
                    let result = this.run_job(&notice, &hints, counters).await;
                    this.state.record_result(&result);
                    {
                        let mut slots = this.slots.lock().expect("runner lock");
                        slots.running = None;
                        let termination = is_termination(&notice)
                            || hints.lock().expect("hints").complete_lifecycle;
                        if termination
                            && matches!(result.status, JobStatus::Succeeded | JobStatus::Partial)
                        {
                            slots.termination_done = Some(result.clone());
                        }
                    }
                    let _ = tx.send(Some(result));
                });
                rx
            }
        };
        loop {
            if let Some(result) = rx.borrow_and_update().clone() {
                return result;
            }
            if rx.changed().await.is_err() {
                return rx
                    .borrow()
                    .clone()
                    .expect("the job sends its result before it ends");
            }
        }
    }

    /// Finds the lifecycle action for this instance: group, hook and its settings.
    async fn resolve_action(
        &self,
        hints: &Hints,
        until: Instant,
    ) -> Result<(ActionRef, Hook), String> {
        let lc = &self.services.lifecycle;
        let id = &self.identity.instance_id;
        let group = match hints
            .group
            .clone()
            .or_else(|| (self.identity.group != STANDALONE).then(|| self.identity.group.clone()))
        {
            Some(g) => g,
            None => match lc.describe_instance(id, until).await {
                Ok(Some((g, _))) => g,
                Ok(None) => return Err(format!("instance {id} is not in an Auto Scaling group")),
                Err(e) => return Err(e.to_string()),
            },
        };
        let wanted = hints
            .hook
            .as_deref()
            .or(self.config.lifecycle.hook_name.as_deref());
        let hook = lc
            .terminate_hook(&group, wanted, id, until)
            .await
            .map_err(|e| e.to_string())?;
        Ok((
            ActionRef {
                group,
                hook: hook.name.clone(),
                instance_id: id.clone(),
                token: hints.token.clone(),
            },
            hook,
        ))
    }

    async fn run_job(
        &self,
        notice: &TerminationNotice,
        hints: &Arc<Mutex<Hints>>,
        counters: Arc<Counters>,
    ) -> JobResult {
        let started_at = now_rfc3339();
        let clock = Instant::now();
        let snapshot = hints.lock().expect("hints").clone();
        // A first deadline for discovery itself: the notice's, or a generous hour.
        let discovery_until = snapshot
            .deadline
            .map(instant_of)
            .unwrap_or_else(|| clock + Duration::from_secs(3600));
        let mut action: Option<(ActionRef, Hook)> = None;
        let mut lifecycle_error: Option<String> = None;
        if snapshot.complete_lifecycle {
            match self.resolve_action(&snapshot, discovery_until).await {
                Ok(found) => action = Some(found),
                Err(e) => {
                    tracing::error!(error = %e, "cannot find the lifecycle action");
                    lifecycle_error = Some(e);
                }
            }
        }
        let deadline = [
            snapshot.deadline.map(instant_of),
            action.as_ref().map(|(_, h)| clock + h.global_timeout()),
        ]
        .into_iter()
        .flatten()
        .min();
        tracing::info!(
            reason = %notice.reason,
            deadline_in_s = deadline.map(|d| d.saturating_duration_since(Instant::now()).as_secs()),
            "job started"
        );

        // Heartbeats while the job runs.
        let beating = CancellationToken::new();
        if let Some((a, hook)) = &action {
            let interval = self
                .config
                .lifecycle
                .heartbeat_interval
                .unwrap_or(hook.heartbeat_timeout / 2)
                .max(Duration::from_secs(1));
            let until = deadline.unwrap_or(clock + hook.global_timeout());
            tokio::spawn(heartbeat_loop(
                self.services.lifecycle.clone(),
                a.clone(),
                interval,
                until,
                beating.clone(),
            ));
        }

        // Stop taking files early enough to close, upload, complete and report.
        let stop = Arc::new(AtomicBool::new(false));
        let stopper = deadline.map(|d| {
            let total = d.saturating_duration_since(clock);
            let reserve = (total / 4).clamp(MIN_RESERVE.min(total / 2), Duration::from_secs(300));
            let at = d.checked_sub(reserve).unwrap_or(d);
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                tracing::warn!("deadline near: closing the archive as partial");
                stop.store(true, Ordering::Relaxed);
            })
        });

        let job = BackupJob {
            config: &self.config,
            reason: notice.reason.clone(),
            identity: self.identity.clone(),
            s3: self.services.s3.clone(),
            cancel: self.shutdown.child_token(),
            counters,
            stop: Arc::clone(&stop),
        };
        let outcome = job.run().await;
        beating.cancel();
        if let Some(s) = stopper {
            s.abort();
        }
        let (status, object_url, error, manifest) = match &outcome {
            Ok(o) => (
                if o.manifest.partial {
                    JobStatus::Partial
                } else {
                    JobStatus::Succeeded
                },
                Some(format!("s3://{}/{}", o.manifest.bucket, o.manifest.key)),
                None,
                Some(&o.manifest),
            ),
            Err(JobError::Cancelled) => (
                JobStatus::Cancelled,
                None,
                Some(JobError::Cancelled.to_string()),
                None,
            ),
            Err(e) => (JobStatus::Failed, None, Some(e.to_string()), None),
        };

        // Completion: the action found at the start, or one a joining notice asked for.
        let latest = hints.lock().expect("hints").clone();
        if action.is_none() && latest.complete_lifecycle && lifecycle_error.is_none() {
            let until = deadline.unwrap_or(Instant::now() + Duration::from_secs(600));
            match self.resolve_action(&latest, until).await {
                Ok(found) => action = Some(found),
                Err(e) => lifecycle_error = Some(e),
            }
        }
        let mut lifecycle = lifecycle_error.map(|e| format!("not completed: {e}"));
        let mut result_sent = None;
        let mut completed_token = None;
        if let Some((mut a, hook)) = action {
            a.token = a.token.or(latest.token);
            completed_token.clone_from(&a.token);
            let result = if matches!(status, JobStatus::Succeeded | JobStatus::Partial) {
                LifecycleResult::Continue
            } else {
                self.config.lifecycle.on_failure
            };
            let until = deadline
                .unwrap_or(clock + hook.global_timeout())
                .checked_sub(COMPLETE_MARGIN)
                .unwrap_or_else(Instant::now);
            lifecycle = Some(self.complete(&a, result, until).await);
            result_sent = Some(result.as_str());
        }

        let exit_code = match status {
            JobStatus::Succeeded | JobStatus::Partial => 0,
            JobStatus::Failed => 1,
            JobStatus::Cancelled => 143,
        };
        let result = JobResult {
            status,
            reason: notice.reason.clone(),
            source: notice.source,
            object_url: object_url.clone(),
            error: error.clone(),
            lifecycle,
            started_at,
            finished_at: now_rfc3339(),
            file_count: manifest.map_or(0, |m| m.file_count),
            bytes_read: manifest.map_or(0, |m| m.bytes_read),
            bytes_stored: manifest.map_or(0, |m| m.bytes_stored),
            skipped: manifest.map_or(0, |m| m.skipped.len() as u64),
            changed: manifest.map_or(0, |m| m.changed.len() as u64),
            duration_seconds: clock.elapsed().as_secs_f64(),
            exit_code,
            token: completed_token,
        };
        if let Some(topic) = &self.config.sns.topic_arn {
            let report = Report {
                status: match status {
                    JobStatus::Succeeded => "succeeded",
                    JobStatus::Partial => "partial",
                    JobStatus::Failed | JobStatus::Cancelled => "failed",
                }
                .into(),
                instance_id: self.identity.instance_id.clone(),
                group: latest
                    .group
                    .clone()
                    .unwrap_or_else(|| self.identity.group.clone()),
                reason: notice.reason.clone(),
                partial: status == JobStatus::Partial,
                file_count: result.file_count,
                bytes_read: result.bytes_read,
                bytes_stored: result.bytes_stored,
                duration_seconds: result.duration_seconds,
                object_url,
                skipped: result.skipped,
                error,
                lifecycle_result: result_sent.map(str::to_owned),
            };
            match tokio::time::timeout(
                REPORT_BUDGET,
                report::publish(&self.services.sns, topic, &report),
            )
            .await
            {
                Ok(Ok(id)) => tracing::info!(message_id = %id, "report published"),
                Ok(Err(e)) => tracing::error!(error = %e, "SNS report failed"),
                Err(_) => tracing::error!("SNS report timed out"),
            }
        }
        tracing::info!(status = ?result.status, lifecycle = ?result.lifecycle, "job finished");
        result
    }

    /// Waits for `Terminating:Wait` (the target state may change before the transition), then
    /// completes; returns what happened, for the result.
    async fn complete(&self, a: &ActionRef, result: LifecycleResult, until: Instant) -> String {
        let lc = &self.services.lifecycle;
        let wait_until = (Instant::now() + WAIT_FOR_TERMINATING).min(until);
        let mut attempt = 0;
        loop {
            match lc.describe_instance(&a.instance_id, until).await {
                Ok(Some((_, state))) if state == TERMINATING_WAIT => break,
                Ok(None) => return "not completed: the instance is no longer in its group".into(),
                Ok(Some((_, state))) if Instant::now() >= wait_until => {
                    return format!(
                        "not completed: the instance is {state}, not {TERMINATING_WAIT}"
                    );
                }
                Err(e) if Instant::now() >= wait_until => {
                    // Cannot confirm; completing by token or instance id is still right.
                    tracing::warn!(error = %e, "cannot confirm Terminating:Wait; completing anyway");
                    break;
                }
                _ => {
                    attempt += 1;
                    tokio::time::sleep(
                        crate::lifecycle::backoff(
                            attempt.min(4),
                            Duration::from_secs(1),
                            Duration::from_secs(5),
                        ) + Duration::from_millis(200),
                    )
                    .await;
                }
            }
        }
        match lc.complete(a, result, until).await {
            Ok(Completed::Now) => format!("completed with {}", result.as_str()),
            Ok(Completed::AlreadyDone) => "already completed".into(),
            Err(e) => format!("not completed: {e}"),
        }
    }
}

/// Heartbeats every `interval`, starting at a random phase so a fleet does not beat in step.
async fn heartbeat_loop(
    lc: Lifecycle,
    action: ActionRef,
    interval: Duration,
    until: Instant,
    stop: CancellationToken,
) {
    let mut next = Instant::now() + interval.mul_f64(fastrand::f64());
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
        }
        if Instant::now() >= until {
            return;
        }
        match lc.heartbeat(&action, until).await {
            Ok(true) => tracing::debug!(instance_id = %action.instance_id, "heartbeat"),
            Ok(false) => {
                tracing::warn!("heartbeat: no active lifecycle action any more");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        next += interval;
    }
}
