//! Who this machine is: the instance identity from instance metadata (IMDSv2, through the AWS
//! SDK's IMDS client, which honours `AWS_EC2_METADATA_SERVICE_ENDPOINT`), or `standalone` values
//! off EC2. Gives up within about a second and never retries: a backup must not wait on metadata.

use std::time::Duration;

use aws_config::imds::client::Client as ImdsClient;
use serde::{Deserialize, Serialize};

/// The group name used off EC2 or outside an Auto Scaling group.
pub const STANDALONE: &str = "standalone";

/// How long the whole identity lookup may take before lifeboat carries on as `standalone`.
const LOOKUP_BUDGET: Duration = Duration::from_millis(1200);

/// The instance a backup belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceIdentity {
    /// `i-…` on EC2; the host name off EC2.
    pub instance_id: String,
    /// The Auto Scaling group, or `standalone`.
    pub group: String,
    /// Region, or `standalone`.
    pub region: String,
    /// Availability zone, or `standalone`.
    pub availability_zone: String,
    /// Instance type, or `standalone`.
    pub instance_type: String,
    /// Whether the values came from instance metadata.
    pub on_ec2: bool,
}

impl InstanceIdentity {
    /// The identity of a machine without instance metadata: its host name, `standalone` elsewhere.
    pub fn standalone() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| {
                !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            })
            .unwrap_or_else(|| "localhost".into());
        Self {
            instance_id: host,
            group: STANDALONE.into(),
            region: STANDALONE.into(),
            availability_zone: STANDALONE.into(),
            instance_type: STANDALONE.into(),
            on_ec2: false,
        }
    }

    /// Looks the identity up in instance metadata; `standalone` if that fails within about a
    /// second (off EC2, IMDS disabled, hop limit exceeded).
    pub async fn discover() -> Self {
        if std::env::var("AWS_EC2_METADATA_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        {
            return Self::standalone();
        }
        let client = ImdsClient::builder()
            .max_attempts(1)
            .connect_timeout(Duration::from_millis(500))
            .read_timeout(Duration::from_millis(800))
            .build();
        match tokio::time::timeout(LOOKUP_BUDGET, Self::from_imds(&client)).await {
            Ok(Ok(id)) => id,
            Ok(Err(e)) => {
                tracing::info!(error = %e, "no instance metadata; running as standalone");
                Self::standalone()
            }
            Err(_) => {
                tracing::info!(
                    "instance metadata did not answer within a second; running as standalone"
                );
                Self::standalone()
            }
        }
    }

    async fn from_imds(
        client: &ImdsClient,
    ) -> Result<Self, aws_config::imds::client::error::ImdsError> {
        let instance_id: String = client.get("/latest/meta-data/instance-id").await?.into();
        let doc: String = client
            .get("/latest/dynamic/instance-identity/document")
            .await?
            .into();
        let doc: IdentityDocument = serde_json::from_str(&doc).unwrap_or_default();
        // Present only when instance metadata tags are enabled; no API call needed then.
        let group = client
            .get("/latest/meta-data/tags/instance/aws:autoscaling:groupName")
            .await
            .map(String::from)
            .ok()
            .filter(|g| !g.is_empty())
            .unwrap_or_else(|| STANDALONE.into());
        let or_standalone = |s: String| {
            if s.is_empty() {
                STANDALONE.to_owned()
            } else {
                s
            }
        };
        Ok(Self {
            instance_id,
            group,
            region: or_standalone(doc.region),
            availability_zone: or_standalone(doc.availability_zone),
            instance_type: or_standalone(doc.instance_type),
            on_ec2: true,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct IdentityDocument {
    region: String,
    availability_zone: String,
    instance_type: String,
}
