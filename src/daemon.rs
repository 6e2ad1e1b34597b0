//! `lifeboat run`, the daemon: instance-metadata watch → job runner, a local control socket that
//! `lifeboat backup` and `lifeboat status` use, systemd readiness, graceful SIGTERM.
//!
//! The control socket speaks JSON lines: a [`Request`], then [`Reply`] lines (progress, then the
//! result). Only root or the daemon's own user may connect (checked with the peer's credentials,
//! and the socket file is mode 0600).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::job::JobResult;
use crate::runner::Runner;
use crate::state::{DaemonInfo, State, StateFile};
use crate::watch::{TerminationNotice, WatchEvent};

/// A request on the control socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Run or join the job for this notice.
    Backup(TerminationNotice),
    /// The daemon's state.
    Status,
}

/// A reply line on the control socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// The running job's counters.
    Progress {
        /// File bytes read.
        bytes_read: u64,
        /// Entries archived.
        entries: u64,
        /// Where the job is, as `status` shows it (absent from daemons before it was added).
        #[serde(default)]
        job: Option<crate::progress::Snapshot>,
    },
    /// The job's result; the last line.
    Result(Box<JobResult>),
    /// The daemon's state, and whether a job is running.
    Status {
        /// `state.json` as the daemon holds it.
        state: Box<State>,
        /// A job is running.
        job_running: bool,
        /// Where the running job is.
        #[serde(default)]
        job: Option<crate::progress::Snapshot>,
    },
}

/// `[schedule] every`: a snapshot now and then (reason `scheduled`, nothing to complete), each
/// wait drawn between three quarters of `every` and all of it so that a fleet started together
/// does not snapshot in step. None while a backup runs (it would join it) or once this
/// lifecycle's termination is backed up.
async fn snapshots(
    every: Duration,
    tx: mpsc::Sender<WatchEvent>,
    runner: Arc<Runner>,
    shutdown: CancellationToken,
) {
    loop {
        let wait = every.mul_f64(0.75 + 0.25 * fastrand::f64());
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        if runner.terminated() {
            tracing::debug!("no snapshot: this instance's termination is backed up");
            continue;
        }
        if runner.progress().is_some() {
            tracing::info!("snapshot skipped: a backup is running");
            continue;
        }
        let notice = crate::watch::TerminationNotice::without_lifecycle(
            crate::watch::NoticeSource::Scheduled,
            "scheduled",
        );
        if tx.send(WatchEvent::Notice(notice)).await.is_err() {
            return;
        }
    }
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No instance metadata within `watch.metadata_wait`: off EC2, or an outage that lasts.
    #[error(transparent)]
    NoMetadata(#[from] crate::identity::IdentityError),
    /// The control socket could not be set up.
    #[error("control socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Binds the control socket at `path` (mode 0600), replacing a stale one.
pub fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| DaemonError::Socket {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serves the control socket until `shutdown`.
pub async fn serve(
    listener: UnixListener,
    runner: Arc<Runner>,
    state: Arc<StateFile>,
    shutdown: CancellationToken,
) {
    let me = rustix::process::geteuid().as_raw();
    loop {
        let conn = tokio::select! {
            () = shutdown.cancelled() => return,
            c = listener.accept() => c,
        };
        let Ok((stream, _)) = conn else { continue };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == 0 || cred.uid() == me => {}
            Ok(cred) => {
                tracing::warn!(
                    uid = cred.uid(),
                    "control socket: refused a connection from another user"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket: cannot read peer credentials");
                continue;
            }
        }
        let (runner, state) = (Arc::clone(&runner), Arc::clone(&state));
        tokio::spawn(async move {
            if let Err(e) = handle(stream, runner, state).await {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
    }
}

async fn send(stream: &mut (impl AsyncWriteExt + Unpin), reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).expect("replies serialize");
    line.push(b'\n');
    stream.write_all(&line).await
}

async fn handle(
    stream: UnixStream,
    runner: Arc<Runner>,
    state: Arc<StateFile>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let request: Request = serde_json::from_str(&line)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    match request {
        Request::Status => {
            let job = runner.job_progress();
            let reply = Reply::Status {
                state: Box::new(state.snapshot()),
                job_running: job.is_some(),
                job,
            };
            send(&mut write, &reply).await
        }
        Request::Backup(notice) => {
            let job = {
                let runner = Arc::clone(&runner);
                tokio::spawn(async move {
                    let result = runner.submit(notice).await;
                    release_when_idle(&runner);
                    result
                })
            };
            tokio::pin!(job);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    done = &mut job => {
                        let result = done.map_err(std::io::Error::other)?;
                        return send(&mut write, &Reply::Result(Box::new(result))).await;
                    }
                    _ = tick.tick() => {
                        if let Some(c) = runner.progress() {
                            use std::sync::atomic::Ordering;
                            // A client that went away does not stop the job.
                            let _ = send(&mut write, &Reply::Progress {
                                bytes_read: c.bytes_read.load(Ordering::Relaxed),
                                entries: c.entries.load(Ordering::Relaxed),
                                job: runner.job_progress(),
                            }).await;
                        }
                    }
                }
            }
        }
    }
}

/// Sends `request` to a running daemon; `None` when no daemon listens. Progress lines go to
/// `on_progress`.
pub async fn ask(
    socket: &Path,
    request: &Request,
    mut on_progress: impl FnMut(&Reply),
) -> Option<std::io::Result<Reply>> {
    let mut stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(_) => return None,
    };
    Some(
        async {
            let mut line = serde_json::to_vec(request).expect("requests serialize");
            line.push(b'\n');
            stream.write_all(&line).await?;
            let mut lines = BufReader::new(stream).lines();
            while let Some(l) = lines.next_line().await? {
                let reply: Reply = serde_json::from_str(&l)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                match reply {
                    Reply::Progress { .. } => on_progress(&reply),
                    other => return Ok(other),
                }
            }
            Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection without a result",
            ))
        }
        .await,
    )
}

