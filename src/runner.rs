//! The job runner: the one owner of the termination story around a backup. [`Runner::run_job`]
//! reads as the story's steps; everything else here is one of them.
//!
//! - **Single flight.** One job per instance, for the daemon and for `lifeboat backup` without one
//!   ([`Runner::submit_exclusive`] adds a lock file across processes). A notice starts a job unless
//!   one is running (then it joins and gets that job's result) or the termination was already
//!   settled (then it gets that result at once).
//! - **Joining notices count.** A notice that joins a running job brings its deadline (the
//!   earliest binds) and its lifecycle action (heartbeats start as soon as one is known).
//! - **Deadline.** [`Deadline`]: the Spot interruption time, the hook's global timeout. Before
//!   it the archive stops taking data and closes valid and `partial`.
//! - **Never stuck, never early.** Heartbeats ([`Heartbeats`]) run while the job runs; completion
//!   waits for `Terminating:Wait` (or `Warmed:Terminating:Wait`), then sends CONTINUE when the data
//!   is stored and `lifecycle.on_failure` when not, retrying until shortly before the deadline. An
//!   *interrupted* job (SIGTERM: a package upgrade restarting the service) completes nothing: the
//!   hook keeps the instance and the next daemon backs it up again. The SNS report comes last and
//!   never blocks completion.
//!
//! The outside world is reached through two narrow traits, [`LifecycleApi`] (Auto Scaling) and
//! [`BackupApi`] (the pipeline and SNS), so the timing rules are unit-tested with tokio's paused
//! time; the process tests in `tests/it/daemon.rs` run the same code against moto.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::archive::Counters;
use crate::config::{Config, LifecycleResult};
use crate::deadline::Deadline;
use crate::identity::{InstanceIdentity, STANDALONE};
use crate::job::{ActionOutcome, BackupJob, JobError, JobResult, JobStatus, Stored};
use crate::lifecycle::{
    ActionRef, Completed, Hook, Lifecycle, LifecycleError, NOT_ACTIVE_GRACE, TERMINATING_WAIT,
};
use crate::report::{self, Report, ReportError};
use crate::state::StateFile;
use crate::watch::{NoticeSource, TerminationNotice};

/// The lifecycle state of a warm-pool instance held by a terminate hook.
pub const WARMED_TERMINATING_WAIT: &str = "Warmed:Terminating:Wait";
/// How long completion waits for the instance to reach a `…Terminating:Wait` state.
const WAIT_FOR_TERMINATING: Duration = Duration::from_secs(120);
/// The most the SNS report may take.
const REPORT_BUDGET: Duration = Duration::from_secs(15);
/// The most the report of an interrupted job may take.
const INTERRUPTED_REPORT_BUDGET: Duration = Duration::from_secs(3);
/// How long storing the job's log may hold up its report (an interrupted job's: a second).
const LOG_BUDGET: Duration = Duration::from_secs(3);
/// How long completion may take for a job without a deadline.
const UNBOUNDED_COMPLETION: Duration = Duration::from_secs(600);

/// How long completion goes on after a stop signal (systemctl stop, SSM's cancel): a working
/// API answers within it; against one that does not, lifeboat leaves the action pending and
/// exits instead of retrying until the deadline.
const COMPLETION_AFTER_SIGNAL: Duration = Duration::from_secs(10);
/// The first heartbeat comes within this long of the action being found (jittered) when the
/// action may have begun long before (a restarted daemon, a command the Lambda sent late).
const FIRST_BEAT_WITHIN: Duration = Duration::from_secs(5);
/// How long the daemon trusts the terminate hook's settings it read (DescribeLifecycleHooks),
/// and how often it reads them again: a termination then needs no describe call, which matters
/// when a thousand instances share the account's Auto Scaling rate limit.
const HOOK_TTL: Duration = Duration::from_secs(3600);
/// The daemon's first read of the hook comes within this long of its start (jittered, so a
/// fleet started together does not describe in step).
const HOOK_PREFETCH_WITHIN: Duration = Duration::from_secs(30);

/// A boxed future, for the object-safe traits below.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Auto Scaling as the story uses it (implemented by [`Lifecycle`]; faked in unit tests).
pub trait LifecycleApi: Send + Sync + 'static {
    /// The group and lifecycle state of an instance (`None`: not in a group).
    fn describe_instance<'a>(
        &'a self,
        instance_id: &'a str,
        until: Instant,
    ) -> BoxFuture<'a, Result<Option<(String, String)>, LifecycleError>>;
    /// The group's terminate hook.
    fn terminate_hook<'a>(
        &'a self,
        group: &'a str,
        configured: Option<&'a str>,
        instance_id: &'a str,
        until: Instant,
    ) -> BoxFuture<'a, Result<Hook, LifecycleError>>;
    /// One heartbeat; `Ok(false)`: no active action.
    fn heartbeat<'a>(
        &'a self,
        action: &'a ActionRef,
        until: Instant,
    ) -> BoxFuture<'a, Result<bool, LifecycleError>>;
    /// Completes the action.
    fn complete<'a>(
        &'a self,
        action: &'a ActionRef,
        result: LifecycleResult,
        until: Instant,
    ) -> BoxFuture<'a, Result<Completed, LifecycleError>>;
}

impl LifecycleApi for Lifecycle {
    fn describe_instance<'a>(
        &'a self,
        instance_id: &'a str,
        until: Instant,
    ) -> BoxFuture<'a, Result<Option<(String, String)>, LifecycleError>> {
        Box::pin(Lifecycle::describe_instance(self, instance_id, until))
    }
    fn terminate_hook<'a>(
        &'a self,
        group: &'a str,
        configured: Option<&'a str>,
        instance_id: &'a str,
        until: Instant,
    ) -> BoxFuture<'a, Result<Hook, LifecycleError>> {
        Box::pin(Lifecycle::terminate_hook(
            self,
            group,
            configured,
            instance_id,
            until,
        ))
    }
    fn heartbeat<'a>(
        &'a self,
        action: &'a ActionRef,
        until: Instant,
    ) -> BoxFuture<'a, Result<bool, LifecycleError>> {
        Box::pin(Lifecycle::heartbeat(self, action, until))
    }
    fn complete<'a>(
        &'a self,
        action: &'a ActionRef,
        result: LifecycleResult,
        until: Instant,
    ) -> BoxFuture<'a, Result<Completed, LifecycleError>> {
        Box::pin(Lifecycle::complete(self, action, result, until))
    }
}

/// What one backup run gets from the story.
pub struct BackupRun {
    /// Why it runs (part of the key).
    pub reason: String,
    /// Cancelled on SIGINT / SIGTERM: abort, store nothing.
    pub cancel: CancellationToken,
    /// Live counters for progress displays.
    pub counters: Arc<Counters>,
    /// Set at the partial stop: close the archive valid and `partial`.
    pub stop: Arc<AtomicBool>,
}

/// The backup pipeline and the report (implemented by [`Services`]; faked in unit tests).
pub trait BackupApi: Send + Sync + 'static {
    /// Runs one backup to the end.
    fn backup(&self, run: BackupRun) -> BoxFuture<'static, Result<Stored, JobError>>;
    /// Publishes a report; its message id.
    fn publish<'a>(&'a self, report: &'a Report) -> BoxFuture<'a, Result<String, ReportError>>;
    /// After a successful backup, once its action is completed and its report sent: applies
    /// `[retention]` to this instance's own archives when `retention.after_backup` says so.
    /// Failures are logged; the job's result stands.
    fn prune_own(&self) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
    /// Stores the job's log lines beside its archive (`archive`: its `s3://` URL), or, when
    /// none was stored, where an archive of a job `started` for `reason` would have been; the
    /// log's `s3://` URL, or `None` when nothing is kept.
    fn store_log(
        &self,
        _archive: Option<String>,
        _started: OffsetDateTime,
        _reason: String,
        _text: String,
    ) -> BoxFuture<'static, Result<Option<String>, String>> {
        Box::pin(async { Ok(None) })
    }
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

/// The real pipeline: [`BackupJob`] into S3, reports on SNS.
struct Pipeline {
    config: Arc<Config>,
    identity: InstanceIdentity,
    s3: aws_sdk_s3::Client,
    sns: aws_sdk_sns::Client,
}

