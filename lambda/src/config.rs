//! The Lambda's configuration: environment variables, validated at cold start so a bad deployment
//! fails at once with the variable's name, not on the first terminating instance.

use std::time::Duration;

use lifeboat_common::document::DEFAULT_DOCUMENT;
use lifeboat_common::lifecycle::LifecycleResult;

/// A variable that is set but wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct ConfigError {
    /// The environment variable.
    pub var: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

/// Where Run Command puts the command's full output (GetCommandInvocation keeps only 24,000
/// characters of stdout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Nowhere beyond SSM's own truncated copy.
    None,
    /// An S3 bucket and key prefix.
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix.
        prefix: String,
    },
    /// A CloudWatch Logs group.
    CloudWatch {
        /// The log group.
        log_group: String,
    },
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `LIFEBOAT_DOCUMENT`: the SSM document to run (default `lifeboat-backup`).
    pub document: String,
    /// `LIFEBOAT_RESTORE_DOCUMENT`: the SSM document launch events run (`lifeboat-restore`);
    /// unset: launch events are ignored.
    pub restore_document: Option<String>,
    /// `LIFEBOAT_LAUNCH_ON_FAILURE`: the result of a launch action the Lambda completes
    /// because the restore command failed (default ABANDON: the instance is replaced rather
    /// than put in service without its data).
    pub launch_on_failure: LifecycleResult,
    /// `LIFEBOAT_SNS_TOPIC_ARN`: where reports go; empty for none.
    pub topic_arn: Option<String>,
    /// `LIFEBOAT_ON_FAILURE`: the result when the backup cannot run or fails (default CONTINUE).
    pub on_failure: LifecycleResult,
    /// `LIFEBOAT_OUTPUT_BUCKET` / `LIFEBOAT_OUTPUT_PREFIX` or `LIFEBOAT_LOG_GROUP`.
    pub output: Output,
    /// `LIFEBOAT_DELIVERY_TIMEOUT`: how long Run Command may try to deliver (SendCommand's
    /// `TimeoutSeconds`, 30–2592000 s; default 120 s). An instance that cannot be reached in that
    /// time ends Undeliverable, and the action is completed.
    pub delivery_timeout: Duration,
    /// `LIFEBOAT_HEARTBEAT_TIMEOUT`: the hook's heartbeat timeout in seconds (30–7200; the
    /// template passes its `HeartbeatTimeout`, which also sets the hook's), or unset. When Run
    /// Command stays throttled, an action that would outlive Lambda's retries is left to them;
    /// one that would expire first is renewed, or completed when it cannot be. Unset: always
    /// left to the retries (the hook's timeout ends the wait). Also passed to the agents as the
    /// hook's timeout when the hook cannot be read in time (keep it equal to the hook's).
    pub heartbeat_timeout: Option<Duration>,
}

impl Config {
    /// Reads the variables through `var` (the process environment in production).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| {
            var(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let document_name = |var: &'static str, document: String| {
            if document.len() > 128
                || !document
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-:/".contains(c))
            {
                return Err(ConfigError {
                    var,
                    problem: format!("{document:?} is not an SSM document name or ARN"),
                });
            }
            Ok(document)
        };
        let document = document_name(
            "LIFEBOAT_DOCUMENT",
            get("LIFEBOAT_DOCUMENT").unwrap_or_else(|| DEFAULT_DOCUMENT.into()),
        )?;
        let restore_document = get("LIFEBOAT_RESTORE_DOCUMENT")
            .map(|d| document_name("LIFEBOAT_RESTORE_DOCUMENT", d))
            .transpose()?;
        let result = |var: &'static str, default| match get(var) {
            None => Ok(default),
            Some(v) => v
                .to_ascii_uppercase()
                .parse()
                .map_err(|problem| ConfigError { var, problem }),
        };
        let launch_on_failure = result("LIFEBOAT_LAUNCH_ON_FAILURE", LifecycleResult::Abandon)?;
        let topic_arn = get("LIFEBOAT_SNS_TOPIC_ARN");
        if let Some(arn) = &topic_arn
            && !(arn.starts_with("arn:") && arn.split(':').count() == 6)
        {
            return Err(ConfigError {
                var: "LIFEBOAT_SNS_TOPIC_ARN",
                problem: format!(
                    "{arn:?} is not an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)"
                ),
            });
        }
        let on_failure = result("LIFEBOAT_ON_FAILURE", LifecycleResult::Continue)?;
        let output = match (get("LIFEBOAT_OUTPUT_BUCKET"), get("LIFEBOAT_LOG_GROUP")) {
            (Some(_), Some(_)) => {
                return Err(ConfigError {
                    var: "LIFEBOAT_LOG_GROUP",
                    problem: "set either LIFEBOAT_OUTPUT_BUCKET or LIFEBOAT_LOG_GROUP, not both"
                        .into(),
                });
            }
            (Some(bucket), None) => Output::S3 {
                bucket,
                prefix: get("LIFEBOAT_OUTPUT_PREFIX").unwrap_or_else(|| "lifeboat/ssm/".into()),
            },
            (None, Some(log_group)) => Output::CloudWatch { log_group },
            (None, None) => Output::None,
        };
        let delivery_timeout = match get("LIFEBOAT_DELIVERY_TIMEOUT") {
            None => Duration::from_secs(120),
            Some(v) => match v.trim_end_matches('s').parse::<u64>() {
                Ok(secs) if (30..=2_592_000).contains(&secs) => Duration::from_secs(secs),
                _ => {
                    return Err(ConfigError {
                        var: "LIFEBOAT_DELIVERY_TIMEOUT",
                        problem: format!("{v:?} is not a number of seconds from 30 to 2592000"),
                    });
                }
            },
        };
        let heartbeat_timeout = match get("LIFEBOAT_HEARTBEAT_TIMEOUT") {
            None => None,
            Some(v) => match v.trim_end_matches('s').parse::<u64>() {
                Ok(secs) if (30..=7200).contains(&secs) => Some(Duration::from_secs(secs)),
                _ => {
                    return Err(ConfigError {
                        var: "LIFEBOAT_HEARTBEAT_TIMEOUT",
                        problem: format!("{v:?} is not a number of seconds from 30 to 7200"),
                    });
                }
            },
        };
        Ok(Config {
            document,
            restore_document,
            launch_on_failure,
            topic_arn,
            on_failure,
            output,
            delivery_timeout,
            heartbeat_timeout,
        })
    }
}

