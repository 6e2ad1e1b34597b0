//! Run Command, as the Lambda uses it: is the document there (cached while warm), was this token's
//! command already sent, SendCommand to one or many instances with jittered retries inside the
//! invocation's budget, paced by the throttling the warm function has seen (an attempt whose
//! outcome is unknown is looked for before the next), and the parameters of a sent command.

use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_ssm::Client;
use aws_sdk_ssm::config::http::HttpResponse;
use aws_sdk_ssm::error::ProvideErrorMetadata;
use aws_sdk_ssm::operation::list_commands::{ListCommandsError, ListCommandsOutput};
use aws_sdk_ssm::operation::send_command::SendCommandOutput;
use aws_sdk_ssm::types::{CloudWatchOutputConfig, Command, CommandFilter, CommandFilterKey};
use lifeboat_common::document::{BackupParams, TOKEN};
use lifeboat_common::lifecycle::{ThrottleLevel, backoff, equal_jitter};
use lifeboat_common::sdk::{is_throttle, sdk_message};
use tokio::time::Instant;

use crate::config::{Config, Output};

/// The highest throttling level (pauses of 2.5-5 s).
const MAX_LEVEL: u32 = 5;

/// How long a document found to exist is trusted without asking again.
const DOCUMENT_TTL: Duration = Duration::from_secs(300);

/// Why Run Command did not take the command.
///
/// Only [`SsmError::Exhausted`] can succeed later ([`SsmError::retryable`]); the others are
/// answers retrying cannot change.
#[derive(Debug, thiserror::Error)]
pub enum SsmError {
    /// Instances not managed by SSM (no agent, no role, or gone): the whole SendCommand is
    /// refused.
    #[error("instance {} is not managed by SSM ({message})", instance_ids.join(", "))]
    NotManaged {
        /// The instances SSM's answer names among those sent to (all of them when it names
        /// none).
        instance_ids: Vec<String>,
        /// SSM's answer.
        message: String,
    },
    /// The document does not exist or is not active.
    #[error("SSM document {document} is missing or not active ({message})")]
    NoDocument {
        /// The document.
        document: String,
        /// SSM's answer.
        message: String,
    },
    /// Throttling, 5xx or connection failures until the time budget ran out.
    #[error("{operation} kept failing until the time budget ran out: {message}")]
    Exhausted {
        /// The API operation.
        operation: &'static str,
        /// The last error.
        message: String,
    },
    /// Anything else SSM refused (parameters, permissions).
    #[error("{operation} refused: {message}")]
    Refused {
        /// The API operation.
        operation: &'static str,
        /// SSM's answer.
        message: String,
    },
}

impl SsmError {
    /// Whether a later attempt (Lambda's own retry of the invocation) may succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Exhausted { .. })
    }
}

type SdkError<E> = aws_sdk_ssm::error::SdkError<E, HttpResponse>;

fn retryable<E: ProvideErrorMetadata>(err: &SdkError<E>) -> bool {
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(se) => {
            matches!(
                se.err().code(),
                Some("ThrottlingException" | "Throttling" | "InternalServerError")
            ) || se.raw().status().as_u16() >= 500
        }
        _ => false,
    }
}

/// The pause after throttling at `level`: equal jitter over 0.25 s × 2^level, capped at 5 s
/// (an invocation has about 25 s, and while its instances wait in the queue, its retries are
/// what keeps the account's SendCommand rate in use).
fn throttle_pause(level: u32) -> Duration {
    equal_jitter(level, Duration::from_millis(250), Duration::from_secs(5))
}

/// SSM for one warm function.
#[derive(Debug)]
pub struct Ssm {
    client: Client,
    /// When each document was last seen active.
    document_seen: Mutex<std::collections::HashMap<String, Instant>>,
    /// The throttling this warm function's SSM calls have seen: up one per throttle, down one
    /// per success. Every call starts after a pause that grows with it, so the concurrent
    /// invocations of a mass scale-in settle near one throttled call per command sent instead
    /// of hammering SendCommand from the first millisecond of each invocation.
    level: ThrottleLevel,
}

impl Ssm {
    /// Wraps a client (built with the SDK's retries off: the loops here own the time budget).
    pub fn new(client: Client) -> Self {
        Ssm {
            client,
            document_seen: Mutex::new(std::collections::HashMap::new()),
            level: ThrottleLevel::default(),
        }
    }