impl BackupApi for Pipeline {
    fn backup(&self, run: BackupRun) -> BoxFuture<'static, Result<Stored, JobError>> {
        let (config, identity, s3) = (
            Arc::clone(&self.config),
            self.identity.clone(),
            self.s3.clone(),
        );
        Box::pin(async move {
            let job = BackupJob {
                config: &config,
                reason: run.reason,
                identity,
                s3,
                cancel: run.cancel,
                counters: run.counters,
                stop: run.stop,
            };
            job.run().await.map(|o| Stored::from(&o.manifest))
        })
    }

    fn publish<'a>(&'a self, r: &'a Report) -> BoxFuture<'a, Result<String, ReportError>> {
        Box::pin(async move {
            match &self.config.sns.topic_arn {
                Some(topic) => report::publish(&self.sns, topic, r).await,
                None => Ok(String::new()),
            }
        })
    }

    fn store_log(
        &self,
        archive: Option<String>,
        started: OffsetDateTime,
        reason: String,
        text: String,
    ) -> BoxFuture<'static, Result<Option<String>, String>> {
        let (config, identity, s3) = (
            Arc::clone(&self.config),
            self.identity.clone(),
            self.s3.clone(),
        );
        Box::pin(async move {
            let bucket_url = format!("s3://{}/", config.s3.bucket);
            let archive_key = archive
                .and_then(|url| url.strip_prefix(&bucket_url).map(str::to_owned))
                .unwrap_or_else(|| {
                    crate::manifest::archive_key(
                        &config.s3.prefix,
                        &identity,
                        started,
                        &reason,
                        config.backup.compression,
                    )
                });
            let key = crate::manifest::log_key(&archive_key);
            // STANDARD, as manifests: read when something went wrong, whatever the archive's class.
            let dest = crate::upload::Destination::new(
                &config.s3,
                key.clone(),
                "text/plain; charset=utf-8",
            )
            .standard();
            crate::upload::put_small(&s3, &dest, text.into_bytes()).await?;
            Ok(Some(format!("{bucket_url}{key}")))
        })
    }

    fn prune_own(&self) -> BoxFuture<'static, ()> {
        let (config, identity, s3) = (
            Arc::clone(&self.config),
            self.identity.clone(),
            self.s3.clone(),
        );
        Box::pin(async move {
            if !config.retention.after_backup {
                return;
            }
            let filter = crate::catalog::ListFilter {
                instance_id: Some(identity.instance_id.clone()),
                group: Some(identity.group.clone()),
                ..Default::default()
            };
            let pruned = async {
                let plan =
                    crate::prune::plan(&s3, &config.s3, &config.retention, &filter, &config.source)
                        .await?;
                let doomed: Vec<String> = plan
                    .into_iter()
                    .filter(|(_, v)| *v == crate::prune::Verdict::Delete)
                    .map(|(e, _)| e.key)
                    .collect();
                if doomed.is_empty() {
                    return Ok(0);
                }
                crate::prune::delete(&s3, &config.s3, &doomed).await?;
                Ok::<_, crate::prune::PruneError>(doomed.len())
            };
            match tokio::time::timeout(PRUNE_BUDGET, pruned).await {
                Ok(Ok(0)) => tracing::debug!("retention: nothing to prune"),
                Ok(Ok(n)) => tracing::info!(
                    archives = n,
                    "retention: pruned this instance's older archives"
                ),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "retention: pruning after the backup failed")
                }
                Err(_) => tracing::warn!(
                    budget_s = PRUNE_BUDGET.as_secs(),
                    "retention: pruning after the backup took too long; the next backup tries again"
                ),
            }
        })
    }
}

/// How long pruning after a backup may take.
const PRUNE_BUDGET: Duration = Duration::from_secs(120);

/// What the notices of one job asked for, merged.
#[derive(Debug, Default, Clone)]
struct Hints {
    complete_lifecycle: bool,
    group: Option<String>,
    hook: Option<String>,
    token: Option<String>,
    deadline: Deadline,
    /// The lifecycle action began after this, when every notice asking to complete it says so.
    action_began_after: Option<SystemTime>,
    /// The hook's heartbeat timeout, when a notice that names the hook brings it.
    hook_heartbeat_timeout: Option<Duration>,
}

impl Hints {
    fn merge(&mut self, n: &TerminationNotice) {
        if n.complete_lifecycle {
            self.action_began_after = if self.complete_lifecycle {
                self.action_began_after.min(n.action_began_after)
            } else {
                n.action_began_after
            };
        }
        self.complete_lifecycle |= n.complete_lifecycle;
        self.group = self.group.take().or_else(|| n.group.clone());
        self.hook = self.hook.take().or_else(|| n.hook.clone());
        self.token = self.token.take().or_else(|| n.token.clone());
        if n.hook.is_some() && self.hook == n.hook {
            self.hook_heartbeat_timeout = self
                .hook_heartbeat_timeout
                .or(n.hook_heartbeat_timeout_s.map(Duration::from_secs));
        }
        if let Some(t) = n.deadline {
            self.deadline = self.deadline.earliest(Deadline::at_system(t));
        }
    }
}

struct Running {
    result: watch::Receiver<Option<JobResult>>,
    hints: watch::Sender<Hints>,
    counters: Arc<Counters>,
    reason: String,
    started: Instant,
    /// The previous job's bytes read, this one's estimate (for progress).
    expected_bytes: Option<u64>,
}

#[derive(Default)]
struct Slots {
    running: Option<Running>,
    /// The result that settled this instance's termination; cleared when a new lifecycle starts
    /// (warm pools, instance reuse).
    termination_done: Option<JobResult>,
}

impl Slots {
    /// Keeps a result that settled this instance's termination, to answer later notices.
    fn remember(&mut self, result: &JobResult) {
        if result.settles_termination()
            && (result.lifecycle.is_some() || is_termination_source(result.source))
        {
            self.termination_done = Some(result.clone());
        }
    }
}

/// Runs jobs, one at a time, for every notice source.
pub struct Runner {
    config: Arc<Config>,
    identity: InstanceIdentity,
    lifecycle: Arc<dyn LifecycleApi>,
    pipeline: Arc<dyn BackupApi>,
    state: Arc<StateFile>,
    shutdown: CancellationToken,
    slots: Mutex<Slots>,
    hooks: Arc<HookCache>,
}

/// The terminate hook's settings as last read, by group and configured name; `reread` wakes
/// the read-ahead loop.
#[derive(Default)]
struct HookCache {
    cached: Mutex<Option<CachedHook>>,
    reread: tokio::sync::Notify,
}

/// Group, configured hook name, the hook, when it was read.
type CachedHook = (String, Option<String>, Hook, Instant);

impl HookCache {
    /// The cached hook of `group` (configured name `wanted`), if read within [`HOOK_TTL`].
    fn get(&self, group: &str, wanted: Option<&str>) -> Option<Hook> {
        let cached = self.cached.lock().expect("hook cache lock");
        cached
            .as_ref()
            .filter(|(g, w, _, at)| g == group && w.as_deref() == wanted && at.elapsed() < HOOK_TTL)
            .map(|(_, _, hook, _)| hook.clone())
    }

    /// Forgets the hook's settings (a termination before the next read describes it) and reads
    /// them again now.
    fn reread(&self) {
        *self.cached.lock().expect("hook cache lock") = None;
        self.reread.notify_one();
    }

    fn put(&self, group: &str, wanted: Option<&str>, hook: &Hook) {
        *self.cached.lock().expect("hook cache lock") = Some((
            group.to_owned(),
            wanted.map(str::to_owned),
            hook.clone(),
            Instant::now(),
        ));
    }
}

/// A notice that the instance is going away (not a manual or early backup).
fn is_termination(n: &TerminationNotice) -> bool {
    n.complete_lifecycle || is_termination_source(n.source)
}

impl Runner {
    /// A runner for this instance with the real services; `shutdown` interrupts a running job.
    pub fn new(
        config: Arc<Config>,
        identity: InstanceIdentity,
        services: Services,
        state: Arc<StateFile>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let pipeline = Pipeline {
            config: Arc::clone(&config),
            identity: identity.clone(),
            s3: services.s3,
            sns: services.sns,
        };
        Self::with_parts(
            config,
            identity,
            Arc::new(services.lifecycle),
            Arc::new(pipeline),
            state,
            shutdown,
        )
    }

