//! The lifecycle stage: one AWS service, Auto Scaling. Finds the group and its terminate hook,
//! keeps the hook alive with heartbeats, confirms `Terminating:Wait`, and completes the action.
//!
//! Built for a thousand instances terminating in the same minute, all sharing one Auto Scaling
//! API rate limit: every call retries throttling and 5xx itself (build the client with the
//! SDK's retries disabled), with jittered backoff that grows with the throttling the process has
//! seen, until shortly before the call's deadline; heartbeats start at a random phase; and "no
//! active lifecycle action" (seen in practice right after `Terminating:Wait`, and after someone
//! else completed it) is retried for a short while, then taken as done.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aws_sdk_autoscaling::Client;
use aws_sdk_autoscaling::config::http::HttpResponse;
use aws_sdk_autoscaling::error::ProvideErrorMetadata;
use serde::{Deserialize, Serialize};

use crate::sdk::{is_throttle, sdk_message};
use tokio::time::Instant;

/// The terminating transition's name in hooks and events.
pub const TERMINATING: &str = "autoscaling:EC2_INSTANCE_TERMINATING";
/// The lifecycle state while a terminate hook holds the instance.
pub const TERMINATING_WAIT: &str = "Terminating:Wait";
/// The launching transition's name in hooks and events.
pub const LAUNCHING: &str = "autoscaling:EC2_INSTANCE_LAUNCHING";
/// The lifecycle state while a launch hook holds the instance.
pub const PENDING_WAIT: &str = "Pending:Wait";
/// How long "no active lifecycle action" is retried before it is taken as done, by default.
pub const NOT_ACTIVE_GRACE: Duration = Duration::from_secs(15);

/// Result given to the lifecycle action when the backup failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum LifecycleResult {
    /// Let the group's other hooks run; the instance terminates.
    Continue,
    /// Skip remaining hooks; with a retention policy the instance is kept.
    Abandon,
}

impl LifecycleResult {
    /// The name the API takes.
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleResult::Continue => "CONTINUE",
            LifecycleResult::Abandon => "ABANDON",
        }
    }
}

impl std::str::FromStr for LifecycleResult {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "CONTINUE" => Ok(LifecycleResult::Continue),
            "ABANDON" => Ok(LifecycleResult::Abandon),
            other => Err(format!("{other:?} is not CONTINUE or ABANDON")),
        }
    }
}

/// Why a lifecycle call failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// An Auto Scaling call failed for good (or ran out of time).
    #[error("{operation} for instance {instance_id}: {message}")]
    Call {
        /// The API operation.
        operation: &'static str,
        /// The instance.
        instance_id: String,
        /// The service's or the connection's error.
        message: String,
        /// Throttling, a 5xx or a connection failure: worth trying again later.
        retryable: bool,
    },
    /// The instance is not in an Auto Scaling group.
    #[error("instance {instance_id} is not in an Auto Scaling group")]
    NoGroup {
        /// The instance.
        instance_id: String,
    },
    /// The group has no terminate hook.
    #[error("group {group} has no terminate lifecycle hook (set lifecycle.hook_name or add one)")]
    NoHook {
        /// The group.
        group: String,
    },
    /// The group has several terminate hooks and none is configured.
    #[error(
        "group {group} has several terminate lifecycle hooks ({hooks}); set lifecycle.hook_name to the one lifeboat owns"
    )]
    AmbiguousHook {
        /// The group.
        group: String,
        /// Their names.
        hooks: String,
    },
    /// The configured hook does not exist on the group.
    #[error("group {group} has no terminate lifecycle hook named {hook}")]
    UnknownHook {
        /// The group.
        group: String,
        /// The configured name.
        hook: String,
    },
}

impl LifecycleError {
    /// Whether the same call could succeed later (throttling, 5xx, connection failures).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            LifecycleError::Call {
                retryable: true,
                ..
            }
        )
    }
}

