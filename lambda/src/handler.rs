//! One event in, one outcome out: the lifecycle event becomes a Run Command, a failed command (or
//! a command Run Command would not take) becomes a completed lifecycle action and a report.

use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_lambda_events::event::eventbridge::EventBridgeEvent;
use lifeboat_common::document::{BackupParams, INSTANCE_ID, TOKEN};
use lifeboat_common::event::{
    COMMAND_STATUS, CommandStatus, LIFECYCLE_ACTION, LifecycleAction, TEST_NOTIFICATION,
};
use lifeboat_common::lifecycle::{ActionRef, Completed, Lifecycle, TERMINATING};
use lifeboat_common::report::{self, Report};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::config::Config;
use crate::ssm::Ssm;

/// Time kept back from SendCommand's retries for a fail-over completion and its report.
const FAIL_OVER_RESERVE: Duration = Duration::from_secs(3);

/// At most this much of the budget goes to checking the document (cached while warm): the rest is
/// SendCommand's. A throttled check is skipped (SendCommand says InvalidDocument itself).
const DOCUMENT_BUDGET: Duration = Duration::from_secs(3);

/// How long Lambda's own retries of a failed asynchronous invocation take to run out: two
/// retries, about one and two minutes after the failures, each up to the function's timeout.
/// An action with less time left than this is renewed (one heartbeat) before it is left to them.
const RETRY_HORIZON: Duration = Duration::from_secs(240);

/// At most this much of the budget goes to renewing an action (one heartbeat, retried if
/// throttled).
const RENEW_BUDGET: Duration = Duration::from_secs(8);

/// What renewing a lifecycle action came to.
enum Renewed {
    /// The hook's timeout starts over.
    Yes,
    /// No active lifecycle action: the agent completed it, or it expired.
    Gone,
    /// The heartbeat failed (throttled past its budget, or refused).
    Failed,
}

/// The warm function's state: configuration and clients, built once per cold start.
#[derive(Debug)]
pub struct Handler {
    config: Config,
    ssm: Ssm,
    lifecycle: Lifecycle,
    sns: aws_sdk_sns::Client,
}

/// What the invocation did, returned as its result (and logged).
fn outcome(kind: &str, fields: Value) -> Value {
    let mut v = json!({ "outcome": kind });
    if let (Some(map), Value::Object(extra)) = (v.as_object_mut(), fields) {
        map.extend(extra);
    }
    tracing::info!(%v, "done");
    v
}

fn ignored(why: impl Into<String>) -> Value {
    outcome("ignored", json!({ "why": why.into() }))
}

/// The outcome for an event whose action is no longer active when renewed: completed (by the
/// agent watching instance metadata) or expired. Nothing is sent to an instance on its way out.
fn gone(params: &BackupParams, age: Duration) -> Value {
    tracing::warn!(
        instance_id = %params.instance_id,
        late_s = age.as_secs(),
        "no active lifecycle action for a late event: completed on the instance, or expired while \
         the event waited (in a mass scale-in Run Command sends one instance per SendCommand: \
         raise the hook's heartbeat timeout, or run the daemon)"
    );
    outcome(
        "already-completed",
        json!({
            "instance_id": params.instance_id,
            "why": format!(
                "no active lifecycle action {} s after the event: completed on the instance, or expired",
                age.as_secs()
            ),
        }),
    )
}

/// The document's name, whether configured as a name or an ARN.
fn document_name(doc: &str) -> &str {
    doc.rsplit_once(":document/").map_or(doc, |(_, name)| name)
}