    /// A runner over any lifecycle and pipeline (the unit tests' fakes).
    pub fn with_parts(
        config: Arc<Config>,
        identity: InstanceIdentity,
        lifecycle: Arc<dyn LifecycleApi>,
        pipeline: Arc<dyn BackupApi>,
        state: Arc<StateFile>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            identity,
            lifecycle,
            pipeline,
            state,
            shutdown,
            slots: Mutex::new(Slots::default()),
            hooks: Arc::default(),
        })
    }

    /// The configured hook name, if any.
    fn wanted_hook(&self) -> Option<String> {
        self.config.lifecycle.hook_name.clone()
    }

    /// Reads the group's terminate hook now (within [`HOOK_PREFETCH_WITHIN`], jittered), every
    /// [`HOOK_TTL`] and on [`Runner::reread_hook`], so a termination finds it cached. Off a
    /// group, nothing.
    pub fn prefetch_hook(self: &Arc<Self>) {
        if self.identity.group == STANDALONE {
            return;
        }
        let runner = Arc::clone(self);
        tokio::spawn(async move {
            let mut pause = HOOK_PREFETCH_WITHIN.mul_f64(fastrand::f64());
            loop {
                tokio::select! {
                    () = runner.shutdown.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                    () = runner.hooks.reread.notified() => {}
                }
                let (group, wanted) = (&runner.identity.group, runner.wanted_hook());
                let until = Instant::now() + Duration::from_secs(120);
                match runner
                    .lifecycle
                    .terminate_hook(
                        group,
                        wanted.as_deref(),
                        &runner.identity.instance_id,
                        until,
                    )
                    .await
                {
                    Ok(hook) => runner.hooks.put(group, wanted.as_deref(), &hook),
                    Err(e) => tracing::info!(error = %e, "terminate hook not read ahead"),
                }
                pause = HOOK_TTL.mul_f64(0.9 + 0.1 * fastrand::f64());
            }
        });
    }

    /// Reads the terminate hook's settings again now (SIGHUP: after an operator changed the
    /// hook, e.g. shortened its heartbeat timeout); until then a termination describes it.
    pub fn reread_hook(&self) {
        tracing::info!("reading the terminate hook's settings again");
        self.hooks.reread();
    }

    /// Whether this lifecycle's termination has been backed up (no snapshot after that).
    pub fn terminated(&self) -> bool {
        self.slots
            .lock()
            .expect("runner lock")
            .termination_done
            .is_some()
    }

    /// Where the running job is ([`crate::progress::Snapshot`]), estimated against the
    /// previous job's bytes read; `None` when no job runs.
    pub fn job_progress(&self) -> Option<crate::progress::Snapshot> {
        let slots = self.slots.lock().expect("runner lock");
        let r = slots.running.as_ref()?;
        let deadline = r.hints.borrow().deadline.remaining();
        Some(crate::progress::Snapshot::of(
            &r.reason,
            &r.counters,
            r.started.elapsed(),
            r.expected_bytes,
            deadline,
        ))
    }

    /// Live counters of the running job, if any.
    pub fn progress(&self) -> Option<Arc<Counters>> {
        let slots = self.slots.lock().expect("runner lock");
        slots.running.as_ref().map(|r| Arc::clone(&r.counters))
    }

    /// A new lifecycle began (the instance went back in service or into a warm pool): a later
    /// termination is a new one and gets a new backup.
    pub fn new_lifecycle(&self) {
        let mut slots = self.slots.lock().expect("runner lock");
        if slots.termination_done.take().is_some() {
            tracing::info!("new lifecycle: the next termination gets a new backup");
        }
    }

    /// Like [`Runner::submit`], but also one at a time across processes (`lifeboat backup`
    /// without a daemon): waits on the lock file, and a job that finished while it waited answers
    /// this notice too.
    pub async fn submit_exclusive(self: &Arc<Self>, notice: TerminationNotice) -> JobResult {
        let since = OffsetDateTime::now_utc();
        let (_lock, waited) = lock().await;
        if waited
            && let Some(last) = self.state.reload().last_job
            && last.finished_at >= since
        {
            tracing::info!("joined a backup that finished while this one waited");
            return last;
        }
        self.submit(notice).await
    }

    /// Runs or joins the job for `notice` and returns its result.
    pub async fn submit(self: &Arc<Self>, notice: TerminationNotice) -> JobResult {
        self.state.record_notice(&notice);
        let admitted = {
            let mut slots = self.slots.lock().expect("runner lock");
            if let Some(done) = self.already_settled(&slots, &notice) {
                if notice.complete_lifecycle && done.lifecycle.is_none() {
                    Err(done)
                } else {
                    tracing::info!(reason = %notice.reason, "termination already backed up; returning that result");
                    return done;
                }
            } else if let Some(running) = &slots.running {
                running.hints.send_modify(|h| h.merge(&notice));
                tracing::info!(reason = %notice.reason, "joining the running job");
                Ok(running.result.clone())
            } else {
                let (tx, rx) = watch::channel(None);
                let mut hints = Hints::default();
                hints.merge(&notice);
                let (hints_tx, hints_rx) = watch::channel(hints);
                let counters = Arc::new(Counters::default());
                slots.running = Some(Running {
                    result: rx.clone(),
                    hints: hints_tx,
                    counters: Arc::clone(&counters),
                    reason: notice.reason.clone(),
                    started: Instant::now(),
                    expected_bytes: self
                        .state
                        .snapshot()
                        .last_job
                        .map(|j| j.bytes_read)
                        .filter(|b| *b > 0),
                });
                let this = Arc::clone(self);
                let notice = notice.clone();
                tokio::spawn(async move {
                    let result = Arc::clone(&this)
                        .run_guarded(notice, hints_rx, counters)
                        .await;
                    this.finish(&result);
                    let _ = tx.send(Some(result));
                });
                Ok(rx)
            }
        };
        let mut rx = match admitted {
            Ok(rx) => rx,
            // Backed up for a Spot notice; now Auto Scaling holds the instance too.
            Err(done) => return self.complete_after(done, &notice).await,
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

    /// The result that already answers `notice`: this termination settled in this process, or
    /// the same lifecycle action (by token) settled in an earlier one.
    fn already_settled(&self, slots: &Slots, notice: &TerminationNotice) -> Option<JobResult> {
        if is_termination(notice)
            && let Some(done) = &slots.termination_done
        {
            return Some(done.clone());
        }
        let token = notice.token.as_ref()?;
        self.state
            .reload()
            .last_job
            .filter(|last| last.token.as_ref() == Some(token) && last.settles_termination())
    }

    /// Completes the lifecycle action a later notice brings for a termination already backed up
    /// (a Spot instance in a group: the Spot notice first, then its terminate hook): no second
    /// backup, but the hook is not left to time out.
    async fn complete_after(&self, done: JobResult, notice: &TerminationNotice) -> JobResult {
        let mut hints = Hints::default();
        hints.merge(notice);
        let mut story = Story::new(self, hints, Instant::now());
        let lifecycle = story.complete_action(done.status).await;
        let result = JobResult { lifecycle, ..done };
        self.state.record_result(&result);
        self.slots.lock().expect("runner lock").remember(&result);
        result
    }

    /// Records the result and frees the slot.
    fn finish(&self, result: &JobResult) {
        self.state.record_result(result);
        let mut slots = self.slots.lock().expect("runner lock");
        slots.running = None;
        slots.remember(result);
    }

    /// Runs the job in a task of its own: a panic anywhere in the story is a failed job whose
    /// action is still completed (with `on_failure`), never a runner stuck with a slot taken.
    async fn run_guarded(
        self: Arc<Self>,
        notice: TerminationNotice,
        hints: watch::Receiver<Hints>,
        counters: Arc<Counters>,
    ) -> JobResult {
        let started_at = OffsetDateTime::now_utc();
        let latest = hints.clone();
        let job = tokio::spawn(Arc::clone(&self).run_job(notice.clone(), hints, counters));
        match job.await {
            Ok(result) => result,
            Err(e) => {
                tracing::error!(error = %e, "the job panicked; completing its action as failed");
                let mut story = Story::new(&self, latest.borrow().clone(), Instant::now());
                let error = JobError::Thread(e.to_string());
                let lifecycle = story.complete_action(JobStatus::Failed).await;
                let result = story.result(
                    &notice,
                    started_at,
                    JobStatus::Failed,
                    None,
                    Some(error.to_string()),
                    lifecycle,
                );
                self.publish_report(&result, &story.hints).await;
                result
            }
        }
    }

    /// The story of one job, step by step.
    async fn run_job(
        self: Arc<Self>,
        notice: TerminationNotice,
        mut hints: watch::Receiver<Hints>,
        counters: Arc<Counters>,
    ) -> JobResult {
        let started_at = OffsetDateTime::now_utc();
        let log = crate::joblog::start();
        // 1. What the notices ask for so far: deadline, lifecycle action.
        let mut story = Story::new(&self, hints.borrow_and_update().clone(), Instant::now());
        tracing::info!(
            reason = %notice.reason,
            deadline_in_s = story.deadline.remaining().map(|d| d.as_secs()),
            "job started"
        );
        // 2. The backup, in a task of its own (a panic in it is a failed backup).
        let backup = tokio::spawn(self.pipeline.backup(BackupRun {
            reason: notice.reason.clone(),
            cancel: story.cancel.clone(),
            counters,
            stop: Arc::clone(&story.stop),
        }));
        // 3. While it runs: joining notices, the lifecycle action, heartbeats, the partial stop,
        //    and the time box that keeps completion on time.
        let outcome = story.follow(backup, &mut hints).await;
        let (status, stored, error) = match outcome {
            Ok(s) if s.partial => (JobStatus::Partial, Some(s), None),
            Ok(s) => (JobStatus::Succeeded, Some(s), None),
            Err(JobError::Cancelled) if story.out_of_time => (
                JobStatus::Failed,
                None,
                Some("out of time: the deadline came before the archive was stored; the upload was aborted".into()),
            ),
            Err(JobError::Cancelled) => (
                JobStatus::Interrupted,
                None,
                Some(JobError::Cancelled.to_string()),
            ),
            Err(e) => (JobStatus::Failed, None, Some(e.to_string())),
        };
        // 4. Complete the lifecycle action (or leave it pending when interrupted).
        let lifecycle = story.complete_action(status).await;
        // 5. The result, the job's log beside the archive, then the report: neither delays
        //    completion.
        let mut result = story.result(&notice, started_at, status, stored, error, lifecycle);
        result.log_url = self.store_log(&result, log).await;
        self.publish_report(&result, &story.hints).await;
        tracing::info!(status = ?result.status, lifecycle = ?result.lifecycle, "job finished");
        // 6. Retention, last: never before the action is completed or the report sent.
        if status == JobStatus::Succeeded {
            self.pipeline.prune_own().await;
        }
        result
    }

    /// Stores the job's log lines (`src/joblog.rs`) beside its archive, within the report's
    /// budget; its URL, or `None` (failures are logged).
    async fn store_log(&self, result: &JobResult, log: crate::joblog::Capture) -> Option<String> {
        tracing::info!(status = ?result.status, lifecycle = ?result.lifecycle, "job ended; storing its log");
        let text = log.finish();
        let budget = if result.status == JobStatus::Interrupted {
            Duration::from_secs(1)
        } else {
            LOG_BUDGET
        };
        let stored = self.pipeline.store_log(
            result.object_url.clone(),
            result.started_at,
            result.reason.clone(),
            text,
        );
        match tokio::time::timeout(budget, stored).await {
            Ok(Ok(url)) => url,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the job log was not stored");
                None
            }
            Err(_) => {
                tracing::warn!("the job log was not stored in time");
                None
            }
        }
    }

    /// Publishes the job's report on SNS within [`REPORT_BUDGET`]; failures are logged.
    async fn publish_report(&self, result: &JobResult, hints: &Hints) {
        if self.config.sns.topic_arn.is_none() {
            return;
        }
        let report = Report {
            status: result.status.name().into(),
            instance_id: self.identity.instance_id.clone(),
            group: hints
                .group
                .clone()
                .unwrap_or_else(|| self.identity.group.clone()),
            reason: result.reason.clone(),
            partial: result.status == JobStatus::Partial,
            file_count: result.file_count,
            bytes_read: result.bytes_read,
            bytes_stored: result.bytes_stored,
            duration_seconds: result.duration_seconds,
            object_url: result.object_url.clone(),
            skipped: result.skipped,
            error: result.error.clone(),
            lifecycle_result: result
                .lifecycle
                .as_ref()
                .and_then(ActionOutcome::result_sent)
                .map(|r| r.as_str().to_owned()),
            restored_to: None,
            manifest_url: result
                .object_url
                .as_deref()
                .map(crate::manifest::manifest_key),
            log_url: result.log_url.clone(),
            changed: result.changed,
        };
        // An interrupted process must end within seconds, even when SNS does not answer.
        let budget = if result.status == JobStatus::Interrupted {
            INTERRUPTED_REPORT_BUDGET
        } else {
            REPORT_BUDGET
        };
        match tokio::time::timeout(budget, self.pipeline.publish(&report)).await {
            Ok(Ok(id)) => tracing::info!(message_id = %id, "report published"),
            Ok(Err(e)) => tracing::error!(error = %e, "SNS report failed"),
            Err(_) => tracing::error!("SNS report timed out"),
        }
    }
}