    /// Retries `call` on throttling, 5xx and connection errors with jittered backoff until
    /// `until`; other errors go to `fail`.
    async fn retry<T, E, F, Fut>(
        &self,
        operation: &'static str,
        until: Instant,
        mut call: F,
        fail: impl Fn(&SdkError<E>) -> SsmError,
    ) -> Result<T, SsmError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let level = self.level.get();
        if level > 0 {
            let left = until.saturating_duration_since(Instant::now());
            tokio::time::sleep(throttle_pause(level).min(left / 2)).await;
        }
        let mut attempt = 0;
        loop {
            match call().await {
                Ok(v) => {
                    self.level.lower();
                    return Ok(v);
                }
                Err(e) if retryable(&e) => {
                    attempt += 1;
                    let pause = if is_throttle(&e) {
                        throttle_pause(self.level.raise(MAX_LEVEL).max(attempt))
                    } else {
                        backoff(attempt, Duration::from_millis(100), Duration::from_secs(5))
                    };
                    if Instant::now() + pause >= until {
                        return Err(SsmError::Exhausted {
                            operation,
                            message: sdk_message(&e),
                        });
                    }
                    tracing::debug!(operation, attempt, error = %sdk_message(&e), "retrying");
                    tokio::time::sleep(pause).await;
                }
                Err(e) => return Err(fail(&e)),
            }
        }
    }

    /// Checks that `document` exists and is active, at most once per [`DOCUMENT_TTL`].
    pub async fn check_document(&self, document: &str, until: Instant) -> Result<(), SsmError> {
        let fresh = self
            .document_seen
            .lock()
            .expect("not poisoned")
            .get(document)
            .is_some_and(|seen| seen.elapsed() < DOCUMENT_TTL);
        if fresh {
            return Ok(());
        }
        let out = self
            .retry(
                "DescribeDocument",
                until,
                || self.client.describe_document().name(document).send(),
                |e| SsmError::NoDocument {
                    document: document.to_owned(),
                    message: sdk_message(e),
                },
            )
            .await?;
        let status = out
            .document()
            .and_then(|d| d.status())
            .map(|s| s.as_str().to_owned())
            .unwrap_or_else(|| "Active".into());
        if status != "Active" {
            return Err(SsmError::NoDocument {
                document: document.to_owned(),
                message: format!("status {status}"),
            });
        }
        self.document_seen
            .lock()
            .expect("not poisoned")
            .insert(document.to_owned(), Instant::now());
        Ok(())
    }

    /// The id of a command already sent to this instance with this document and token that has
    /// not failed, if any: a duplicate event then sends nothing. One attempt, no retries: this is
    /// an optimisation (the agent also answers a token it has handled from its state file), and
    /// it must never spend the time SendCommand needs when SSM is throttling.
    pub async fn already_sent(
        &self,
        document: &str,
        params: &BackupParams,
    ) -> Result<Option<String>, SsmError> {
        if params.token.is_empty() {
            return Ok(None);
        }
        let out = self
            .commands_to(&params.instance_id, document)
            .await
            .map_err(|e| SsmError::Refused {
                operation: "ListCommands",
                message: sdk_message(&e),
            })?;
        Ok(out
            .commands()
            .iter()
            .filter(|c| c.document_name() == Some(document))
            .filter(|c| {
                c.parameters()
                    .and_then(|p| p.get(TOKEN.name))
                    .and_then(|v| v.first())
                    .is_some_and(|t| *t == params.token)
            })
            .find(|c| {
                !matches!(
                    c.status().map(|s| s.as_str()),
                    Some("Failed" | "Cancelled" | "TimedOut")
                )
            })
            .and_then(|c| c.command_id().map(str::to_owned)))
    }

    /// The parameters `command_id` was sent with (`None` when SSM knows no such command).
    pub async fn command_parameters(
        &self,
        command_id: &str,
        until: Instant,
    ) -> Result<Option<BackupParams>, SsmError> {
        let out = self
            .retry(
                "ListCommands",
                until,
                || self.client.list_commands().command_id(command_id).send(),
                |e| SsmError::Refused {
                    operation: "ListCommands",
                    message: sdk_message(e),
                },
            )
            .await?;
        Ok(out
            .commands()
            .iter()
            .find(|c| c.command_id() == Some(command_id))
            .and_then(|c| c.parameters())
            .and_then(BackupParams::from_parameters))
    }

    /// The commands sent to `instance_id` with `document` (one ListCommands attempt).
    async fn commands_to(
        &self,
        instance_id: &str,
        document: &str,
    ) -> Result<ListCommandsOutput, SdkError<ListCommandsError>> {
        self.client
            .list_commands()
            .instance_id(instance_id)
            .filters(
                CommandFilter::builder()
                    .key(CommandFilterKey::DocumentName)
                    .value(document)
                    .build()
                    .expect("key and value are set"),
            )
            .send()
            .await
    }

    /// The command carrying `mark` in its comment sent to `instance_id` with `document`, if
    /// any. One attempt: on any error, none.
    async fn find_sent(&self, document: &str, instance_id: &str, mark: &str) -> Option<String> {
        let out = self
            .commands_to(instance_id, document)
            .await
            .inspect_err(|e| {
                tracing::warn!(
                    "no look for a command sent by a timed-out attempt: {}",
                    sdk_message(e)
                )
            })
            .ok()?;
        out.commands()
            .iter()
            .find(|c| c.comment().is_some_and(|t| t.ends_with(mark)))
            .and_then(|c| c.command_id().map(str::to_owned))
    }

    /// Sends `document` with `params` to `instance_ids` (at most 50: one SendCommand);
    /// returns the command id.
    pub async fn send(
        &self,
        config: &Config,
        document: &str,
        params: &BackupParams,
        instance_ids: &[String],
        until: Instant,
    ) -> Result<String, SsmError> {
        let timeout = i32::try_from(config.delivery_timeout.as_secs()).unwrap_or(i32::MAX);
        let whom = match instance_ids {
            [one] => one.clone(),
            many => format!("{} instances of {}", many.len(), params.group),
        };
        // A mark of this send in the comment: after an attempt whose outcome is unknown (timed
        // out, connection lost), the command it may have created is looked for before sending
        // again, so the instances do not run the backup twice.
        let mark = format!("#{:08x}", fastrand::u32(..));
        let what = if document == config.document {
            "backup"
        } else {
            "restore"
        };
        let comment: String = format!("lifeboat {what} of {whom} ({})", params.reason)
            .chars()
            .take(90)
            .chain(format!(" {mark}").chars())
            .collect();
        let unsure = std::cell::Cell::new(false);
        let out = self
            .retry(
                "SendCommand",
                until,
                || async {
                    if unsure.get()
                        && let Some(id) = self.find_sent(document, &instance_ids[0], &mark).await
                    {
                        tracing::info!(command_id = %id, "the attempt that timed out had sent the command");
                        return Ok(SendCommandOutput::builder()
                            .command(Command::builder().command_id(id).build())
                            .build());
                    }
                    let mut req = self
                        .client
                        .send_command()
                        .document_name(document)
                        .set_instance_ids(Some(instance_ids.to_vec()))
                        .set_parameters(Some(params.to_parameters()))
                        .timeout_seconds(timeout)
                        .comment(comment.clone());
                    req = match &config.output {
                        Output::None => req,
                        Output::S3 { bucket, prefix } => req
                            .output_s3_bucket_name(bucket)
                            .output_s3_key_prefix(prefix),
                        Output::CloudWatch { log_group } => req.cloud_watch_output_config(
                            CloudWatchOutputConfig::builder()
                                .cloud_watch_log_group_name(log_group)
                                .cloud_watch_output_enabled(true)
                                .build(),
                        ),
                    };
                    let sent = req.send().await;
                    if matches!(
                        sent,
                        Err(SdkError::TimeoutError(_)
                            | SdkError::ResponseError(_)
                            | SdkError::DispatchFailure(_))
                    ) {
                        unsure.set(true);
                    }
                    sent
                },
                |e| match e.code() {
                    Some("InvalidInstanceId") => SsmError::NotManaged {
                        instance_ids: named_in(&sdk_message(e), instance_ids),
                        message: sdk_message(e),
                    },
                    Some("InvalidDocument" | "InvalidDocumentVersion") => SsmError::NoDocument {
                        document: document.to_owned(),
                        message: sdk_message(e),
                    },
                    _ => SsmError::Refused {
                        operation: "SendCommand",
                        message: sdk_message(e),
                    },
                },
            )
            .await?;
        Ok(out
            .command()
            .and_then(|c| c.command_id())
            .unwrap_or_default()
            .to_owned())
    }
}