/// Tells systemd (when it started us with `Type=notify`) how we are; a no-op elsewhere.
pub fn notify(ready: bool, status: &str) {
    let mut states = vec![sd_notify::NotifyState::Status(status)];
    if ready {
        states.push(sd_notify::NotifyState::Ready);
    }
    let _ = sd_notify::notify(false, &states);
}

/// How often systemd's `STATUS=` is refreshed while a job runs (never while idle).
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// How long after start-up, or after a job, the daemon gives back the code pages it touched.
const RELEASE_CODE_AFTER: Duration = Duration::from_secs(30);

/// Gives back the code pages touched so far once [`RELEASE_CODE_AFTER`] has passed, if `idle`
/// says no job runs then: start-up and jobs run code the idle poll does not. Never under a
/// job: its code would be read from disk again, competing with its own reads (the job's end
/// schedules the next release). Detached: it holds up no shutdown; the task says whether it
/// released.
fn release_code_later(idle: impl Fn() -> bool + Send + 'static) -> tokio::task::JoinHandle<bool> {
    tokio::spawn(async move {
        tokio::time::sleep(RELEASE_CODE_AFTER).await;
        let release = idle();
        if release {
            crate::memory::release_code_pages();
        } else {
            tracing::debug!("a job is running: its code pages stay");
        }
        release
    })
}

/// [`release_code_later`] when `runner` is idle then.
fn release_when_idle(runner: &Arc<Runner>) {
    let runner = Arc::clone(runner);
    release_code_later(move || runner.progress().is_none());
}

/// Where the running configuration came from, and what it was: the daemon reads the source
/// again on SIGHUP and, for a parameter, every `watch.config_poll`.
#[derive(Debug, Clone)]
pub struct Reload {
    /// The source.
    pub source: crate::source::ConfigSource,
    /// The text the running configuration was read from.
    pub text: String,
    /// Its version, for `status`.
    pub version: String,
}