/// Sources that only ever report a termination.
fn is_termination_source(source: NoticeSource) -> bool {
    matches!(
        source,
        NoticeSource::Spot | NoticeSource::TargetLifecycleState
    )
}

type Resolving = BoxFuture<'static, Result<(ActionRef, Hook), LifecycleError>>;

/// The state of one job's story: what its notices asked for, its deadline, its lifecycle action
/// and heartbeats, and the flag that stops the archive.
struct Story<'r> {
    runner: &'r Runner,
    start: Instant,
    hints: Hints,
    deadline: Deadline,
    action: Option<(ActionRef, Hook)>,
    action_error: Option<LifecycleError>,
    heartbeats: Option<Heartbeats>,
    /// Set at the partial stop: the archive closes valid and `partial`.
    stop: Arc<AtomicBool>,
    /// The backup's cancellation: a signal (through the runner's shutdown) or the time box.
    cancel: CancellationToken,
    /// The time box ran out: the backup was abandoned so the action is completed in time.
    out_of_time: bool,
}

impl<'r> Story<'r> {
    fn new(runner: &'r Runner, hints: Hints, start: Instant) -> Self {
        let deadline = hints.deadline;
        Self {
            runner,
            start,
            hints,
            deadline,
            action: None,
            action_error: None,
            heartbeats: None,
            stop: Arc::new(AtomicBool::new(false)),
            cancel: runner.shutdown.child_token(),
            out_of_time: false,
        }
    }

    /// Finds the lifecycle action: the group (from the notices, identity, or Auto Scaling) and its
    /// terminate hook. An owned future, so the story can follow the backup meanwhile.
    fn resolving(&self, until: Instant) -> Resolving {
        let lc = Arc::clone(&self.runner.lifecycle);
        let id = self.runner.identity.instance_id.clone();
        let known_group = self.hints.group.clone().or_else(|| {
            (self.runner.identity.group != STANDALONE).then(|| self.runner.identity.group.clone())
        });
        let wanted = self
            .hints
            .hook
            .clone()
            .or_else(|| self.runner.wanted_hook());
        let token = self.hints.token.clone();
        // The caller read the hook moments ago (the Lambda, for a command): no describe.
        let given = self
            .hints
            .hook
            .clone()
            .zip(self.hints.hook_heartbeat_timeout)
            .map(|(name, heartbeat_timeout)| Hook {
                name,
                heartbeat_timeout,
                // Not passed; nothing here acts on it.
                default_result: String::new(),
            });
        let hooks = Arc::clone(&self.runner.hooks);
        Box::pin(async move {
            let group = match known_group {
                Some(g) => g,
                None => match lc.describe_instance(&id, until).await? {
                    Some((g, _)) => g,
                    None => return Err(LifecycleError::NoGroup { instance_id: id }),
                },
            };
            let hook = match given.or_else(|| hooks.get(&group, wanted.as_deref())) {
                Some(hook) => hook,
                None => {
                    let hook = lc
                        .terminate_hook(&group, wanted.as_deref(), &id, until)
                        .await?;
                    hooks.put(&group, wanted.as_deref(), &hook);
                    hook
                }
            };
            let action = ActionRef {
                group,
                hook: hook.name.clone(),
                instance_id: id,
                token,
            };
            Ok((action, hook))
        })
    }

    /// The action is known: its hook's global timeout joins the deadline, heartbeats start.
    fn action_found(&mut self, action: ActionRef, hook: Hook) {
        self.deadline = self
            .deadline
            .earliest(Deadline::at(self.start + hook.global_timeout()));
        let interval = self
            .runner
            .config
            .lifecycle
            .heartbeat_interval
            .unwrap_or(hook.heartbeat_timeout / 2)
            .max(Duration::from_secs(1));
        let first_beat = first_beat_in(interval, self.hints.action_began_after);
        tracing::info!(
            group = %action.group,
            hook = %action.hook,
            first_heartbeat_in_s = first_beat.as_secs(),
            heartbeat_every_s = interval.as_secs(),
            deadline_in_s = self.deadline.remaining().map(|d| d.as_secs()),
            "lifecycle action found"
        );
        self.heartbeats = Some(Heartbeats::start(
            Arc::clone(&self.runner.lifecycle),
            action.clone(),
            first_beat,
            interval,
            self.deadline.or(self.start + hook.global_timeout()),
        ));
        self.action = Some((action, hook));
    }

