//! lifeboat's companion Lambda. EventBridge sends it two kinds of events:
//!
//! - `EC2 Instance-terminate Lifecycle Action`: it validates the event, checks the SSM document
//!   exists (cached while the function is warm), and sends `lifeboat-backup` to the instance with
//!   Run Command, then returns; it never waits for the command. When Run Command refuses the
//!   command for a cause retrying cannot fix (instance not managed, document missing, a value the
//!   document would refuse) it completes the lifecycle action itself with the configured result
//!   and publishes an SNS report saying the backup did not run and why. When SSM stays throttled
//!   past the invocation's budget, the invocation fails: Lambda retries it (then the dead-letter
//!   queue takes the event) while the hook holds the instance; only an action that would expire
//!   before those retries (`LIFEBOAT_HEARTBEAT_TIMEOUT`) is completed instead. The dedupe look
//!   for an earlier command (ListCommands) gets one attempt and never the send's time.
//! - `EC2 Command Status-change Notification` for its document, ending Failed, TimedOut, Cancelled
//!   or Undeliverable: it completes the action with the configured result (the token comes from
//!   the command's parameters). "No active lifecycle action" means the agent already completed it,
//!   which is success.
//!
//! Everything keyed by the token is idempotent, so a duplicate or a 24-hour-late event is
//! harmless. Errors that can succeed later (throttling, 5xx) fail the invocation so it is retried;
//! a malformed event is logged and dropped.

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
