//! The watch stage: turns instance metadata into [`TerminationNotice`]s. It knows nothing of
//! archives or S3.
//!
//! IMDSv2 only, through the AWS SDK's IMDS client (token by PUT, refreshed on 401; it honours
//! `AWS_EC2_METADATA_SERVICE_ENDPOINT`). Polls `autoscaling/target-lifecycle-state` and, when
//! enabled, `spot/instance-action` and the rebalance recommendation, every poll interval. Errors
//! (503, timeouts, IMDS disabled) never end the watch and never spin: a state change is logged
//! once, polling backs off to ten seconds, and resumes its pace when metadata answers again.

use std::time::{Duration, SystemTime};

use aws_config::imds::client::Client as ImdsClient;
use aws_config::imds::client::error::ImdsError;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a Spot instance has after its notice, when the notice's time cannot be read.
pub const SPOT_NOTICE: Duration = Duration::from_secs(120);
/// The longest pause between polls while metadata fails: a Spot notice gives two minutes, so
/// backing off further would risk missing most of them.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Where a notice came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoticeSource {
    /// `autoscaling/target-lifecycle-state` became `Terminated`.
    TargetLifecycleState,
    /// `spot/instance-action` appeared.
    Spot,
    /// A rebalance recommendation appeared (an early backup, nothing to complete).
    Rebalance,
    /// `lifeboat backup` (an operator, or the SSM document with lifecycle details).
    Command,
    /// `[schedule] every`: a snapshot between terminations (nothing to complete).
    Scheduled,
}

/// One reason to back up now. Every source produces the same type; the job runner does not care
/// where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminationNotice {
    /// Where it came from.
    pub source: NoticeSource,
    /// Why, as it will appear in the key and the report (`terminate`, `spot-interruption`, …).
    pub reason: String,
    /// The Auto Scaling group, when known.
    pub group: Option<String>,
    /// The lifecycle hook, when known.
    pub hook: Option<String>,
    /// The lifecycle action token, when known.
    pub token: Option<String>,
    /// When the instance goes away, when known (Spot: about two minutes after the notice).
    pub deadline: Option<SystemTime>,
    /// Whether the lifecycle action should be completed when the job ends.
    pub complete_lifecycle: bool,
    /// The lifecycle action began after this time, when known: the watcher's last poll that saw
    /// `target-lifecycle-state` other than `Terminated` (the state changes as the instance
    /// prepares to leave, before the hook's clock starts). Unknown when the state was already
    /// `Terminated` at the watcher's first look (a restarted daemon) or for a command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_began_after: Option<SystemTime>,
    /// The hook's heartbeat timeout in seconds, when the caller has just read it (the Lambda
    /// passes it in the command): the hook need not be described again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_heartbeat_timeout_s: Option<u64>,
}

impl TerminationNotice {
    /// A notice from `source` with nothing to complete and no deadline (a rebalance
    /// recommendation, a scheduled snapshot).
    pub fn without_lifecycle(source: NoticeSource, reason: &str) -> Self {
        Self {
            source,
            reason: reason.into(),
            group: None,
            hook: None,
            token: None,
            deadline: None,
            complete_lifecycle: false,
            action_began_after: None,
            hook_heartbeat_timeout_s: None,
        }
    }
}

/// What the watcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A reason to back up now.
    Notice(TerminationNotice),
    /// `target-lifecycle-state` left `Terminated` (back in service, into a warm pool, reused):
    /// the next termination is a new one.
    NewLifecycle,
}

/// The Spot `instance-action` document.
#[derive(Debug, Deserialize)]
struct SpotAction {
    action: String,
    time: String,
}

/// What the watcher has already reported, so each notice is sent once.
#[derive(Debug, Default)]
struct Seen {
    terminated: bool,
    /// When a poll last read a target lifecycle state other than `Terminated` (or none).
    other_state_at: Option<SystemTime>,
    spot: bool,
    rebalance: bool,
}

/// Polls instance metadata and sends notices.
pub struct ImdsWatcher {
    client: ImdsClient,
    poll: Duration,
    spot: bool,
    rebalance: bool,
}

/// Metadata unavailable, with a short reason for the log.
pub(crate) fn describe(e: &ImdsError) -> String {
    match e {
        ImdsError::ErrorResponse(r) => format!("HTTP {}", r.response().status().as_u16()),
        ImdsError::FailedToLoadToken(_) => "no session token (IMDSv2 unavailable)".into(),
        ImdsError::IoError(_) => "no answer (timeout or connection refused)".into(),
        other => other.to_string(),
    }
}

fn is_not_found(e: &ImdsError) -> bool {
    matches!(e, ImdsError::ErrorResponse(r) if r.response().status().as_u16() == 404)
}