impl Handler {
    /// Builds the clients from the SDK's standard settings (region, credentials, endpoints).
    pub async fn new(config: Config) -> Self {
        let sdk = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .operation_attempt_timeout(Duration::from_secs(5))
                    .build(),
            )
            .load()
            .await;
        // The loops in `ssm` and `lifecycle` own retries and the time budget (the SDK's own
        // retries would multiply the throttled calls in a mass scale-in).
        let ssm = aws_sdk_ssm::config::Builder::from(&sdk)
            .retry_config(RetryConfig::disabled())
            .build();
        Handler {
            config,
            ssm: Ssm::new(aws_sdk_ssm::Client::from_conf(ssm)),
            // The agent's grace for "no active lifecycle action" too: one second after the
            // event it may be eventual consistency, not a completed action.
            lifecycle: Lifecycle::new(aws_sdk_autoscaling::Client::from_conf(
                aws_sdk_autoscaling::config::Builder::from(&sdk)
                    .retry_config(RetryConfig::disabled())
                    .build(),
            )),
            sns: aws_sdk_sns::Client::new(&sdk),
        }
    }

    /// Handles one EventBridge event. `Err` only for what a retry can fix (throttling, 5xx).
    pub async fn handle(
        &self,
        payload: Value,
        deadline: SystemTime,
    ) -> Result<Value, lambda_runtime::Error> {
        let left = deadline
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let until = Instant::now() + left.saturating_sub(Duration::from_millis(500));
        let event: EventBridgeEvent<Value> = match serde_json::from_value(payload) {
            Ok(e) => e,
            Err(e) => return Ok(ignored(format!("not an EventBridge event: {e}"))),
        };
        match event.detail_type.as_str() {
            LIFECYCLE_ACTION => match serde_json::from_value(event.detail) {
                Ok(detail) => {
                    let age = event.time.and_then(|t| {
                        let now = SystemTime::now()
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .ok()?;
                        now.checked_sub(Duration::from_secs(u64::try_from(t.timestamp()).ok()?))
                    });
                    self.on_lifecycle(detail, age.unwrap_or_default(), until)
                        .await
                }
                Err(e) => Ok(ignored(format!("malformed lifecycle action: {e}"))),
            },
            COMMAND_STATUS => match serde_json::from_value(event.detail) {
                Ok(detail) => self.on_command(detail, until).await,
                Err(e) => Ok(ignored(format!("malformed command status: {e}"))),
            },
            other => Ok(ignored(format!("event type {other:?} is not lifeboat's"))),
        }
    }

    /// The action to complete: by token when it is a well-formed token, else by instance id.
    fn action(params: &BackupParams) -> ActionRef {
        ActionRef {
            group: params.group.clone(),
            hook: params.hook.clone(),
            instance_id: params.instance_id.clone(),
            token: (!params.token.is_empty() && TOKEN.allows(&params.token))
                .then(|| params.token.clone()),
        }
    }

    /// Sends the document for a lifecycle event `age` old. Only a cause retrying cannot fix
    /// (not managed, no document, a refused value) completes the action here; SSM throttling
    /// past the budget fails the invocation, so Lambda retries it (then the dead-letter queue)
    /// while the hook holds the instance, unless the action would expire before the retries run.
    async fn on_lifecycle(
        &self,
        d: LifecycleAction,
        age: Duration,
        until: Instant,
    ) -> Result<Value, lambda_runtime::Error> {
        if d.event.as_deref() == Some(TEST_NOTIFICATION) {
            return Ok(ignored("Auto Scaling test notification"));
        }
        if d.lifecycle_transition != TERMINATING {
            return Ok(ignored(format!(
                "transition {:?} is not {TERMINATING}",
                d.lifecycle_transition
            )));
        }
        if !INSTANCE_ID.allows(&d.ec2_instance_id) {
            return Ok(ignored(format!(
                "instance id {:?} is not an EC2 instance id",
                d.ec2_instance_id
            )));
        }
        let reason = if d.destination.as_deref() == Some("WarmPool") {
            "warm-pool"
        } else {
            "scale-in"
        };
        let params = BackupParams {
            instance_id: d.ec2_instance_id,
            group: d.auto_scaling_group_name,
            hook: d.lifecycle_hook_name,
            token: d.lifecycle_action_token,
            reason: reason.into(),
        };
        if let Err(refused) = params.validate() {
            return self.fail_over(&params, refused.to_string(), until).await;
        }
        let send_until = until
            .checked_sub(FAIL_OVER_RESERVE)
            .unwrap_or_else(Instant::now);
        // An event that waited (Lambda's queue in a mass scale-in, its retries) may leave the
        // agent little of the hook's timeout: renew the action first, so the command has a
        // whole timeout to start in.
        let mut age = age;
        if self.config.heartbeat_timeout.is_some_and(|h| age >= h / 2) {
            match self.renew(&params, send_until).await {
                Renewed::Yes => age = Duration::ZERO,
                Renewed::Gone => return Ok(gone(&params, age)),
                Renewed::Failed => {}
            }
        }
        let document = &self.config.document;
        let document_until = send_until.min(Instant::now() + DOCUMENT_BUDGET);
        match self.ssm.check_document(document, document_until).await {
            Ok(()) => {}
            Err(e) if e.retryable() => tracing::warn!("document check skipped: {e}"),
            Err(e) => return self.fail_over(&params, e.to_string(), until).await,
        }
        // A dedupe, never at the send's expense: one attempt, and on any error none.
        match self.ssm.already_sent(document, &params).await {
            Ok(Some(id)) => return Ok(outcome("duplicate", json!({ "command_id": id }))),
            Ok(None) => {}
            Err(e) => tracing::warn!("no look for an earlier command: {e}"),
        }
        match self.ssm.send(&self.config, &params, send_until).await {
            Ok(id) => Ok(outcome(
                "sent",
                json!({ "command_id": id, "instance_id": params.instance_id }),
            )),
            Err(e) if e.retryable() => {
                if self.expires_before_retries(age) {
                    match self.renew(&params, until).await {
                        Renewed::Yes => {}
                        Renewed::Gone => return Ok(gone(&params, age)),
                        Renewed::Failed => {
                            return self.fail_over(&params, e.to_string(), until).await;
                        }
                    }
                }
                tracing::warn!(
                    instance_id = %params.instance_id,
                    "{e}: failing the invocation for Lambda to retry; the hook holds the instance"
                );
                Err(format!("{e} (the lifecycle action is left for Lambda's retry)").into())
            }
            Err(e) => self.fail_over(&params, e.to_string(), until).await,
        }
    }

    /// One heartbeat for the event's action, within [`RENEW_BUDGET`] and before `until`.
    async fn renew(&self, params: &BackupParams, until: Instant) -> Renewed {
        let until = until.min(Instant::now() + RENEW_BUDGET);
        match self.lifecycle.heartbeat(&Self::action(params), until).await {
            Ok(true) => {
                tracing::info!(instance_id = %params.instance_id, "lifecycle action renewed");
                Renewed::Yes
            }
            Ok(false) => Renewed::Gone,
            Err(e) => {
                tracing::warn!(instance_id = %params.instance_id, "lifecycle action not renewed: {e}");
                Renewed::Failed
            }
        }
    }

    /// Whether an action whose event is `age` old would expire before Lambda's retries have
    /// run (unknown heartbeat timeout: no, the hook's own timeout ends the wait).
    fn expires_before_retries(&self, age: Duration) -> bool {
        self.config
            .heartbeat_timeout
            .is_some_and(|h| age + RETRY_HORIZON >= h)
    }

    async fn on_command(
        &self,
        d: CommandStatus,
        until: Instant,
    ) -> Result<Value, lambda_runtime::Error> {
        if d.document_name != document_name(&self.config.document) {
            return Ok(ignored(format!(
                "document {:?} is not lifeboat's",
                d.document_name
            )));
        }
        if !d.failed() {
            return Ok(ignored(format!("command {} is {}", d.command_id, d.status)));
        }
        let Some(params) = BackupParams::from_parameters(&d.parameters) else {
            return Ok(ignored(format!(
                "command {} carries no lifeboat parameters",
                d.command_id
            )));
        };
        let why = format!(
            "Run Command ended {} for command {} (see its output)",
            d.status, d.command_id
        );
        self.fail_over(&params, why, until).await
    }

    /// Completes the action with the configured result, and reports why the backup did not run
    /// or failed. "No active lifecycle action" (the agent completed it) is success.
    async fn fail_over(
        &self,
        params: &BackupParams,
        why: String,
        until: Instant,
    ) -> Result<Value, lambda_runtime::Error> {
        let result = self.config.on_failure;
        tracing::warn!(instance_id = %params.instance_id, %why, "completing the lifecycle action");
        let action = Self::action(params);
        match self.lifecycle.complete(&action, result, until).await {
            Ok(Completed::AlreadyDone) => Ok(outcome(
                "already-completed",
                json!({ "instance_id": params.instance_id, "why": why }),
            )),
            Ok(Completed::Now) => {
                self.report(params, &why, Some(result.as_str())).await;
                Ok(outcome(
                    "completed",
                    json!({
                        "instance_id": params.instance_id,
                        "result": result.as_str(),
                        "why": why,
                    }),
                ))
            }
            Err(e) if e.retryable() => Err(format!("{why}; then {e}").into()),
            Err(e) => {
                let why = format!("{why}; the lifecycle action could not be completed: {e}");
                self.report(params, &why, None).await;
                Ok(outcome(
                    "failed",
                    json!({ "instance_id": params.instance_id, "why": why }),
                ))
            }
        }
    }

    async fn report(&self, params: &BackupParams, why: &str, result: Option<&str>) {
        let Some(topic) = &self.config.topic_arn else {
            return;
        };
        let report = Report::without_backup(
            "not-run",
            &params.instance_id,
            &params.group,
            &params.reason,
            format!("the backup did not run or did not finish: {why}"),
            result.map(str::to_owned),
        );
        if let Err(e) = report::publish(&self.sns, topic, &report).await {
            tracing::warn!("SNS report not sent: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_arn_or_name() {
        assert_eq!(
            document_name("arn:aws:ssm:us-east-1:123456789012:document/lifeboat-backup"),
            "lifeboat-backup"
        );
        assert_eq!(document_name("lifeboat-backup"), "lifeboat-backup");
    }

    #[test]
    fn a_malformed_token_completes_by_instance_id() {
        let mut params = BackupParams {
            instance_id: "i-0123456789abcdef0".into(),
            group: "web".into(),
            hook: "lifeboat".into(),
            token: "'; rm -rf / #".into(),
            reason: "scale-in".into(),
        };
        assert_eq!(Handler::action(&params).token, None);
        params.token = "87654321-4321-4321-4321-210987654321".into();
        assert_eq!(
            Handler::action(&params).token.as_deref(),
            Some("87654321-4321-4321-4321-210987654321")
        );
    }
}