/// Which lifecycle action a job completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionRef {
    /// The Auto Scaling group.
    pub group: String,
    /// The terminate hook.
    pub hook: String,
    /// The instance.
    pub instance_id: String,
    /// The action token, when the notice carried one; completion goes by instance id otherwise.
    pub token: Option<String>,
}

/// A terminate hook's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// Its name.
    pub name: String,
    /// How long the instance waits without a heartbeat.
    pub heartbeat_timeout: Duration,
    /// The result applied when it times out.
    pub default_result: String,
}

impl Hook {
    /// The most a hook can hold an instance: min(48 h, 100 × heartbeat timeout).
    pub fn global_timeout(&self) -> Duration {
        (self.heartbeat_timeout * 100).min(Duration::from_secs(48 * 3600))
    }
}

/// How completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completed {
    /// This call completed the action.
    Now,
    /// There was no active action any more (completed by someone else, or timed out).
    AlreadyDone,
}

/// How an error should be handled.
#[derive(Debug, PartialEq, Eq)]
enum Class {
    Retry,
    NotActive,
    Fatal,
}

/// The SDK error type of every Auto Scaling operation.
type SdkError<E> = aws_sdk_autoscaling::error::SdkError<E, HttpResponse>;

fn classify<E: ProvideErrorMetadata>(err: &SdkError<E>) -> Class {
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Class::Retry
        }
        SdkError::ServiceError(se) => {
            let code = se.err().code().unwrap_or_default();
            let message = se.err().message().unwrap_or_default();
            let status = se.raw().status().as_u16();
            if matches!(
                code,
                "Throttling"
                    | "ThrottlingException"
                    | "RequestLimitExceeded"
                    | "ServiceUnavailable"
            ) || status >= 500
            {
                Class::Retry
            } else if message.contains("No active Lifecycle Action") {
                Class::NotActive
            } else {
                Class::Fatal
            }
        }
        _ => Class::Fatal,
    }
}

/// Jittered exponential backoff: full jitter over `base × 2^attempt`, capped.
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let ceiling = base
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(cap);
    ceiling.mul_f64(fastrand::f64())
}

/// The pause after the `step`th throttle in a row (1, 2, …): "equal jitter" over
/// `THROTTLE_BASE × 2^(step-1)`, capped at [`THROTTLE_CAP`]: half of it fixed, so a fleet's
/// retries thin out as fast as the throttling says they must (fewer throttled calls than full
/// jitter, whose pauses can be near zero), and capped low enough that the last instances
/// waiting do not sleep long past the moment the bucket frees up.
pub fn throttle_pause(step: u32) -> Duration {
    equal_jitter(step.saturating_sub(1), THROTTLE_BASE, THROTTLE_CAP)
}

/// Jittered exponential backoff with half of it fixed: between half and all of
/// `base × 2^step`, capped.
pub fn equal_jitter(step: u32, base: Duration, cap: Duration) -> Duration {
    let ceiling = base
        .saturating_mul(2u32.saturating_pow(step.min(16)))
        .min(cap);
    ceiling / 2 + (ceiling / 2).mul_f64(fastrand::f64())
}

/// How long before its `until` a call makes its last attempt.
const LAST_ATTEMPT_MARGIN: Duration = Duration::from_millis(500);

/// The first pause after a throttled call (see [`throttle_pause`]).
const THROTTLE_BASE: Duration = Duration::from_secs(2);
/// The longest pause after a throttled call. A fleet-scale simulation
/// (`scripts/fleet-sim.sh`, 1,000 instances on one bucket) picked it: longer pauses save few
/// throttled calls but leave the bucket idle at the end while the last instances sleep.
const THROTTLE_CAP: Duration = Duration::from_secs(20);

/// How much throttling a process's calls to one service have seen: up one per throttle (to a
/// maximum), down one per success. Shared by the calls of a process (the agent's Auto Scaling
/// calls, a warm Lambda's SSM calls), so a throttled call slows the next ones too.
#[derive(Debug, Default)]
pub struct ThrottleLevel(AtomicU32);