/// How a run of the daemon ended.
#[derive(Debug)]
pub enum Ended {
    /// SIGTERM / SIGINT.
    Stopped,
    /// The source changed and validates: run again with it.
    Reload(Box<crate::source::Loaded>),
}

/// Reads the configuration's source again: a new configuration that validates, or `None`
/// (unchanged, unreadable, or invalid: the running one stays, and the reason is logged).
async fn read_again(reload: &Reload) -> Option<crate::source::Loaded> {
    match reload.source.load().await {
        Err(e) => {
            tracing::error!(error = %e, "the configuration's source changed to something unusable; keeping the running configuration");
            None
        }
        // Parameter Store unreachable: the running configuration is the newest known.
        Ok(l) if l.cached => None,
        Ok(l) if l.text == reload.text => None,
        Ok(l) => Some(l),
    }
}

/// Runs the daemon until SIGTERM / SIGINT, or until its configuration's source changes
/// ([`Ended::Reload`]; never during a backup or after this instance's termination).
pub async fn run(
    config: Arc<crate::config::Config>,
    outer: CancellationToken,
    reload: Reload,
) -> Result<Ended, anyhow::Error> {
    // Cancelled on SIGTERM (the outer token) or to run again with a new configuration.
    let shutdown = outer.child_token();
    let w = &config.watch;
    notify(false, "waiting for instance metadata");
    // systemd's start timeout (90 s by default) would kill a daemon that waits out a metadata
    // outage at boot: extend it while waiting.
    let extend = (w.metadata_wait + Duration::from_secs(30)).as_micros();
    let identity = crate::identity::InstanceIdentity::wait_for(w.metadata_wait, &shutdown, |why| {
        let _ = sd_notify::notify(
            false,
            &[
                sd_notify::NotifyState::Status(&format!("waiting for instance metadata: {why}")),
                sd_notify::NotifyState::ExtendTimeoutUsec(
                    u32::try_from(extend).unwrap_or(u32::MAX),
                ),
            ],
        );
    })
    .await
    .map_err(DaemonError::NoMetadata)?;
    let instance_id = identity.instance_id.clone();
    let watcher = crate::watch::ImdsWatcher::new(w.poll_interval, w.spot, w.rebalance);
    let region =
        (identity.region != crate::identity::STANDALONE).then_some(identity.region.as_str());
    let services = crate::runner::Services::connect(&config, region).await;
    let mut identity = identity;
    identity.find_group(&services.lifecycle, None).await;
    let state = Arc::new(StateFile::open(&crate::state::state_dir()));
    let mut sources = vec!["autoscaling/target-lifecycle-state".to_owned()];
    if w.spot {
        sources.push("spot/instance-action".into());
    }
    if w.rebalance {
        sources.push("events/recommendations/rebalance".into());
    }
    if let Some(every) = config.schedule.every {
        sources.push(format!(
            "schedule (every {})",
            humantime::format_duration(every)
        ));
    }
    sources.push("control socket".into());
    let listener = bind(&crate::state::control_socket())?;
    let runner = Runner::new(
        Arc::clone(&config),
        identity.clone(),
        services,
        Arc::clone(&state),
        shutdown.clone(),
    );
    // A termination then finds the hook's settings cached: no describe call in a scale-in.
    runner.prefetch_hook();
    state.set_daemon(DaemonInfo {
        pid: std::process::id(),
        started_at: crate::manifest::rfc3339(time::OffsetDateTime::now_utc()),
        sources: sources.clone(),
        instance_id: instance_id.clone(),
        state: "running".into(),
        config: format!(
            "{} (version {})",
            reload.source.label().display(),
            reload.version
        ),
    });
    let (tx, mut rx) = mpsc::channel(8);
    if let Some(every) = config.schedule.every {
        tokio::spawn(snapshots(
            every,
            tx.clone(),
            Arc::clone(&runner),
            shutdown.clone(),
        ));
    }
    tokio::spawn(watcher.run(tx, shutdown.clone()));
    tokio::spawn(serve(
        listener,
        Arc::clone(&runner),
        Arc::clone(&state),
        shutdown.clone(),
    ));
    tracing::info!(instance_id = %instance_id, group = %identity.group, sources = ?sources, "watching");
    notify(
        true,
        &format!("watching {} for {instance_id}", sources.join(", ")),
    );
    // Start-up is over once the hook's settings are cached and metadata answered a few polls:
    // the code only start-up ran need not stay resident for weeks of idling.
    release_when_idle(&runner);
    let mut jobs = tokio::task::JoinSet::new();
    // SIGHUP (`systemctl reload lifeboat`): the hook's settings and the configuration are read
    // again; a configuration in Parameter Store also every watch.config_poll.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .inspect_err(|e| tracing::warn!(error = %e, "no SIGHUP handler: reload will not work"))
        .ok();
    let polled = matches!(reload.source, crate::source::ConfigSource::Parameter(_));
    let every = config.watch.config_poll;
    let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reloaded = None;
    loop {
        let read = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(()) = async { hangup.as_mut()?.recv().await } => {
                runner.reread_hook();
                true
            }
            _ = poll.tick(), if polled => true,
            Some(event) = rx.recv() => {
                match event {
                    WatchEvent::NewLifecycle => runner.new_lifecycle(),
                    WatchEvent::Notice(notice) => {
                        notify(false, &format!("backing up: {}", notice.reason));
                        let runner = Arc::clone(&runner);
                        jobs.spawn(async move {
                            // systemd's STATUS= follows the job (`systemctl status lifeboat`).
                            let shown = Arc::clone(&runner);
                            let status = tokio::spawn(async move {
                                let mut tick = tokio::time::interval(STATUS_EVERY);
                                loop {
                                    tick.tick().await;
                                    if let Some(p) = shown.job_progress() {
                                        notify(false, &p.line());
                                    }
                                }
                            });
                            let r = runner.submit(notice).await;
                            status.abort();
                            notify(false, &format!("last job: {}", r.status.name()));
                            release_when_idle(&runner);
                        });
                    }
                }
                false
            }
        };
        if !read {
            continue;
        }
        let Some(new) = read_again(&reload).await else {
            continue;
        };
        if runner.progress().is_some() || runner.terminated() {
            // Never under a running backup, nor once this instance is on its way out: the
            // next read (poll or SIGHUP) applies it when the daemon is idle.
            tracing::info!("the configuration changed; it applies once the daemon is idle");
            continue;
        }
        for change in crate::source::changes(&config, &new.config) {
            tracing::info!(%change, "configuration changed");
        }
        reloaded = Some(new);
        shutdown.cancel();
        break;
    }
    if let Some(new) = reloaded {
        // Idle: nothing to wait for but the tasks of this run, which stop on the token.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while jobs.join_next().await.is_some() {}
        })
        .await;
        let _ = std::fs::remove_file(crate::state::control_socket());
        notify(false, "reloading the configuration");
        return Ok(Ended::Reload(Box::new(new)));
    }
    if runner.progress().is_some() {
        tracing::warn!(
            "stopping during a backup: its upload is aborted and its lifecycle action left pending for the next start"
        );
        notify(false, "stopping: aborting the running backup");
    } else {
        tracing::info!("stopping");
        notify(false, "stopping");
    }
    // The running job sees the cancellation, aborts its upload and records itself interrupted.
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while jobs.join_next().await.is_some() {}
    })
    .await;
    let _ = std::fs::remove_file(crate::state::control_socket());
    let mut info = state.snapshot().daemon.unwrap_or_default();
    info.state = "stopped".into();
    state.set_daemon(info);
    Ok(Ended::Stopped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn code_pages_are_released_after_the_wait_and_never_under_a_job() {
        let started = tokio::time::Instant::now();
        assert!(!release_code_later(|| false).await.unwrap(), "a job runs");
        assert!(release_code_later(|| true).await.unwrap(), "idle");
        assert!(started.elapsed() >= RELEASE_CODE_AFTER * 2);
    }
}