fn is_unauthorized(e: &ImdsError) -> bool {
    matches!(e, ImdsError::ErrorResponse(r) if r.response().status().as_u16() == 401)
}

fn imds_client() -> ImdsClient {
    ImdsClient::builder()
        .max_attempts(2)
        .connect_timeout(Duration::from_secs(1))
        .read_timeout(Duration::from_secs(2))
        .build()
}

impl ImdsWatcher {
    /// A watcher polling every `poll`; `spot` and `rebalance` enable those sources.
    pub fn new(poll: Duration, spot: bool, rebalance: bool) -> Self {
        Self {
            client: imds_client(),
            poll,
            spot,
            rebalance,
        }
    }

    /// Gets `path`: `Ok(None)` on 404 (nothing scheduled).
    async fn get(&self, path: &str) -> Result<Option<String>, ImdsError> {
        match self.client.get(path).await {
            Ok(v) => Ok(Some(v.into())),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One poll: the events due now.
    async fn poll_once(&self, seen: &mut Seen) -> Result<Vec<WatchEvent>, ImdsError> {
        let mut out = Vec::new();
        let state = self
            .get("/latest/meta-data/autoscaling/target-lifecycle-state")
            .await?;
        let terminating = state
            .as_deref()
            .is_some_and(|s| matches!(s.trim(), "Terminated" | "Warmed:Terminated"));
        if seen.terminated && !terminating && state.is_some() {
            // Back in service or into a warm pool: a later termination is a new one.
            seen.terminated = false;
            out.push(WatchEvent::NewLifecycle);
        }
        if !seen.terminated && terminating {
            seen.terminated = true;
            out.push(WatchEvent::Notice(TerminationNotice {
                source: NoticeSource::TargetLifecycleState,
                reason: "terminate".into(),
                group: None,
                hook: None,
                token: None,
                deadline: None,
                complete_lifecycle: true,
                action_began_after: seen.other_state_at,
                hook_heartbeat_timeout_s: None,
            }));
        }
        if !terminating {
            seen.other_state_at = Some(SystemTime::now());
        }
        if self.spot
            && !seen.spot
            && let Some(doc) = self.get("/latest/meta-data/spot/instance-action").await?
        {
            seen.spot = true;
            let parsed: Option<SpotAction> = serde_json::from_str(&doc).ok();
            let deadline = parsed
                .as_ref()
                .and_then(|a| {
                    time::OffsetDateTime::parse(
                        &a.time,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .ok()
                })
                .map(SystemTime::from)
                .unwrap_or_else(|| SystemTime::now() + SPOT_NOTICE);
            let action = parsed
                .map(|a| a.action)
                .unwrap_or_else(|| "terminate".into());
            out.push(WatchEvent::Notice(TerminationNotice {
                source: NoticeSource::Spot,
                reason: format!("spot-{action}"),
                group: None,
                hook: None,
                token: None,
                deadline: Some(deadline),
                complete_lifecycle: false,
                action_began_after: None,
                hook_heartbeat_timeout_s: None,
            }));
        }
        if self.rebalance
            && !seen.rebalance
            && self
                .get("/latest/meta-data/events/recommendations/rebalance")
                .await?
                .is_some()
        {
            seen.rebalance = true;
            out.push(WatchEvent::Notice(TerminationNotice::without_lifecycle(
                NoticeSource::Rebalance,
                "rebalance-recommendation",
            )));
        }
        Ok(out)
    }

    /// Polls until `shutdown`, sending each notice once (per lifecycle) on `notices`.
    pub async fn run(mut self, notices: mpsc::Sender<WatchEvent>, shutdown: CancellationToken) {
        let mut seen = Seen::default();
        let mut failing: Option<String> = None;
        let mut pause = self.poll;
        loop {
            match self.poll_once(&mut seen).await {
                Ok(found) => {
                    if let Some(was) = failing.take() {
                        tracing::info!(was = %was, "instance metadata answers again");
                    }
                    pause = self.poll;
                    for event in found {
                        if let WatchEvent::Notice(n) = &event {
                            tracing::info!(source = ?n.source, reason = %n.reason, "termination notice");
                        }
                        if notices.send(event).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    if is_unauthorized(&e) {
                        // The SDK client keeps its session token until the TTL runs out; a 401
                        // means the token is no good now: start a new session.
                        self.client = imds_client();
                    }
                    let what = describe(&e);
                    if failing.as_deref() != Some(what.as_str()) {
                        tracing::warn!(error = %what, "instance metadata unavailable; backing off");
                        failing = Some(what);
                    }
                    pause = (pause * 2).min(MAX_BACKOFF).max(self.poll);
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}
