//! The lifecycle queue: EventBridge puts each lifecycle event on an SQS queue, and Lambda's event
//! source mapping hands them to the function in batches. A batch becomes one SendCommand per
//! group, hook and reason for up to 50 instances, where direct invocation sends one per
//! instance: in a mass scale-in, SendCommand's rate is what bounds the Run Command path, and a
//! thousand instances then take twenty commands instead of a thousand.
//!
//! Messages whose event must be retried (SSM throttled past the budget) are named in
//! `batchItemFailures` (the mapping's `ReportBatchItemFailures`): the queue delivers them again
//! after its visibility timeout, and after `maxReceiveCount` receives moves them to the
//! dead-letter queue. Every other message is done (sent, completed, or ignored) and deleted.

use aws_lambda_events::event::eventbridge::EventBridgeEvent;
use lifeboat_common::event::is_lifecycle_action;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::handler::{Fate, Handler, Pending, ignored};

/// One SQS message: its id (what `batchItemFailures` names) and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `messageId`.
    pub id: String,
    /// `body`: the EventBridge event, as JSON text.
    pub body: String,
}

/// The messages of an SQS event (`Records` from `aws:sqs`); `None` for any other payload.
pub fn messages(payload: &Value) -> Option<Vec<Message>> {
    let records = payload.get("Records")?.as_array()?;
    if records
        .iter()
        .any(|r| r.get("eventSource").and_then(Value::as_str) != Some("aws:sqs"))
    {
        return None;
    }
    Some(
        records
            .iter()
            .map(|r| Message {
                id: r["messageId"].as_str().unwrap_or_default().to_owned(),
                body: r["body"].as_str().unwrap_or_default().to_owned(),
            })
            .collect(),
    )
}

/// What a message asks for.
enum Ask {
    /// A lifecycle event to dispatch with the rest of the batch.
    Lifecycle(Pending),
    /// Another EventBridge event (a command status routed to the queue too).
    Other(EventBridgeEvent<Value>),
}

fn ask(body: &str) -> Result<Ask, Value> {
    let event: EventBridgeEvent<Value> = serde_json::from_str(body)
        .map_err(|e| ignored(format!("message is not an EventBridge event: {e}")))?;
    if is_lifecycle_action(&event.detail_type) {
        Pending::of(event).map(Ask::Lifecycle)
    } else {
        Ok(Ask::Other(event))
    }
}

impl Handler {
    /// Handles a batch; the response names the messages to deliver again.
    pub(crate) async fn on_queue(&self, messages: Vec<Message>, until: Instant) -> Value {
        let mut retry: Vec<&str> = Vec::new();
        let mut ignored_n = 0usize;
        let mut lifecycle = Vec::new();
        let mut lifecycle_ids = Vec::new();
        for m in &messages {
            match ask(&m.body) {
                Ok(Ask::Lifecycle(p)) => {
                    lifecycle.push(p);
                    lifecycle_ids.push(m.id.as_str());
                }
                Ok(Ask::Other(event)) => {
                    if self.on_status(event, until).await.is_err() {
                        retry.push(&m.id);
                    }
                }
                Err(_) => ignored_n += 1,
            }
        }
        let received = lifecycle.len();
        let fates = self.dispatch(lifecycle, until).await;
        let mut done = 0usize;
        for (id, fate) in lifecycle_ids.into_iter().zip(fates) {
            match fate {
                Fate::Done(_) => done += 1,
                Fate::Retry(_) => retry.push(id),
            }
        }
        tracing::info!(
            messages = messages.len(),
            lifecycle_events = received,
            handled = done,
            ignored = ignored_n,
            to_retry = retry.len(),
            "batch done"
        );
        json!({
            "batchItemFailures": retry
                .into_iter()
                .map(|id| json!({ "itemIdentifier": id }))
                .collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_sqs_event_is_its_messages_and_anything_else_is_not() {
        let sqs = json!({ "Records": [
            { "messageId": "m1", "body": "{\"a\":1}", "eventSource": "aws:sqs" },
            { "messageId": "m2", "body": "x", "eventSource": "aws:sqs" },
        ]});
        assert_eq!(
            messages(&sqs).unwrap(),
            [
                Message {
                    id: "m1".into(),
                    body: "{\"a\":1}".into()
                },
                Message {
                    id: "m2".into(),
                    body: "x".into()
                }
            ]
        );
        assert_eq!(messages(&json!({ "detail-type": "x" })), None);
        let sns = json!({ "Records": [{ "EventSource": "aws:sns" }] });
        assert_eq!(messages(&sns), None);
    }
}