impl ThrottleLevel {
    /// The level now.
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// Raises the level, at most to `max`; the new level.
    pub fn raise(&self, max: u32) -> u32 {
        let raise = |l: u32| (l + 1).min(max);
        let before = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some(raise(l)))
            .unwrap_or_else(|l| l);
        raise(before)
    }

    /// Lowers the level by one (not below 0).
    pub fn lower(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1));
    }
}

/// Client-side pacing shared by every Auto Scaling call of the process: the account's bucket
/// is shared by every caller, so a throttled call slows the next ones too. The level rises with
/// each throttle and falls with each success; while it is up, a new call first waits a jittered
/// delay that grows with it (a throttled retry backs off by its own attempts).
#[derive(Debug, Default)]
struct Pacer {
    level: ThrottleLevel,
}

impl Pacer {
    const MAX_LEVEL: u32 = 6;

    /// Before the first attempt of a call (a retry has waited already).
    async fn before_call(&self) {
        let level = self.level.get();
        if level > 0 {
            tokio::time::sleep(backoff(
                level,
                Duration::from_millis(250),
                Duration::from_secs(30),
            ))
            .await;
        }
    }

    fn throttled(&self) {
        self.level.raise(Self::MAX_LEVEL);
    }

    fn succeeded(&self) {
        self.level.lower();
    }
}

/// Auto Scaling, as lifeboat uses it.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    client: Client,
    not_active_grace: Duration,
    pacer: Arc<Pacer>,
}