/// The reason a launch event's command carries.
pub const LAUNCH: &str = "launch";

impl Config {
    /// The document a command for `reason` runs: the restore document for launches.
    pub fn document_for(&self, reason: &str) -> &str {
        match (&self.restore_document, reason) {
            (Some(restore), LAUNCH) => restore,
            _ => &self.document,
        }
    }

    /// The result the Lambda completes an action with when its command could not run or failed.
    pub fn on_failure_for(&self, reason: &str) -> LifecycleResult {
        if reason == LAUNCH {
            self.launch_on_failure
        } else {
            self.on_failure
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_env(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn defaults() {
        let c = config(&[]).unwrap();
        assert_eq!(c.document, "lifeboat-backup");
        assert_eq!(c.on_failure, LifecycleResult::Continue);
        assert_eq!(c.output, Output::None);
        assert_eq!(c.topic_arn, None);
        assert_eq!(c.restore_document, None);
        assert_eq!(c.document_for(LAUNCH), "lifeboat-backup");
        assert_eq!(c.on_failure_for(LAUNCH), LifecycleResult::Abandon);
    }

    #[test]
    fn launches_run_the_restore_document() {
        let c = config(&[
            ("LIFEBOAT_RESTORE_DOCUMENT", "lifeboat-restore"),
            ("LIFEBOAT_LAUNCH_ON_FAILURE", "continue"),
        ])
        .unwrap();
        assert_eq!(c.document_for(LAUNCH), "lifeboat-restore");
        assert_eq!(c.document_for("scale-in"), "lifeboat-backup");
        assert_eq!(c.on_failure_for(LAUNCH), LifecycleResult::Continue);
        assert_eq!(c.on_failure_for("scale-in"), LifecycleResult::Continue);
        let e = config(&[("LIFEBOAT_RESTORE_DOCUMENT", "a;b")]).unwrap_err();
        assert_eq!(e.var, "LIFEBOAT_RESTORE_DOCUMENT");
        let e = config(&[("LIFEBOAT_LAUNCH_ON_FAILURE", "later")]).unwrap_err();
        assert_eq!(e.var, "LIFEBOAT_LAUNCH_ON_FAILURE");
    }

    #[test]
    fn errors_name_the_variable() {
        let e = config(&[("LIFEBOAT_ON_FAILURE", "retry")]).unwrap_err();
        assert_eq!(e.var, "LIFEBOAT_ON_FAILURE");
        assert!(e.to_string().contains("CONTINUE or ABANDON"), "{e}");
        let e = config(&[("LIFEBOAT_SNS_TOPIC_ARN", "topic")]).unwrap_err();
        assert_eq!(e.var, "LIFEBOAT_SNS_TOPIC_ARN");
        let e = config(&[("LIFEBOAT_DELIVERY_TIMEOUT", "5")]).unwrap_err();
        assert_eq!(e.var, "LIFEBOAT_DELIVERY_TIMEOUT");
        let e = config(&[("LIFEBOAT_HEARTBEAT_TIMEOUT", "9000")]).unwrap_err();
        assert_eq!(e.var, "LIFEBOAT_HEARTBEAT_TIMEOUT");
        assert_eq!(
            config(&[("LIFEBOAT_HEARTBEAT_TIMEOUT", "900")])
                .unwrap()
                .heartbeat_timeout,
            Some(Duration::from_secs(900))
        );
        let e = config(&[("LIFEBOAT_DOCUMENT", "a b")]).unwrap_err();
        assert_eq!(e.var, "LIFEBOAT_DOCUMENT");
        let e = config(&[("LIFEBOAT_OUTPUT_BUCKET", "b"), ("LIFEBOAT_LOG_GROUP", "g")]);
        assert!(e.is_err());
    }

    #[test]
    fn abandon_and_output_bucket() {
        let c = config(&[
            ("LIFEBOAT_ON_FAILURE", "abandon"),
            ("LIFEBOAT_OUTPUT_BUCKET", "logs"),
        ])
        .unwrap();
        assert_eq!(c.on_failure, LifecycleResult::Abandon);
        assert_eq!(
            c.output,
            Output::S3 {
                bucket: "logs".into(),
                prefix: "lifeboat/ssm/".into()
            }
        );
    }
}
