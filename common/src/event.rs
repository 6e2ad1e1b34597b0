//! The EventBridge events the Lambda consumes: `EC2 Instance-terminate Lifecycle Action` from Auto
//! Scaling, and `EC2 Command Status-change Notification` (per command) and `EC2 Command Invocation
//! Status-change Notification` (per instance of a command) from SSM Run Command: their `detail`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// `detail-type` of the lifecycle event.
pub const LIFECYCLE_ACTION: &str = "EC2 Instance-terminate Lifecycle Action";
/// `detail-type` of the launch lifecycle event.
pub const LAUNCH_ACTION: &str = "EC2 Instance-launch Lifecycle Action";

/// Whether `detail_type` is a lifecycle event's (terminate or launch).
pub fn is_lifecycle_action(detail_type: &str) -> bool {
    detail_type == LIFECYCLE_ACTION || detail_type == LAUNCH_ACTION
}
/// `detail-type` of Run Command's per-command status change.
pub const COMMAND_STATUS: &str = "EC2 Command Status-change Notification";
/// `detail-type` of Run Command's per-instance status change (no parameters in it).
pub const INVOCATION_STATUS: &str = "EC2 Command Invocation Status-change Notification";
/// The `Event` of the test notification Auto Scaling sends when a hook is created.
pub const TEST_NOTIFICATION: &str = "autoscaling:TEST_NOTIFICATION";

/// `detail` of `EC2 Instance-terminate Lifecycle Action`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct LifecycleAction {
    /// Present (as `autoscaling:TEST_NOTIFICATION`) only on the test notification.
    #[serde(default)]
    pub event: Option<String>,
    /// The action token.
    #[serde(default)]
    pub lifecycle_action_token: String,
    /// The group.
    #[serde(default)]
    pub auto_scaling_group_name: String,
    /// The hook.
    #[serde(default)]
    pub lifecycle_hook_name: String,
    /// The instance.
    #[serde(rename = "EC2InstanceId", default)]
    pub ec2_instance_id: String,
    /// `autoscaling:EC2_INSTANCE_TERMINATING` for the events lifeboat acts on.
    #[serde(default)]
    pub lifecycle_transition: String,
    /// Free text set on the hook.
    #[serde(default)]
    pub notification_metadata: Option<String>,
    /// Where the instance comes from (`AutoScalingGroup`, `WarmPool`).
    #[serde(default)]
    pub origin: Option<String>,
    /// Where it goes (`EC2`, `WarmPool`).
    #[serde(default)]
    pub destination: Option<String>,
}

/// `detail` of `EC2 Command Status-change Notification`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CommandStatus {
    /// The command.
    pub command_id: String,
    /// The document it ran.
    pub document_name: String,
    /// `Success`, `Failed`, `TimedOut`, `Cancelled`, `Undeliverable`, …
    pub status: String,
    /// The parameters it was sent with.
    #[serde(default)]
    pub parameters: HashMap<String, Vec<String>>,
}

/// `detail` of `EC2 Command Invocation Status-change Notification`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct InvocationStatus {
    /// The command.
    pub command_id: String,
    /// The document it ran.
    pub document_name: String,
    /// The instance this invocation ran on.
    pub instance_id: String,
    /// `Success`, `Failed`, `TimedOut`, `Cancelled`, `Undeliverable`, …
    pub status: String,
}

impl CommandStatus {
    /// Whether the command ended without running the document to success.
    pub fn failed(&self) -> bool {
        ended_badly(&self.status)
    }
}

impl InvocationStatus {
    /// Whether the invocation ended without running the document to success.
    pub fn failed(&self) -> bool {
        ended_badly(&self.status)
    }
}

/// Whether a Run Command status is an end other than success.
fn ended_badly(status: &str) -> bool {
    matches!(
        status,
        "Failed"
            | "TimedOut"
            | "Cancelled"
            | "Undeliverable"
            | "Terminated"
            | "DeliveryTimedOut"
            | "Delivery Timed Out"
            | "ExecutionTimedOut"
            | "Execution Timed Out"
    )
}

/// The instance id at the end of an instance ARN (`arn:aws:ec2:…:instance/i-…`).
pub fn instance_of(arn: &str) -> Option<&str> {
    arn.rsplit_once(":instance/").map(|(_, id)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_documented_lifecycle_event() {
        let raw = r#"{"version":"0","id":"e1","detail-type":"EC2 Instance-terminate Lifecycle Action",
            "source":"aws.autoscaling","region":"us-west-2","resources":["arn:x"],
            "detail":{"LifecycleActionToken":"87654321-4321-4321-4321-210987654321",
            "AutoScalingGroupName":"my-asg","LifecycleHookName":"lifeboat",
            "EC2InstanceId":"i-1234567890abcdef0",
            "LifecycleTransition":"autoscaling:EC2_INSTANCE_TERMINATING",
            "NotificationMetadata":"x","Origin":"AutoScalingGroup","Destination":"EC2"}}"#;
        let env: serde_json::Value = serde_json::from_str(raw).unwrap();
        assert_eq!(env["detail-type"], LIFECYCLE_ACTION);
        let d: LifecycleAction = serde_json::from_value(env["detail"].clone()).unwrap();
        assert_eq!(d.ec2_instance_id, "i-1234567890abcdef0");
        assert_eq!(d.destination.as_deref(), Some("EC2"));
    }

    #[test]
    fn instance_from_arn() {
        assert_eq!(
            instance_of("arn:aws:ec2:us-east-1:123456789012:instance/i-0abc"),
            Some("i-0abc")
        );
        assert_eq!(instance_of("arn:aws:s3:::b"), None);
    }
}
