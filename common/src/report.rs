//! The report stage: one AWS service, SNS. Publishes a job's outcome as JSON with message
//! attributes (`status`, `instance_id`, `group`) for subscription filters. A failed publish is
//! logged by the caller and never blocks completion.

use aws_sdk_sns::Client;
use aws_sdk_sns::types::MessageAttributeValue;
use serde::Serialize;

/// A job's outcome, as published.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `succeeded`, `partial`, `failed`, `interrupted` (the agent was stopped mid-backup and left
    /// the action pending for its next start), or `not-run` (the Lambda could not start the
    /// backup); for a restore at launch, `restored`, `nothing-to-restore` or `restore-failed`.
    pub status: String,
    /// The instance.
    pub instance_id: String,
    /// The Auto Scaling group, or `standalone`.
    pub group: String,
    /// Why the job ran.
    pub reason: String,
    /// The archive was cut short by its deadline.
    pub partial: bool,
    /// Regular files archived.
    pub file_count: u64,
    /// File bytes read.
    pub bytes_read: u64,
    /// Bytes stored in S3.
    pub bytes_stored: u64,
    /// Wall time of the job in seconds.
    pub duration_seconds: f64,
    /// `s3://bucket/key` of the archive, when one was stored.
    pub object_url: Option<String>,
    /// Paths skipped.
    pub skipped: u64,
    /// What failed, when something did.
    pub error: Option<String>,
    /// The lifecycle result sent (`CONTINUE` or `ABANDON`), when an action was completed.
    pub lifecycle_result: Option<String>,
    /// A restore at launch: where the archive (`object_url`) went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored_to: Option<String>,
    /// `s3://bucket/key` of the archive's manifest, when one was stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_url: Option<String>,
    /// `s3://bucket/key` of the job's own log lines, kept beside the archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_url: Option<String>,
    /// Files that changed while they were read (archived as read; see the manifest).
    #[serde(default)]
    pub changed: u64,
}

impl Report {
    /// A report for a backup that never ran (or whose command failed), with why.
    pub fn without_backup(
        status: &str,
        instance_id: &str,
        group: &str,
        reason: &str,
        error: String,
        lifecycle_result: Option<String>,
    ) -> Self {
        Report {
            status: status.into(),
            instance_id: instance_id.into(),
            group: group.into(),
            reason: reason.into(),
            partial: false,
            file_count: 0,
            bytes_read: 0,
            bytes_stored: 0,
            duration_seconds: 0.0,
            object_url: None,
            skipped: 0,
            error: Some(error),
            lifecycle_result,
            restored_to: None,
            manifest_url: None,
            log_url: None,
            changed: 0,
        }
    }

    /// A report of a restore at launch (`status`: `restored`, `nothing-to-restore` or
    /// `restore-failed`): which archive went where, or why not.
    pub fn restore(
        status: &str,
        instance_id: &str,
        group: &str,
        from: Option<String>,
        to: &str,
        error: Option<String>,
        lifecycle_result: Option<String>,
    ) -> Self {
        Report {
            status: status.into(),
            instance_id: instance_id.into(),
            group: group.into(),
            reason: "launch".into(),
            partial: false,
            file_count: 0,
            bytes_read: 0,
            bytes_stored: 0,
            duration_seconds: 0.0,
            object_url: from,
            skipped: 0,
            error,
            lifecycle_result,
            restored_to: Some(to.into()),
            manifest_url: None,
            log_url: None,
            changed: 0,
        }
    }

    /// The SNS subject: at most 100 characters, no newlines, printable ASCII.
    pub fn subject(&self) -> String {
        let verb = match self.status.as_str() {
            "succeeded" => "backup succeeded",
            "partial" => "backup partial",
            "not-run" => "backup did not run",
            "interrupted" => "backup interrupted",
            "restored" => "data restored at launch",
            "nothing-to-restore" => "nothing to restore at launch",
            "restore-failed" => "restore at launch failed",
            _ => "backup failed",
        };
        let s = format!("lifeboat: {verb} on {} ({})", self.instance_id, self.group);
        let clean: String = s
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        clean.chars().take(100).collect()
    }
}

/// SNS refused or could not take the report.
#[derive(Debug, thiserror::Error)]
#[error("publishing the report to {topic_arn}: {message}")]
pub struct ReportError {
    /// The topic.
    pub topic_arn: String,
    /// SNS's or the connection's error.
    pub message: String,
}

/// Publishes `report` to `topic_arn`; its message id.
pub async fn publish(
    client: &Client,
    topic_arn: &str,
    report: &Report,
) -> Result<String, ReportError> {
    let attr = |v: &str| {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(v)
            .build()
            .expect("data type is set")
    };
    let body = serde_json::to_string(report).expect("reports serialize");
    let out = client
        .publish()
        .topic_arn(topic_arn)
        .subject(report.subject())
        .message(body)
        .message_attributes("status", attr(&report.status))
        .message_attributes("instance_id", attr(&report.instance_id))
        .message_attributes("group", attr(&report.group))
        .send()
        .await
        .map_err(|e| ReportError {
            topic_arn: topic_arn.to_owned(),
            message: crate::sdk::sdk_message(&e),
        })?;
    Ok(out.message_id().unwrap_or_default().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(status: &str, group: &str) -> Report {
        Report {
            status: status.into(),
            instance_id: "i-0123456789abcdef0".into(),
            group: group.into(),
            reason: "scale-in".into(),
            partial: false,
            file_count: 1,
            bytes_read: 1,
            bytes_stored: 1,
            duration_seconds: 1.0,
            object_url: None,
            skipped: 0,
            error: None,
            lifecycle_result: None,
            restored_to: None,
            manifest_url: None,
            log_url: None,
            changed: 0,
        }
    }

    #[test]
    fn subject_is_short_and_single_line() {
        assert_eq!(
            report("succeeded", "web").subject(),
            "lifeboat: backup succeeded on i-0123456789abcdef0 (web)"
        );
        let long = report("failed", &format!("a\nb{}", "g".repeat(200))).subject();
        assert!(long.len() <= 100);
        assert!(!long.contains('\n'));
    }
}