/// The instances among `sent` that `message` names; all of `sent` when it names none (SSM's
/// InvalidInstanceId usually lists them, but nothing promises it).
fn named_in(message: &str, sent: &[String]) -> Vec<String> {
    let words: Vec<&str> = message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .collect();
    let named: Vec<String> = sent
        .iter()
        .filter(|id| words.contains(&id.as_str()))
        .cloned()
        .collect();
    if named.is_empty() {
        sent.to_vec()
    } else {
        named
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_instance_id_names_the_instances_it_lists_or_all() {
        let sent: Vec<String> = ["i-0000000000000000a", "i-0000000000000000b", "i-00000000"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            named_in(
                "Instances [[i-0000000000000000b, i-00000000]] not in a valid state for account 1",
                &sent
            ),
            ["i-0000000000000000b", "i-00000000"]
        );
        // A prefix of a listed id is not that id.
        assert_eq!(
            named_in(
                "Instances [i-0000000000000000a1] not in a valid state",
                &sent
            ),
            sent
        );
        assert_eq!(named_in("Invalid instance id", &sent), sent);
    }

    #[test]
    fn throttle_pauses_grow_from_a_quarter_second_to_at_most_five() {
        for _ in 0..100 {
            let first = throttle_pause(1);
            assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(500));
            for level in [MAX_LEVEL, 40, u32::MAX] {
                let late = throttle_pause(level);
                assert!(late >= Duration::from_millis(2500) && late <= Duration::from_secs(5));
            }
        }
    }
}