    /// Follows the running backup until it ends: merges joining notices (deadline, lifecycle
    /// action), finds the action and starts heartbeats, and sets the partial stop in time.
    async fn follow(
        &mut self,
        backup: tokio::task::JoinHandle<Result<Stored, JobError>>,
        hints: &mut watch::Receiver<Hints>,
    ) -> Result<Stored, JobError> {
        tokio::pin!(backup);
        let mut resolving: Option<Resolving> = None;
        let mut hints_open = true;
        loop {
            if resolving.is_none()
                && self.action.is_none()
                && self.action_error.is_none()
                && self.hints.complete_lifecycle
            {
                let until = self.deadline.or(self.start + Duration::from_secs(3600));
                resolving = Some(self.resolving(until));
            }
            let stop_at = self
                .deadline
                .stop_at(self.start)
                .filter(|_| !self.stop.load(Ordering::Relaxed));
            // With an action to complete, the backup gets until the completion margin: past it,
            // the hook would decide alone.
            let time_box = self
                .deadline
                .end()
                .filter(|_| self.hints.complete_lifecycle && !self.out_of_time)
                .map(|_| self.deadline.complete_by(self.start));
            tokio::select! {
                done = &mut backup => {
                    return match done {
                        Ok(outcome) => outcome,
                        Err(e) => {
                            tracing::error!(error = %e, "the backup task failed");
                            Err(JobError::Thread(e.to_string()))
                        }
                    };
                }
                changed = hints.changed(), if hints_open => {
                    if changed.is_err() {
                        hints_open = false;
                        continue;
                    }
                    let joined = hints.borrow_and_update().clone();
                    let was = self.deadline;
                    self.deadline = self.deadline.earliest(joined.deadline);
                    if self.deadline != was {
                        tracing::info!(
                            deadline_in_s = self.deadline.remaining().map(|d| d.as_secs()),
                            "a joining notice brought an earlier deadline"
                        );
                    }
                    if joined.complete_lifecycle && !self.hints.complete_lifecycle {
                        tracing::info!("a joining notice asks to complete the lifecycle action");
                    }
                    if let (Some((action, _)), Some(token)) = (&mut self.action, &joined.token)
                        && action.token.is_none()
                    {
                        action.token = Some(token.clone());
                    }
                    self.hints = joined;
                }
                found = async { resolving.as_mut().expect("guarded").await }, if resolving.is_some() => {
                    resolving = None;
                    match found {
                        Ok((action, hook)) => self.action_found(action, hook),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot find the lifecycle action");
                            self.action_error = Some(e);
                        }
                    }
                }
                () = sleep_until_opt(stop_at) => {
                    tracing::warn!("deadline near: closing the archive as partial");
                    self.stop.store(true, Ordering::Relaxed);
                }
                () = sleep_until_opt(time_box) => {
                    tracing::error!("out of time: abandoning the upload to complete the action before the deadline");
                    self.out_of_time = true;
                    self.cancel.cancel();
                }
            }
        }
    }

    /// Completes the lifecycle action, if one is to be completed: CONTINUE when the data is
    /// stored, `on_failure` when not, nothing when the job was interrupted.
    async fn complete_action(&mut self, status: JobStatus) -> Option<ActionOutcome> {
        drop(self.heartbeats.take());
        if !self.hints.complete_lifecycle {
            return None;
        }
        if status == JobStatus::Interrupted && !self.out_of_time {
            tracing::warn!("interrupted: the lifecycle action is left pending for the next run");
            return Some(ActionOutcome::LeftPending {
                why: "the backup was interrupted; the next lifeboat run backs up again while the hook holds the instance".into(),
            });
        }
        let shutdown = self.runner.shutdown.clone();
        let signalled = async move {
            shutdown.cancelled().await;
            tokio::time::sleep(COMPLETION_AFTER_SIGNAL).await;
        };
        tokio::select! {
            outcome = self.resolve_and_complete(status) => outcome,
            () = signalled => {
                tracing::warn!(
                    "stopped while completing the lifecycle action (the API did not answer): \
                     left pending for the next run or the hook's timeout"
                );
                Some(ActionOutcome::LeftPending {
                    why: "stopped (signal) while the lifecycle API did not answer".into(),
                })
            }
        }
    }

    /// [`Story::complete_action`]'s calls: finds the action if not found yet, and completes it.
    async fn resolve_and_complete(&mut self, status: JobStatus) -> Option<ActionOutcome> {
        let until = self
            .deadline
            .complete_by(Instant::now() + UNBOUNDED_COMPLETION);
        if self.action.is_none() {
            // Asked for late, or its lookup failed earlier: one more try with the time left.
            match self.resolving(until).await {
                Ok((action, hook)) => self.action = Some((action, hook)),
                Err(e) => {
                    return Some(ActionOutcome::NotCompleted {
                        error: e.to_string(),
                    });
                }
            }
        }
        let (mut action, _) = self.action.clone().expect("resolved above");
        action.token = action.token.or_else(|| self.hints.token.clone());
        let result = if status.stored() {
            LifecycleResult::Continue
        } else {
            self.runner.config.lifecycle.on_failure
        };
        Some(complete(self.runner.lifecycle.as_ref(), &action, result, until).await)
    }

    /// The job's result.
    fn result(
        &self,
        notice: &TerminationNotice,
        started_at: OffsetDateTime,
        status: JobStatus,
        stored: Option<Stored>,
        error: Option<String>,
        lifecycle: Option<ActionOutcome>,
    ) -> JobResult {
        let s = stored.unwrap_or_default();
        JobResult {
            status,
            reason: notice.reason.clone(),
            source: notice.source,
            object_url: (!s.object_url.is_empty()).then_some(s.object_url),
            error,
            lifecycle,
            started_at,
            finished_at: OffsetDateTime::now_utc(),
            file_count: s.file_count,
            bytes_read: s.bytes_read,
            bytes_stored: s.bytes_stored,
            skipped: s.skipped,
            changed: s.changed,
            log_url: None,
            duration_seconds: self.start.elapsed().as_secs_f64(),
            token: self.hints.token.clone(),
        }
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn waiting(state: &str) -> bool {
    state == TERMINATING_WAIT || state == WARMED_TERMINATING_WAIT
}

/// Completes with `result`. Completion comes first: in a scale-in the instance waits by the time
/// its backup is stored, and a describe per termination is a call every instance of a fleet
/// pays for in the account's shared Auto Scaling rate limit. Only "no active action" (after
/// its grace) asks which case it is: not waiting yet (the target state changes before the
/// transition: wait for `…Terminating:Wait`, then complete), completed by someone else or gone,
/// or a stale token (the instance still waits: complete by instance id).
async fn complete(
    lc: &dyn LifecycleApi,
    action: &ActionRef,
    result: LifecycleResult,
    until: Instant,
) -> ActionOutcome {
    match lc.complete(action, result, until).await {
        Ok(Completed::Now) => return ActionOutcome::Completed { result },
        Ok(Completed::AlreadyDone) => {}
        Err(e) => {
            return ActionOutcome::NotCompleted {
                error: e.to_string(),
            };
        }
    }
    complete_when_waiting(lc, action, result, until).await
}

/// Waits for a `…Terminating:Wait` state, then completes with `result` (a stale token falls
/// back to the instance id). An instance already past its wait has been completed by someone
/// else.
async fn complete_when_waiting(
    lc: &dyn LifecycleApi,
    action: &ActionRef,
    result: LifecycleResult,
    until: Instant,
) -> ActionOutcome {
    let wait_until = (Instant::now() + WAIT_FOR_TERMINATING).min(until);
    let mut attempt = 0;
    // Whether the instance was seen not waiting yet (else it waited all along, and a token that
    // found no action is stale).
    let mut waited = false;
    loop {
        match lc.describe_instance(&action.instance_id, until).await {
            Ok(Some((_, state))) if waiting(&state) => break,
            Ok(Some((_, state)))
                if state.ends_with("Terminating:Proceed") || state.ends_with("Terminated") =>
            {
                return ActionOutcome::AlreadyDone;
            }
            // No active action and no longer in the group: completed by someone else, gone.
            Ok(None) => return ActionOutcome::AlreadyDone,
            Ok(Some((_, state))) if Instant::now() >= wait_until => {
                return ActionOutcome::NotCompleted {
                    error: format!("the instance is {state}, not {TERMINATING_WAIT}"),
                };
            }
            Err(e) if Instant::now() >= wait_until => {
                // Cannot confirm; completing by token or instance id is still right.
                tracing::warn!(error = %e, "cannot confirm Terminating:Wait; completing anyway");
                break;
            }
            other => {
                waited |= matches!(other, Ok(Some(_)));
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
    let done = |result| ActionOutcome::Completed { result };
    let by_token = if waited || action.token.is_none() {
        lc.complete(action, result, until).await
    } else {
        // It waited all along and the token found no action: stale, go by instance id below.
        Ok(Completed::AlreadyDone)
    };
    match by_token {
        Ok(Completed::Now) => done(result),
        Ok(Completed::AlreadyDone) if action.token.is_some() => {
            // By token it is gone; if the instance still waits, the token was stale.
            match lc.describe_instance(&action.instance_id, until).await {
                Ok(Some((_, state))) if waiting(&state) => {
                    tracing::warn!(
                        "no active action by token while the instance waits: completing by instance id"
                    );
                    let by_id = ActionRef {
                        token: None,
                        ..action.clone()
                    };
                    match lc.complete(&by_id, result, until).await {
                        Ok(Completed::Now) => done(result),
                        Ok(Completed::AlreadyDone) => ActionOutcome::AlreadyDone,
                        Err(e) => ActionOutcome::NotCompleted {
                            error: e.to_string(),
                        },
                    }
                }
                _ => ActionOutcome::AlreadyDone,
            }
        }
        Ok(Completed::AlreadyDone) => ActionOutcome::AlreadyDone,
        Err(e) => ActionOutcome::NotCompleted {
            error: e.to_string(),
        },
    }
}

/// When the first heartbeat is due. An action seen beginning (the watcher read another state
/// moments before) has its full timeout ahead: the first beat comes between half and all of the
/// `interval` left since then, spread so a fleet does not beat in step and most short backups
/// need no beat at all (a thousand beats in the first seconds of a mass scale-in would spend
/// the account's Auto Scaling bucket that the completions need). An action that may have begun
/// long before gets its first beat within [`FIRST_BEAT_WITHIN`].
fn first_beat_in(interval: Duration, began_after: Option<SystemTime>) -> Duration {
    let left = began_after
        .map(|t| interval.saturating_sub(t.elapsed().unwrap_or_default()))
        .unwrap_or_default();
    if left >= FIRST_BEAT_WITHIN * 2 {
        left.mul_f64(0.5 + fastrand::f64() / 2.0)
    } else {
        interval.min(FIRST_BEAT_WITHIN).mul_f64(fastrand::f64())
    }
}

/// Heartbeats for one lifecycle action while a job runs; they stop when this is dropped.
///
/// The first beat comes `first` after the start (see [`first_beat_in`]), then every
/// `interval`. A failed beat is retried within seconds, not a whole interval
/// later. "No active lifecycle action" is retried for [`NOT_ACTIVE_GRACE`] (Auto Scaling says it
/// briefly right after `Terminating:Wait`), by instance id when a token was used, before the
/// beats stop.
pub struct Heartbeats {
    stop: CancellationToken,
}

impl Heartbeats {
    /// Starts beating for `action`, first after `first`, then every `interval` until `until`
    /// (the hook's end).
    pub fn start(
        lc: Arc<dyn LifecycleApi>,
        action: ActionRef,
        first: Duration,
        interval: Duration,
        until: Instant,
    ) -> Self {
        let stop = CancellationToken::new();
        tokio::spawn(heartbeat_loop(
            lc,
            action,
            first,
            interval,
            until,
            stop.clone(),
        ));
        Self { stop }
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn heartbeat_loop(
    lc: Arc<dyn LifecycleApi>,
    mut action: ActionRef,
    first: Duration,
    interval: Duration,
    until: Instant,
    stop: CancellationToken,
) {
    let retry_cap = (interval / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
    let mut next = Instant::now() + first;
    let mut failures = 0;
    let mut not_active_since: Option<Instant> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
        }
        let now = Instant::now();
        if now >= until {
            return;
        }
        // One beat may retry throttling, but not past the time the next one is due.
        let call_until = (now + interval.max(Duration::from_secs(2)) / 2).min(until);
        let beat = tokio::select! {
            () = stop.cancelled() => return,
            r = lc.heartbeat(&action, call_until) => r,
        };
        match beat {
            Ok(true) => {
                tracing::debug!(instance_id = %action.instance_id, "heartbeat");
                failures = 0;
                not_active_since = None;
                next = Instant::now() + interval;
            }
            Ok(false) => {
                let since = *not_active_since.get_or_insert(now);
                if action.token.is_some() {
                    tracing::warn!("heartbeat: no active action by token; beating by instance id");
                    action.token = None;
                    next = Instant::now();
                    continue;
                }
                if now.duration_since(since) >= NOT_ACTIVE_GRACE {
                    tracing::warn!("heartbeat: no active lifecycle action any more");
                    return;
                }
                failures += 1;
                next = Instant::now()
                    + crate::lifecycle::backoff(failures, Duration::from_millis(500), retry_cap)
                        .max(Duration::from_millis(200));
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "heartbeat failed; retrying soon");
                next = Instant::now()
                    + crate::lifecycle::backoff(failures, Duration::from_millis(500), retry_cap)
                        .max(Duration::from_millis(200));
            }
        }
    }
}

/// Takes the backup lock (`RUNTIME_DIRECTORY/backup.lock`), waiting for a holder to finish.
/// Returns the lock file (held while it lives) and whether another invocation held it.
async fn lock() -> (Option<std::fs::File>, bool) {
    let path = crate::state::runtime_dir().join("backup.lock");
    let mut waited = false;
    let locked = crate::state::lock_file(&path, || {
        waited = true;
        eprintln!("lifeboat: another backup is running; waiting for its result");
    })
    .await;
    match locked {
        Ok((file, _)) => (Some(file), waited),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no backup lock; running unlocked");
            (None, waited)
        }
    }
}

#[cfg(test)]
mod tests {
    //! The story's timing rules with tokio's paused clock against fakes of [`LifecycleApi`] and
    //! [`BackupApi`]: minutes of story in milliseconds.

    use std::collections::VecDeque;
    use std::path::Path;
    use std::time::SystemTime;

    use super::*;

    /// One call the fake lifecycle received.
    #[derive(Debug, Clone)]
    struct Call {
        at: Duration,
        op: &'static str,
        token: Option<String>,
        result: Option<LifecycleResult>,
    }

    struct FakeLifecycle {
        t0: Instant,
        heartbeat_timeout: Duration,
        /// What DescribeAutoScalingInstances says.
        state: Mutex<String>,
        /// Scripted heartbeat answers (then `Ok(true)`): `Some(b)` is `Ok(b)`, `None` a failure.
        beats: Mutex<VecDeque<Option<bool>>>,
        /// Completion by token finds no active action (a stale token).
        stale_token: bool,
        /// CompleteLifecycleAction does not answer (an unreachable API): each call fails at
        /// its deadline.
        complete_down: AtomicBool,
        calls: Mutex<Vec<Call>>,
    }

    impl FakeLifecycle {
        fn new(heartbeat_timeout: Duration) -> Arc<Self> {
            Arc::new(Self {
                t0: Instant::now(),
                heartbeat_timeout,
                state: Mutex::new(TERMINATING_WAIT.into()),
                beats: Mutex::new(VecDeque::new()),
                stale_token: false,
                complete_down: AtomicBool::new(false),
                calls: Mutex::new(Vec::new()),
            })
        }
        fn record(
            &self,
            op: &'static str,
            action: Option<&ActionRef>,
            result: Option<LifecycleResult>,
        ) {
            self.calls.lock().unwrap().push(Call {
                at: self.t0.elapsed(),
                op,
                token: action.and_then(|a| a.token.clone()),
                result,
            });
        }
        fn calls(&self, op: &str) -> Vec<Call> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.op == op)
                .cloned()
                .collect()
        }
    }

    fn failed(op: &'static str) -> LifecycleError {
        LifecycleError::Call {
            operation: op,
            instance_id: "i-1".into(),
            message: "Rate exceeded".into(),
            retryable: true,
        }
    }

    impl LifecycleApi for FakeLifecycle {
        fn describe_instance<'a>(
            &'a self,
            _: &'a str,
            _: Instant,
        ) -> BoxFuture<'a, Result<Option<(String, String)>, LifecycleError>> {
            Box::pin(async move {
                self.record("DescribeAutoScalingInstances", None, None);
                Ok(Some(("web".into(), self.state.lock().unwrap().clone())))
            })
        }
        fn terminate_hook<'a>(
            &'a self,
            _: &'a str,
            _: Option<&'a str>,
            _: &'a str,
            _: Instant,
        ) -> BoxFuture<'a, Result<Hook, LifecycleError>> {
            Box::pin(async move {
                self.record("DescribeLifecycleHooks", None, None);
                Ok(Hook {
                    name: "lifeboat".into(),
                    heartbeat_timeout: self.heartbeat_timeout,
                    default_result: "ABANDON".into(),
                })
            })
        }
        fn heartbeat<'a>(
            &'a self,
            action: &'a ActionRef,
            _: Instant,
        ) -> BoxFuture<'a, Result<bool, LifecycleError>> {
            Box::pin(async move {
                self.record("RecordLifecycleActionHeartbeat", Some(action), None);
                match self.beats.lock().unwrap().pop_front() {
                    Some(Some(b)) => Ok(b),
                    Some(None) => Err(failed("RecordLifecycleActionHeartbeat")),
                    None => Ok(true),
                }
            })
        }
        fn complete<'a>(
            &'a self,
            action: &'a ActionRef,
            result: LifecycleResult,
            until: Instant,
        ) -> BoxFuture<'a, Result<Completed, LifecycleError>> {
            Box::pin(async move {
                self.record("CompleteLifecycleAction", Some(action), Some(result));
                if self.complete_down.load(Ordering::Relaxed) {
                    tokio::time::sleep_until(until).await;
                    return Err(failed("CompleteLifecycleAction"));
                }
                // As Auto Scaling (after the grace): no active action before the instance
                // waits, or by a stale token.
                let waits = waiting(&self.state.lock().unwrap());
                if !waits || (self.stale_token && action.token.is_some()) {
                    Ok(Completed::AlreadyDone)
                } else {
                    Ok(Completed::Now)
                }
            })
        }
    }

    /// A backup that takes `takes` unless stopped (then partial) or cancelled; or panics.
    struct FakeBackup {
        takes: Duration,
        panics: bool,
        t0: Instant,
        stopped_at: Arc<Mutex<Option<Duration>>>,
        reports: Arc<Mutex<Vec<Report>>>,
    }

    impl FakeBackup {
        fn new(takes: Duration) -> Arc<Self> {
            Arc::new(Self {
                takes,
                panics: false,
                t0: Instant::now(),
                stopped_at: Arc::default(),
                reports: Arc::default(),
            })
        }
    }

    impl BackupApi for FakeBackup {
        fn backup(&self, run: BackupRun) -> BoxFuture<'static, Result<Stored, JobError>> {
            let (takes, panics, t0, stopped_at) = (
                self.takes,
                self.panics,
                self.t0,
                Arc::clone(&self.stopped_at),
            );
            Box::pin(async move {
                if panics {
                    panic!("a bug in the pipeline");
                }
                let end = Instant::now() + takes;
                let mut partial = false;
                while Instant::now() < end {
                    if run.stop.load(Ordering::Relaxed) {
                        *stopped_at.lock().unwrap() = Some(t0.elapsed());
                        partial = true;
                        break;
                    }
                    tokio::select! {
                        () = run.cancel.cancelled() => return Err(JobError::Cancelled),
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
                Ok(Stored {
                    object_url: "s3://b/k.tar.gz".into(),
                    partial,
                    ..Stored::default()
                })
            })
        }
        fn publish<'a>(&'a self, r: &'a Report) -> BoxFuture<'a, Result<String, ReportError>> {
            self.reports.lock().unwrap().push(r.clone());
            Box::pin(async { Ok("m-1".into()) })
        }
    }

    fn config(extra: &str) -> Arc<Config> {
        let text = format!(
            "[s3]\nbucket = \"b-1\"\n[sns]\ntopic_arn = \"arn:aws:sns:us-east-1:123456789012:t\"\n{extra}"
        );
        Arc::new(Config::parse(Path::new("test.toml"), &text).expect("valid test config"))
    }

    fn identity() -> InstanceIdentity {
        InstanceIdentity {
            group: "web".into(),
            ..InstanceIdentity::standalone()
        }
    }

    struct Bench {
        runner: Arc<Runner>,
        lc: Arc<FakeLifecycle>,
        backup: Arc<FakeBackup>,
        shutdown: CancellationToken,
        dir: tempfile::TempDir,
    }

    impl Bench {
        /// A new runner on the same state file and fakes: the daemon after a restart.
        fn restarted(&self) -> Arc<Runner> {
            Runner::with_parts(
                Arc::clone(&self.runner.config),
                identity(),
                Arc::clone(&self.lc) as Arc<dyn LifecycleApi>,
                Arc::clone(&self.backup) as Arc<dyn BackupApi>,
                Arc::new(StateFile::open(self.dir.path())),
                CancellationToken::new(),
            )
        }
    }

    /// A `lifeboat backup --complete-lifecycle --token TOKEN` notice.
    fn with_token(token: &str) -> TerminationNotice {
        TerminationNotice {
            token: Some(token.into()),
            complete_lifecycle: true,
            ..notice(NoticeSource::Command)
        }
    }

    fn bench(lc: Arc<FakeLifecycle>, backup: Arc<FakeBackup>, extra: &str) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let runner = Runner::with_parts(
            config(extra),
            identity(),
            Arc::clone(&lc) as Arc<dyn LifecycleApi>,
            Arc::clone(&backup) as Arc<dyn BackupApi>,
            Arc::new(StateFile::open(dir.path())),
            shutdown.clone(),
        );
        Bench {
            runner,
            lc,
            backup,
            shutdown,
            dir,
        }
    }

    fn notice(source: NoticeSource) -> TerminationNotice {
        TerminationNotice {
            source,
            reason: "test".into(),
            group: None,
            hook: None,
            token: None,
            deadline: None,
            complete_lifecycle: source == NoticeSource::TargetLifecycleState,
            action_began_after: None,
            hook_heartbeat_timeout_s: None,
        }
    }

    fn spot(in_secs: u64) -> TerminationNotice {
        TerminationNotice {
            deadline: Some(SystemTime::now() + Duration::from_secs(in_secs)),
            ..notice(NoticeSource::Spot)
        }
    }

    /// Submits `notice` from a task of its own (the test goes on while the job runs).
    fn in_background(
        runner: &Arc<Runner>,
        notice: TerminationNotice,
    ) -> tokio::task::JoinHandle<JobResult> {
        let runner = Arc::clone(runner);
        tokio::spawn(async move { runner.submit(notice).await })
    }

    /// Lets the spawned job start before the next notice arrives.
    async fn settle() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_spot_notice_joining_a_rebalance_job_brings_its_deadline() {
        let b = bench(
            FakeLifecycle::new(Duration::from_secs(3600)),
            FakeBackup::new(Duration::from_secs(3600)),
            "",
        );
        let first = in_background(&b.runner, notice(NoticeSource::Rebalance));
        settle().await;
        let joined = b.runner.submit(spot(120)).await;
        let first = first.await.unwrap();
        assert_eq!(joined.status, JobStatus::Partial, "{joined:?}");
        assert_eq!(first.status, JobStatus::Partial);
        // The Spot deadline (120 s after t=1 s) with its 30 s reserve: the stop at 91 s.
        let stopped = b.backup.stopped_at.lock().unwrap().expect("stopped");
        assert!(
            stopped >= Duration::from_secs(90) && stopped <= Duration::from_secs(92),
            "stopped at {stopped:?}"
        );
        assert!(joined.duration_seconds < 121.0, "{joined:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_scale_in_joining_a_manual_job_brings_heartbeats_and_completion() {
        let b = bench(
            FakeLifecycle::new(Duration::from_secs(60)),
            FakeBackup::new(Duration::from_secs(300)),
            "",
        );
        let first = in_background(&b.runner, notice(NoticeSource::Command));
        settle().await;
        let joined = b
            .runner
            .submit(notice(NoticeSource::TargetLifecycleState))
            .await;
        assert_eq!(first.await.unwrap().status, JobStatus::Succeeded);
        assert_eq!(
            joined.lifecycle,
            Some(ActionOutcome::Completed {
                result: LifecycleResult::Continue
            })
        );
        // Heartbeats every 30 s (half the 60 s timeout) for a 300 s job: never 60 s apart.
        let beats = b.lc.calls("RecordLifecycleActionHeartbeat");
        assert!(beats.len() >= 9, "{beats:?}");
        assert!(beats[0].at <= Duration::from_secs(1 + 5), "{beats:?}");
        for pair in beats.windows(2) {
            assert!(
                pair[1].at - pair[0].at <= Duration::from_secs(31),
                "{beats:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_start_early_and_retry_a_failed_beat_within_seconds() {
        let lc = FakeLifecycle::new(Duration::from_secs(600));
        lc.beats.lock().unwrap().extend([Some(true), None, None]);
        let b = bench(lc, FakeBackup::new(Duration::from_secs(900)), "");
        let r = b
            .runner
            .submit(notice(NoticeSource::TargetLifecycleState))
            .await;
        assert_eq!(r.status, JobStatus::Succeeded);
        let beats = b.lc.calls("RecordLifecycleActionHeartbeat");
        // The first within five seconds (not up to half the 600 s timeout).
        assert!(beats[0].at <= Duration::from_secs(5), "{beats:?}");
        // Two failures: each retried within 30 s, not 300 s later.
        assert!(
            beats[2].at - beats[1].at <= Duration::from_secs(31),
            "{beats:?}"
        );
        assert!(
            beats[3].at - beats[2].at <= Duration::from_secs(31),
            "{beats:?}"
        );
        // Then back to the interval.
        assert!(
            beats[4].at - beats[3].at >= Duration::from_secs(299),
            "{beats:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_action_seen_beginning_gets_its_first_beat_late_in_the_interval() {
        // 600 s timeout: a beat every 300 s.
        let first_beat = |began_ago: Option<u64>| async move {
            let lc = FakeLifecycle::new(Duration::from_secs(600));
            let b = bench(lc, FakeBackup::new(Duration::from_secs(400)), "");
            b.runner
                .submit(TerminationNotice {
                    action_began_after: began_ago
                        .map(|s| SystemTime::now() - Duration::from_secs(s)),
                    ..notice(NoticeSource::TargetLifecycleState)
                })
                .await;
            b.lc.calls("RecordLifecycleActionHeartbeat")[0].at
        };
        for _ in 0..5 {
            // Seen beginning (the poll before read InService): 150-300 s in, spread.
            let fresh = first_beat(Some(1)).await;
            assert!(
                fresh >= Duration::from_secs(149) && fresh <= Duration::from_secs(300),
                "{fresh:?}"
            );
            // Begun 200 s before it was seen (metadata was failing): within the 100 s left.
            let late = first_beat(Some(200)).await;
            assert!(
                late >= Duration::from_secs(49) && late <= Duration::from_secs(100),
                "{late:?}"
            );
            // Begun 298 s before, or unknown (found at start-up): within 5 s.
            assert!(first_beat(Some(298)).await <= FIRST_BEAT_WITHIN);
            assert!(first_beat(None).await <= FIRST_BEAT_WITHIN);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_active_action_by_a_stale_token_falls_back_to_the_instance_id() {
        let lc = Arc::new(FakeLifecycle {
            stale_token: true,
            ..Arc::into_inner(FakeLifecycle::new(Duration::from_secs(60))).unwrap()
        });
        // A beat by token finds nothing: stale. Then one "not active" by instance id (eventual
        // consistency) before beats succeed.
        lc.beats.lock().unwrap().extend([Some(false), Some(false)]);
        let b = bench(lc, FakeBackup::new(Duration::from_secs(120)), "");
        let r = b
            .runner
            .submit(TerminationNotice {
                token: Some("old-token".into()),
                complete_lifecycle: true,
                ..notice(NoticeSource::Command)
            })
            .await;
        let beats = b.lc.calls("RecordLifecycleActionHeartbeat");
        assert_eq!(beats[0].token.as_deref(), Some("old-token"));
        assert!(beats[1..].iter().all(|c| c.token.is_none()), "{beats:?}");
        assert!(
            beats.len() >= 4,
            "beats stopped at the first 'not active': {beats:?}"
        );
        let completions = b.lc.calls("CompleteLifecycleAction");
        assert_eq!(completions.len(), 2, "{completions:?}");
        assert_eq!(completions[1].token, None);
        assert_eq!(
            r.lifecycle,
            Some(ActionOutcome::Completed {
                result: LifecycleResult::Continue
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_stop_after_the_not_active_grace() {
        let lc = FakeLifecycle::new(Duration::from_secs(60));
        lc.beats.lock().unwrap().extend([Some(false); 100]);
        let b = bench(lc, FakeBackup::new(Duration::from_secs(200)), "");
        b.runner
            .submit(notice(NoticeSource::TargetLifecycleState))
            .await;
        let beats = b.lc.calls("RecordLifecycleActionHeartbeat");
        let last = beats.last().unwrap().at;
        assert!(beats.len() >= 3, "{beats:?}");
        assert!(last - beats[0].at >= NOT_ACTIVE_GRACE, "{beats:?}");
        assert!(last < Duration::from_secs(60), "{beats:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_interrupted_job_leaves_the_action_pending() {
        let b = bench(
            FakeLifecycle::new(Duration::from_secs(60)),
            FakeBackup::new(Duration::from_secs(600)),
            "",
        );
        let job = in_background(&b.runner, notice(NoticeSource::TargetLifecycleState));
        tokio::time::sleep(Duration::from_secs(30)).await;
        b.shutdown.cancel();
        let r = job.await.unwrap();
        assert_eq!(r.status, JobStatus::Interrupted);
        assert!(
            matches!(r.lifecycle, Some(ActionOutcome::LeftPending { .. })),
            "{r:?}"
        );
        assert!(b.lc.calls("CompleteLifecycleAction").is_empty());
        assert!(!r.settles_termination());
        let reports = b.backup.reports.lock().unwrap();
        assert_eq!(reports[0].status, "interrupted");
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_in_the_backup_completes_with_on_failure_and_frees_the_slot() {
        let backup = Arc::new(FakeBackup {
            panics: true,
            ..Arc::into_inner(FakeBackup::new(Duration::from_secs(1))).unwrap()
        });
        let b = bench(
            FakeLifecycle::new(Duration::from_secs(60)),
            backup,
            "[lifecycle]\non_failure = \"ABANDON\"\n",
        );
        let r = b
            .runner
            .submit(notice(NoticeSource::TargetLifecycleState))
            .await;
        assert_eq!(r.status, JobStatus::Failed);
        assert!(r.error.as_deref().unwrap().contains("panic"), "{r:?}");
        assert_eq!(
            b.lc.calls("CompleteLifecycleAction")[0].result,
            Some(LifecycleResult::Abandon)
        );
        assert!(b.runner.progress().is_none(), "the slot is free");
        assert_eq!(b.backup.reports.lock().unwrap()[0].status, "failed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_warm_pool_instance_is_completed_and_backed_up_again_next_time() {
        let lc = FakeLifecycle::new(Duration::from_secs(60));
        *lc.state.lock().unwrap() = WARMED_TERMINATING_WAIT.into();
        let b = bench(lc, FakeBackup::new(Duration::from_secs(10)), "");
        let first = b
            .runner
            .submit(notice(NoticeSource::TargetLifecycleState))
            .await;
        assert!(first.lifecycle.as_ref().unwrap().settled(), "{first:?}");
        // The same lifecycle: the same result, no second backup.
        b.runner
            .submit(notice(NoticeSource::TargetLifecycleState))
            .await;
        assert_eq!(b.lc.calls("CompleteLifecycleAction").len(), 1);
        // Back in the pool, then terminated again: a new backup and a new completion.
        b.runner.new_lifecycle();
        b.runner
            .submit(notice(NoticeSource::TargetLifecycleState))
            .await;
        assert_eq!(b.lc.calls("CompleteLifecycleAction").len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_backup_that_outlasts_the_hook_is_abandoned_in_time_to_complete() {
        // A 30 s heartbeat timeout: the hook holds the instance 3000 s at most. The fake backup
        // ignores the partial stop (a last part that never finishes uploading).
        struct Stuck;
        impl BackupApi for Stuck {
            fn backup(&self, run: BackupRun) -> BoxFuture<'static, Result<Stored, JobError>> {
                Box::pin(async move {
                    run.cancel.cancelled().await;
                    Err(JobError::Cancelled)
                })
            }
            fn publish<'a>(&'a self, _: &'a Report) -> BoxFuture<'a, Result<String, ReportError>> {
                Box::pin(async { Ok(String::new()) })
            }
        }
        let lc = FakeLifecycle::new(Duration::from_secs(30));
        let dir = tempfile::tempdir().unwrap();
        let runner = Runner::with_parts(
            config("[lifecycle]\non_failure = \"ABANDON\"\n"),
            identity(),
            Arc::clone(&lc) as Arc<dyn LifecycleApi>,
            Arc::new(Stuck),
            Arc::new(StateFile::open(dir.path())),
            CancellationToken::new(),
        );
        let r = runner
            .submit(notice(NoticeSource::TargetLifecycleState))
            .await;
        assert_eq!(r.status, JobStatus::Failed, "{r:?}");
        assert!(r.error.as_deref().unwrap().contains("out of time"), "{r:?}");
        let done = &lc.calls("CompleteLifecycleAction")[0];
        assert_eq!(done.result, Some(LifecycleResult::Abandon));
        assert!(done.at < Duration::from_secs(3000), "{done:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_scale_in_after_a_spot_backup_completes_the_action_without_a_second_backup() {
        let b = bench(
            FakeLifecycle::new(Duration::from_secs(60)),
            FakeBackup::new(Duration::from_secs(10)),
            "",
        );
        let spot_result = b.runner.submit(spot(120)).await;
        assert_eq!(spot_result.lifecycle, None);
        let r = b
            .runner
            .submit(notice(NoticeSource::TargetLifecycleState))
            .await;
        assert_eq!(r.object_url, spot_result.object_url);
        assert!(
            r.lifecycle.as_ref().is_some_and(ActionOutcome::settled),
            "{r:?}"
        );
        assert_eq!(b.lc.calls("CompleteLifecycleAction").len(), 1);
        assert_eq!(
            b.backup.reports.lock().unwrap().len(),
            1,
            "one backup, one report"
        );
    }

    /// Runs a scale-in (target lifecycle state) job and checks it completed CONTINUE.
    async fn completes_continue(b: &Bench) {
        let r = b
            .runner
            .submit(notice(NoticeSource::TargetLifecycleState))
            .await;
        assert_eq!(
            r.lifecycle,
            Some(ActionOutcome::Completed {
                result: LifecycleResult::Continue
            }),
            "{r:?}"
        );
    }

    /// A termination completes with one Auto Scaling call: no describe before it (a fleet of a
    /// thousand shares the account's rate limit; the describe used to come first, every time).
    #[tokio::test(start_paused = true)]
    async fn a_scale_in_completes_without_a_describe_call() {
        let b = bench(
            FakeLifecycle::new(Duration::from_secs(60)),
            FakeBackup::new(Duration::from_secs(2)),
            "",
        );
        completes_continue(&b).await;
        assert_eq!(b.lc.calls("DescribeAutoScalingInstances").len(), 0);
        assert_eq!(b.lc.calls("CompleteLifecycleAction").len(), 1);
    }

    /// The target state changes before the transition: a backup stored before the instance
    /// waits is not completed early; "no active action" then makes it wait for
    /// `Terminating:Wait` and complete.
    #[tokio::test(start_paused = true)]
    async fn a_backup_stored_before_the_instance_waits_completes_once_it_waits() {
        let lc = FakeLifecycle::new(Duration::from_secs(60));
        *lc.state.lock().unwrap() = "Terminating".into();
        let b = bench(Arc::clone(&lc), FakeBackup::new(Duration::from_secs(1)), "");
        let flip = Arc::clone(&lc);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            *flip.state.lock().unwrap() = TERMINATING_WAIT.into();
        });
        completes_continue(&b).await;
        let completions = b.lc.calls("CompleteLifecycleAction");
        assert!(
            completions.last().unwrap().at >= Duration::from_secs(30),
            "{completions:?}"
        );
        assert!(!b.lc.calls("DescribeAutoScalingInstances").is_empty());
    }

    /// A fleet's scale-in shares one Auto Scaling rate limit: the daemon reads its hook ahead
    /// (once, jittered after start) and a termination then describes no hook.
    #[tokio::test(start_paused = true)]
    async fn a_termination_after_the_hook_was_read_ahead_describes_no_hook() {
        let b = read_ahead().await;
        let r = b
            .runner
            .submit(notice(NoticeSource::TargetLifecycleState))
            .await;
        assert!(
            r.lifecycle.as_ref().is_some_and(ActionOutcome::settled),
            "{r:?}"
        );
        assert_eq!(b.lc.calls("DescribeLifecycleHooks").len(), 1, "none more");
        assert_eq!(b.lc.calls("CompleteLifecycleAction").len(), 1);
    }

    /// A bench whose runner has read its hook ahead (one describe call).
    async fn read_ahead() -> Bench {
        let b = bench(
            FakeLifecycle::new(Duration::from_secs(60)),
            FakeBackup::new(Duration::from_secs(10)),
            "",
        );
        b.runner.prefetch_hook();
        tokio::time::sleep(HOOK_PREFETCH_WITHIN + Duration::from_secs(1)).await;
        assert_eq!(b.lc.calls("DescribeLifecycleHooks").len(), 1, "read ahead");
        b
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_reads_the_hook_again_at_once() {
        let b = read_ahead().await;
        // The operator changed the hook, then `systemctl reload lifeboat` (SIGHUP).
        b.runner.reread_hook();
        assert!(
            b.runner.hooks.get("web", None).is_none(),
            "forgotten at once"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(b.lc.calls("DescribeLifecycleHooks").len(), 2, "read again");
        assert!(b.runner.hooks.get("web", None).is_some());
    }

    /// A stop signal while the lifecycle API does not answer: completion goes on for
    /// [`COMPLETION_AFTER_SIGNAL`], then the job ends with the action left pending, instead of
    /// retrying until the deadline (the hook's global timeout: hours) as it used to.
    #[tokio::test(start_paused = true)]
    async fn a_signal_during_a_completion_that_gets_no_answer_ends_the_job_within_seconds() {
        let lc = FakeLifecycle::new(Duration::from_secs(300));
        lc.complete_down.store(true, Ordering::Relaxed);
        let b = bench(lc, FakeBackup::new(Duration::from_secs(5)), "");
        let job = in_background(&b.runner, with_token("t-down"));
        let t0 = Instant::now();
        while b.lc.calls("CompleteLifecycleAction").is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "completion never started"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let signalled = Instant::now();
        b.shutdown.cancel();
        let r = job.await.unwrap();
        let took = signalled.elapsed();
        assert!(
            took <= COMPLETION_AFTER_SIGNAL + Duration::from_secs(1),
            "the job went on {took:?} after the signal"
        );
        assert_eq!(r.status, JobStatus::Succeeded, "the data is stored");
        assert!(
            matches!(r.lifecycle, Some(ActionOutcome::LeftPending { .. })),
            "{:?}",
            r.lifecycle
        );
    }

    /// The Lambda read the hook for the command (`--heartbeat-timeout`): a thousand
    /// instances of a scale-in do not describe it again, and heartbeats follow the given timeout.
    #[tokio::test(start_paused = true)]
    async fn a_command_that_brings_the_hook_timeout_does_not_describe_the_hook() {
        // The hook says 600 s; the command says 60 s: the command's value is used.
        let b = bench(
            FakeLifecycle::new(Duration::from_secs(600)),
            FakeBackup::new(Duration::from_secs(100)),
            "",
        );
        let r = b
            .runner
            .submit(TerminationNotice {
                hook: Some("lifeboat".into()),
                group: Some("web".into()),
                complete_lifecycle: true,
                hook_heartbeat_timeout_s: Some(60),
                ..notice(NoticeSource::Command)
            })
            .await;
        assert_eq!(r.status, JobStatus::Succeeded);
        assert!(b.lc.calls("DescribeLifecycleHooks").is_empty());
        let beats = b.lc.calls("RecordLifecycleActionHeartbeat");
        assert!(beats.len() >= 3, "{beats:?}");
        for pair in beats.windows(2) {
            assert!(
                pair[1].at - pair[0].at <= Duration::from_secs(31),
                "{beats:?}"
            );
        }
        assert_eq!(b.lc.calls("CompleteLifecycleAction").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_whose_job_was_interrupted_is_backed_up_again_by_the_next_process() {
        let b = bench(
            FakeLifecycle::new(Duration::from_secs(60)),
            FakeBackup::new(Duration::from_secs(100)),
            "",
        );
        let with_token = with_token("t-2");
        let job = in_background(&b.runner, with_token.clone());
        settle().await;
        b.shutdown.cancel();
        assert_eq!(job.await.unwrap().status, JobStatus::Interrupted);
        // The restarted daemon: same state file, the same token again.
        let again = b.restarted();
        let r = again.submit(with_token).await;
        assert_eq!(r.status, JobStatus::Succeeded);
        assert_eq!(b.lc.calls("CompleteLifecycleAction").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_already_settled_in_an_earlier_process_is_not_backed_up_again() {
        let b = bench(
            FakeLifecycle::new(Duration::from_secs(60)),
            FakeBackup::new(Duration::from_secs(10)),
            "",
        );
        let with_token = with_token("t-1");
        b.runner.submit(with_token.clone()).await;
        // A new runner (a restarted daemon) reads the state file.
        let again = b.restarted();
        again.submit(with_token).await;
        assert_eq!(b.lc.calls("CompleteLifecycleAction").len(), 1);
    }
}
