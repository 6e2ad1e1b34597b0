//! Who this machine is: the instance identity from instance metadata (IMDSv2, through the AWS
//! SDK's IMDS client, which honours `AWS_EC2_METADATA_SERVICE_ENDPOINT`), or `standalone` values
//! off EC2. A command gives metadata about a second ([`InstanceIdentity::discover`]): a backup
//! must not wait on it. The daemon keeps asking for `watch.metadata_wait`
//! ([`InstanceIdentity::wait_for`]): a metadata outage at boot must not turn protection off.

use std::time::Duration;

use aws_config::imds::client::Client as ImdsClient;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The group name used off EC2 or outside an Auto Scaling group.
pub const STANDALONE: &str = "standalone";

/// How long the whole identity lookup may take before lifeboat carries on as `standalone`.
const LOOKUP_BUDGET: Duration = Duration::from_millis(1200);
/// The longest pause between the daemon's identity lookups while metadata does not answer.
const WAIT_BACKOFF_CAP: Duration = Duration::from_secs(10);
/// While metadata does not answer, the daemon says so this often.
const WAIT_LOG_EVERY: Duration = Duration::from_secs(30);

/// Why the daemon gave up waiting for instance metadata.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Metadata never answered within the wait.
    #[error(
        "instance metadata did not answer within {wait} (last: {last}): `lifeboat run` watches EC2 instance metadata and cannot run off EC2; use `lifeboat backup` there"
    )]
    NoMetadata {
        /// `watch.metadata_wait`, formatted.
        wait: String,
        /// The last failure.
        last: String,
    },
    /// Shutdown came first.
    #[error("stopped while waiting for instance metadata")]
    Stopped,
}

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
    /// The AWS account that owns the instance (instance identity document), or empty.
    #[serde(default)]
    pub account_id: String,
    /// The AWS partition (`aws`, `aws-cn`, `aws-us-gov`, …), or empty off EC2.
    #[serde(default)]
    pub partition: String,
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
            account_id: String::new(),
            partition: String::new(),
        }
    }

    /// The instance's ARN, `arn:PARTITION:ec2:REGION:ACCOUNT:instance/ID`: the value of the
    /// `ec2:SourceInstanceARN` condition key on requests signed with its instance-profile
    /// credentials. `None` off EC2 or when metadata did not say the account.
    pub fn instance_arn(&self) -> Option<String> {
        let known = |s: &str| !s.is_empty() && s != STANDALONE;
        (self.on_ec2
            && known(&self.account_id)
            && known(&self.region)
            && known(&self.partition)
            && self.instance_id.starts_with("i-"))
        .then(|| {
            format!(
                "arn:{}:ec2:{}:{}:instance/{}",
                self.partition, self.region, self.account_id, self.instance_id
            )
        })
    }

    /// Looks the identity up in instance metadata; `standalone` if that fails within about a
    /// second (off EC2, IMDS disabled, hop limit exceeded).
    pub async fn discover() -> Self {
        if std::env::var("AWS_EC2_METADATA_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        {
            return Self::standalone();
        }
        match tokio::time::timeout(LOOKUP_BUDGET, Self::from_imds(&client())).await {
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

    /// Asks instance metadata until it answers, for at most `wait` (the daemon at boot, when
    /// metadata may be briefly unavailable). The first failure is logged, then every 30 s; `tick`
    /// is called on every failed attempt (the daemon extends systemd's start timeout there).
    pub async fn wait_for(
        wait: Duration,
        shutdown: &CancellationToken,
        mut tick: impl FnMut(&str),
    ) -> Result<Self, IdentityError> {
        let start = Instant::now();
        let client = client();
        let mut attempt: u32 = 0;
        let mut logged: Option<Instant> = None;
        loop {
            let failure = match tokio::time::timeout(LOOKUP_BUDGET, Self::from_imds(&client)).await
            {
                Ok(Ok(id)) => {
                    if logged.is_some() {
                        tracing::info!(
                            waited_s = start.elapsed().as_secs(),
                            "instance metadata answers"
                        );
                    }
                    return Ok(id);
                }
                Ok(Err(e)) => crate::watch::describe(&e),
                Err(_) => "no answer within a second".to_owned(),
            };
            if start.elapsed() >= wait {
                return Err(IdentityError::NoMetadata {
                    wait: humantime::format_duration(wait).to_string(),
                    last: failure,
                });
            }
            if logged.is_none_or(|at| at.elapsed() >= WAIT_LOG_EVERY) {
                tracing::warn!(
                    error = %failure,
                    waited_s = start.elapsed().as_secs(),
                    wait_s = wait.as_secs(),
                    "waiting for instance metadata"
                );
                logged = Some(Instant::now());
            }
            tick(&failure);
            attempt += 1;
            let pause = Duration::from_millis(250)
                .saturating_mul(2u32.saturating_pow(attempt.min(8)))
                .min(WAIT_BACKOFF_CAP)
                .min(wait.saturating_sub(start.elapsed()));
            tokio::select! {
                () = shutdown.cancelled() => return Err(IdentityError::Stopped),
                () = tokio::time::sleep(pause) => {}
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
        // The partition is in metadata; older metadata services lack it, and the region says it.
        let partition = client
            .get("/latest/meta-data/services/partition")
            .await
            .map(String::from)
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| partition_of(&doc.region).to_owned());
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
            account_id: doc.account_id,
            partition,
        })
    }
}

/// How long asking Auto Scaling for the group may take.
const GROUP_BUDGET: Duration = Duration::from_secs(10);

impl InstanceIdentity {
    /// The group, when instance metadata did not say it: instance metadata tags are off by
    /// default on EC2, and without them an instance of a group would file its archives under
    /// `standalone/`, where no replacement looks. `hint` is the group a caller was told (the
    /// Run Command document's `--asg`), taken without a call; otherwise Auto Scaling is asked
    /// (DescribeAutoScalingInstances). Off EC2, or when metadata named the group, nothing
    /// changes; when Auto Scaling cannot answer, the instance stays `standalone` and says so.
    pub async fn find_group(
        &mut self,
        lifecycle: &crate::lifecycle::Lifecycle,
        hint: Option<&str>,
    ) {
        if !self.on_ec2 || self.group != STANDALONE || !self.instance_id.starts_with("i-") {
            return;
        }
        if let Some(group) = hint.filter(|g| !g.is_empty()) {
            self.group = group.to_owned();
            return;
        }
        match lifecycle
            .describe_instance(&self.instance_id, Instant::now() + GROUP_BUDGET)
            .await
        {
            Ok(Some((group, _))) => {
                tracing::info!(%group, "the Auto Scaling group, from Auto Scaling (instance metadata tags are off)");
                self.group = group;
            }
            Ok(None) => tracing::debug!("not in an Auto Scaling group"),
            Err(e) => tracing::warn!(
                error = %e,
                "instance metadata does not name the Auto Scaling group (tags off) and Auto Scaling \
                 did not answer: archives are filed under standalone/"
            ),
        }
    }
}

/// A metadata client that gives up fast: callers decide whether to try again.
fn client() -> ImdsClient {
    ImdsClient::builder()
        .max_attempts(1)
        .connect_timeout(Duration::from_millis(500))
        .read_timeout(Duration::from_millis(800))
        .build()
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct IdentityDocument {
    region: String,
    availability_zone: String,
    instance_type: String,
    account_id: String,
}

/// The partition a region belongs to, when metadata does not say.
fn partition_of(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else if region.starts_with("us-iso-") {
        "aws-iso"
    } else if region.starts_with("us-isob-") {
        "aws-iso-b"
    } else {
        "aws"
    }
}
