//! lifeboat's companion Lambda. It consumes three kinds of events:
//!
//! - `EC2 Instance-terminate Lifecycle Action`, in batches from the lifecycle queue (the
//!   template: EventBridge → SQS → event source mapping, see [`queue`]) or one per invocation
//!   straight from EventBridge. It validates each event, checks the SSM document exists and
//!   reads the hook's heartbeat timeout (both cached while the function is warm), and sends
//!   `lifeboat-backup` with Run Command: one SendCommand per group, hook and reason for up to 50
//!   instances (each runs it as itself and completes its action by instance id; a lone
//!   instance gets its own id and token). It never waits for the command. When Run Command
//!   refuses an instance for a cause retrying cannot fix (not managed, document missing, a
//!   value the document would refuse) it completes that action itself with the configured
//!   result and publishes an SNS report saying the backup did not run and why. When SSM stays
//!   throttled past the invocation's budget, the event is left for retry (the queue delivers
//!   it again, then its dead-letter queue takes it; or Lambda's retries of the invocation)
//!   while the hook holds the instance; only an action that would expire before those retries
//!   (`LIFEBOAT_HEARTBEAT_TIMEOUT`) is renewed first, and completed if it cannot be. An event
//!   that waited half the heartbeat timeout is renewed before its command is sent. The dedupe
//!   look for an earlier command (ListCommands) gets one attempt and never the send's time; a
//!   send whose outcome is unknown (timed out) is looked for before it is sent again.
//! - `EC2 Command Status-change Notification` for its document, ending Failed, TimedOut,
//!   Cancelled or Undeliverable, of a command sent to one instance: it completes the action
//!   with the configured result (the token comes from the command's parameters).
//! - `EC2 Command Invocation Status-change Notification`, the same for one instance of a
//!   command sent to many: the group and hook come from the command's parameters
//!   (ListCommands), the instance from the event.
//!
//! "No active lifecycle action" when completing means the agent already completed it, which is
//! success. Everything keyed by the token or the instance is idempotent, so a duplicate or a
//! 24-hour-late event is harmless. Errors that can succeed later (throttling, 5xx) fail the
//! invocation (or name the message) so it is retried; a malformed event is logged and dropped.

pub mod config;
pub mod handler;
pub mod queue;
pub mod ssm;

use lambda_runtime::{LambdaEvent, service_fn};

/// Reads the configuration, builds the clients once per cold start, and serves events.
pub async fn run() -> Result<(), lambda_runtime::Error> {
    let config = match config::Config::from_env(|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("configuration: {e}");
            return Err(e.into());
        }
    };
    let handler = handler::Handler::new(config).await;
    let handler = &handler;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<serde_json::Value>| async move {
            handler
                .handle(event.payload, event.context.deadline())
                .await
        },
    ))
    .await
}