impl Lifecycle {
    /// Wraps an Auto Scaling client.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            not_active_grace: NOT_ACTIVE_GRACE,
            pacer: Arc::default(),
        }
    }

    /// How long completion retries "no active lifecycle action" before taking it as done. The
    /// agent waits [`NOT_ACTIVE_GRACE`] (the answer is seen briefly right after
    /// `Terminating:Wait`); the Lambda, which acts after the agent, takes it at once.
    pub fn with_not_active_grace(mut self, grace: Duration) -> Self {
        self.not_active_grace = grace;
        self
    }

    /// The group and lifecycle state of `instance_id` (DescribeAutoScalingInstances).
    pub async fn describe_instance(
        &self,
        instance_id: &str,
        until: Instant,
    ) -> Result<Option<(String, String)>, LifecycleError> {
        let mut attempt = 0;
        loop {
            if attempt == 0 {
                self.pacer.before_call().await;
            }
            match self
                .client
                .describe_auto_scaling_instances()
                .instance_ids(instance_id)
                .send()
                .await
            {
                Ok(out) => {
                    self.pacer.succeeded();
                    return Ok(out.auto_scaling_instances().first().map(|i| {
                        (
                            i.auto_scaling_group_name().unwrap_or_default().to_owned(),
                            i.lifecycle_state().unwrap_or_default().to_owned(),
                        )
                    }));
                }
                Err(e) => {
                    self.pause_or_fail(
                        &e,
                        &mut attempt,
                        until,
                        "DescribeAutoScalingInstances",
                        instance_id,
                    )
                    .await?
                }
            }
        }
    }

    /// The group's hooks on `transition` (`TERMINATING`, `LAUNCHING`).
    pub async fn hooks(
        &self,
        group: &str,
        transition: &str,
        instance_id: &str,
        until: Instant,
    ) -> Result<Vec<Hook>, LifecycleError> {
        let mut attempt = 0;
        let out = loop {
            if attempt == 0 {
                self.pacer.before_call().await;
            }
            match self
                .client
                .describe_lifecycle_hooks()
                .auto_scaling_group_name(group)
                .send()
                .await
            {
                Ok(out) => {
                    self.pacer.succeeded();
                    break out;
                }
                Err(e) => {
                    self.pause_or_fail(
                        &e,
                        &mut attempt,
                        until,
                        "DescribeLifecycleHooks",
                        instance_id,
                    )
                    .await?
                }
            }
        };
        Ok(out
            .lifecycle_hooks()
            .iter()
            .filter(|h| h.lifecycle_transition() == Some(transition))
            .map(|h| Hook {
                name: h.lifecycle_hook_name().unwrap_or_default().to_owned(),
                heartbeat_timeout: Duration::from_secs(
                    u64::try_from(h.heartbeat_timeout().unwrap_or(3600)).unwrap_or(3600),
                ),
                default_result: h.default_result().unwrap_or("ABANDON").to_owned(),
            })
            .collect())
    }

    /// The group's terminate hook: `configured` if set (and present), else the only one.
    pub async fn terminate_hook(
        &self,
        group: &str,
        configured: Option<&str>,
        instance_id: &str,
        until: Instant,
    ) -> Result<Hook, LifecycleError> {
        self.hook_for(group, TERMINATING, configured, instance_id, until)
            .await
    }

    /// The group's hook for `transition`: `configured` if set (and present), else the only one.
    pub async fn hook_for(
        &self,
        group: &str,
        transition: &str,
        configured: Option<&str>,
        instance_id: &str,
        until: Instant,
    ) -> Result<Hook, LifecycleError> {
        let hooks = self.hooks(group, transition, instance_id, until).await?;
        match configured {
            Some(name) => hooks.into_iter().find(|h| h.name == name).ok_or_else(|| {
                LifecycleError::UnknownHook {
                    group: group.to_owned(),
                    hook: name.to_owned(),
                }
            }),
            None => match hooks.len() {
                0 => Err(LifecycleError::NoHook {
                    group: group.to_owned(),
                }),
                1 => Ok(hooks.into_iter().next().expect("one hook")),
                _ => Err(LifecycleError::AmbiguousHook {
                    group: group.to_owned(),
                    hooks: hooks
                        .iter()
                        .map(|h| h.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
            },
        }
    }

    /// One heartbeat, retrying throttling until `until`. `Ok(false)`: no active action any more.
    pub async fn heartbeat(
        &self,
        action: &ActionRef,
        until: Instant,
    ) -> Result<bool, LifecycleError> {
        let mut attempt = 0;
        loop {
            if attempt == 0 {
                self.pacer.before_call().await;
            }
            let result = self
                .client
                .record_lifecycle_action_heartbeat()
                .auto_scaling_group_name(&action.group)
                .lifecycle_hook_name(&action.hook)
                .set_lifecycle_action_token(action.token.clone())
                .set_instance_id(action.token.is_none().then(|| action.instance_id.clone()))
                .send()
                .await;
            match result {
                Ok(_) => {
                    self.pacer.succeeded();
                    return Ok(true);
                }
                Err(e) if classify(&e) == Class::NotActive => return Ok(false),
                Err(e) => {
                    self.pause_or_fail(
                        &e,
                        &mut attempt,
                        until,
                        "RecordLifecycleActionHeartbeat",
                        &action.instance_id,
                    )
                    .await?
                }
            }
        }
    }

    /// Completes the action with `result`, retrying until `until` (shortly before the deadline).
    pub async fn complete(
        &self,
        action: &ActionRef,
        result: LifecycleResult,
        until: Instant,
    ) -> Result<Completed, LifecycleError> {
        let result_name = result.as_str();
        let mut attempt = 0;
        let mut not_active_since: Option<Instant> = None;
        loop {
            if attempt == 0 {
                self.pacer.before_call().await;
            }
            let sent = self
                .client
                .complete_lifecycle_action()
                .auto_scaling_group_name(&action.group)
                .lifecycle_hook_name(&action.hook)
                .lifecycle_action_result(result_name)
                .set_lifecycle_action_token(action.token.clone())
                .set_instance_id(action.token.is_none().then(|| action.instance_id.clone()))
                .send()
                .await;
            match sent {
                Ok(_) => {
                    self.pacer.succeeded();
                    tracing::info!(
                        group = %action.group,
                        hook = %action.hook,
                        instance_id = %action.instance_id,
                        result = result_name,
                        "lifecycle action completed"
                    );
                    return Ok(Completed::Now);
                }
                Err(e) if classify(&e) == Class::NotActive => {
                    let since = *not_active_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.not_active_grace || Instant::now() >= until {
                        tracing::info!(
                            instance_id = %action.instance_id,
                            "no active lifecycle action: already completed"
                        );
                        return Ok(Completed::AlreadyDone);
                    }
                    attempt += 1;
                    tokio::time::sleep(backoff(
                        attempt,
                        Duration::from_millis(500),
                        Duration::from_secs(3),
                    ))
                    .await;
                }
                Err(e) => {
                    self.pause_or_fail(
                        &e,
                        &mut attempt,
                        until,
                        "CompleteLifecycleAction",
                        &action.instance_id,
                    )
                    .await?
                }
            }
        }
    }

    /// Sleeps a jittered backoff for a retryable error if there is time before `until`;
    /// otherwise turns the error into a [`LifecycleError`].
    async fn pause_or_fail<E>(
        &self,
        err: &SdkError<E>,
        attempt: &mut u32,
        until: Instant,
        operation: &'static str,
        instance_id: &str,
    ) -> Result<(), LifecycleError>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let fail = || LifecycleError::Call {
            operation,
            instance_id: instance_id.to_owned(),
            message: sdk_message(err),
            retryable: classify(err) == Class::Retry,
        };
        if classify(err) != Class::Retry {
            return Err(fail());
        }
        *attempt += 1;
        // Throttled: back off longer than from a failure, so a fleet's retries do not spend the
        // account's bucket. The pause grows with this call's own throttles; the process's level (raised here)
        // delays only the first attempt of its next calls. Heartbeats have stopped when
        // completion retries, so a pause taken from a level that earlier heartbeats raised could
        // outlast the hook's heartbeat timeout.
        let pause = if is_throttle(err) {
            self.pacer.throttled();
            throttle_pause(*attempt)
        } else {
            backoff(
                *attempt,
                Duration::from_millis(500),
                Duration::from_secs(20),
            )
        };
        // A pause past `until` is cut short for one last attempt just before it.
        let left = until.saturating_duration_since(Instant::now());
        if left < LAST_ATTEMPT_MARGIN * 2 {
            return Err(fail());
        }
        let pause = pause.min(left - LAST_ATTEMPT_MARGIN);
        tracing::debug!(operation, attempt = *attempt, error = %sdk_message(err), "retrying");
        tokio::time::sleep(pause).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_timeout_is_capped_at_48_hours() {
        let hook = |secs| Hook {
            name: "h".into(),
            heartbeat_timeout: Duration::from_secs(secs),
            default_result: "CONTINUE".into(),
        };
        assert_eq!(hook(300).global_timeout(), Duration::from_secs(30_000));
        assert_eq!(hook(7200).global_timeout(), Duration::from_secs(172_800));
    }

    #[test]
    fn backoff_stays_under_its_cap() {
        for attempt in 0..40 {
            let d = backoff(attempt, Duration::from_millis(500), Duration::from_secs(20));
            assert!(d <= Duration::from_secs(20));
        }
    }

    #[test]
    fn throttle_pauses_double_from_one_second_and_stay_between_half_and_all_of_the_cap() {
        for _ in 0..100 {
            let first = throttle_pause(1);
            assert!(
                first >= THROTTLE_BASE / 2 && first <= THROTTLE_BASE,
                "{first:?}"
            );
            let third = throttle_pause(3);
            assert!(
                third >= THROTTLE_BASE * 2 && third <= THROTTLE_BASE * 4,
                "{third:?}"
            );
            for step in [6, 7, 40, u32::MAX] {
                let late = throttle_pause(step);
                assert!(late >= THROTTLE_CAP / 2 && late <= THROTTLE_CAP, "{late:?}");
            }
        }
    }
}
