//! `lifeboat doctor`: run on an instance, checks everything a backup at termination depends on,
//! in the order a termination needs them, and prints a fix for each failure.
//!
//! Nothing is left behind: the bucket is probed with a multipart upload that is aborted at once;
//! the topic receives one message marked `status` = `test` (subscription filters can drop it).

use std::time::Duration;

use aws_sdk_sns::types::MessageAttributeValue;
use tokio::time::Instant;

use crate::archive::{self, ArchiveOptions};
use crate::config::{CompressionKind, Config};
use crate::identity::InstanceIdentity;
use crate::lifecycle::Hook;
use crate::runner::Services;
use crate::upload::{Destination, probe_write};

/// How a check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Works; what was found.
    Ok(String),
    /// Works, but something is worth changing: what, and how.
    Warn(String, String),
    /// Does not work: what failed, and the fix.
    Fail(String, String),
}

/// One check's name and outcome.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// How it went.
    pub outcome: Outcome,
}

/// The root certificates HTTPS to AWS is checked against ([`crate::aws::missing_trust_store`]).
fn trust_store() -> Check {
    Check {
        name: "trust store",
        outcome: match crate::aws::missing_trust_store() {
            None => Outcome::Ok("root CA certificates found".into()),
            Some(why) => {
                let (what, fix) = why.split_once("; ").unwrap_or((&why, ""));
                Outcome::Fail(what.to_owned(), fix.to_owned())
            }
        },
    }
}

/// A conservative archive rate per compression on a small instance, for the time estimate.
fn assumed_rate(kind: CompressionKind) -> u64 {
    match kind {
        CompressionKind::Gzip => 40 << 20,
        CompressionKind::Zstd | CompressionKind::None => 100 << 20,
    }
}

/// Runs every check.
pub async fn run(config: &Config) -> Vec<Check> {
    let mut checks = Vec::new();
    let trust = trust_store();
    if matches!(trust.outcome, Outcome::Fail(..)) {
        // The SDK cannot build a client without roots, not even instance metadata's: nothing
        // else can be checked.
        checks.push(trust);
        return checks;
    }
    checks.push(trust);
    let identity = InstanceIdentity::discover().await;
    let endpoint = std::env::var("AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .unwrap_or_else(|_| "http://169.254.169.254".into());
    checks.push(Check {
        name: "instance metadata (IMDSv2)",
        outcome: if identity.on_ec2 {
            match identity.instance_arn() {
                Some(_) => Outcome::Ok(format!(
                    "{} ({}) in {}",
                    identity.instance_id, identity.instance_type, identity.region,
                )),
                None => Outcome::Fail(
                    format!(
                        "{}: the instance identity document names no account, so archives would \
                         be filed under the bare instance id",
                        identity.instance_id
                    ),
                    "the per-instance IAM policy allows writing only under the instance ARN: \
                     check that /latest/dynamic/instance-identity/document answers"
                        .into(),
                ),
            }
        } else {
            Outcome::Fail(
                format!("no IMDSv2 answer from {endpoint}"),
                "on EC2, enable the metadata service with tokens: aws ec2 modify-instance-metadata-options \
                 --instance-id ID --http-endpoint enabled --http-tokens required; in a container, \
                 raise the hop limit: --http-put-response-hop-limit 2"
                    .into(),
            )
        },
    });

    let region = identity.on_ec2.then_some(identity.region.as_str());
    let conf = crate::aws::sdk_config(region).await;
    let credentials = match conf.credentials_provider() {
        None => Err("no credentials provider".to_owned()),
        Some(p) => {
            use aws_sdk_s3::config::ProvideCredentials;
            p.provide_credentials()
                .await
                .map_err(|e| aws_sdk_s3::error::DisplayErrorContext(&e).to_string())
        }
    };
    let have_credentials = credentials.is_ok();
    checks.push(Check {
        name: "credentials",
        outcome: match credentials {
            Ok(c) => Outcome::Ok(match c.expiry() {
                Some(t) => format!(
                    "temporary, valid for {}",
                    humantime::format_duration(Duration::from_secs(
                        t.duration_since(std::time::SystemTime::now())
                            .unwrap_or_default()
                            .as_secs()
                    ))
                ),
                None => "long-term keys (an instance profile is better)".into(),
            }),
            Err(e) => Outcome::Fail(
                e,
                if identity.on_ec2 {
                    "attach an instance profile whose role has /usr/share/lifeboat/iam/instance-policy.json"
                        .into()
                } else {
                    "off EC2 there is no instance profile: set AWS_PROFILE, or AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY, for a principal with the permissions of \
                     /usr/share/lifeboat/iam/instance-policy.json"
                        .into()
                },
            ),
        },
    });
    let hook = if have_credentials {
        aws_checks(config, &identity, &conf, &mut checks).await
    } else {
        // Every check that needs AWS says why it did not run; the local ones still run.
        for name in [
            "bucket writable under the prefix",
            "report topic",
            "group and terminate hook",
        ] {
            checks.push(Check {
                name,
                outcome: Outcome::Fail(
                    "skipped: no credentials".into(),
                    "fix the credentials first".into(),
                ),
            });
        }
        Err(("no credentials".into(), String::new()))
    };
    local_checks(config, &hook, &mut checks);
    checks
}

/// The checks against AWS: the bucket, the topic, the group and its hook (returned, for the
/// time check).
async fn aws_checks(
    config: &Config,
    identity: &InstanceIdentity,
    conf: &aws_config::SdkConfig,
    checks: &mut Vec<Check>,
) -> Result<(String, Hook), (String, String)> {
    let services = Services::from_sdk_config(conf, config);
    // The group as a backup finds it (from Auto Scaling when metadata tags are off).
    let mut identity = identity.clone();
    identity.find_group(&services.lifecycle, None).await;
    let identity = &identity;

    // Where this instance's archives go (the per-instance policy allows nothing else); not an
    // archive name, and only an upload, started and aborted, never an object.
    let key = format!(
        "{}.lifeboat-doctor",
        crate::manifest::owner_prefix(&config.s3.prefix, identity)
    );
    let dest = Destination::new(&config.s3, key, "application/octet-stream");
    checks.push(Check {
        name: "bucket writable under the prefix",
        outcome: match probe_write(&services.s3, &dest).await {
            Ok(()) => Outcome::Ok(format!(
                "s3://{}/{} (multipart upload started and aborted); archives go under {}",
                config.s3.bucket,
                config.s3.prefix,
                crate::manifest::owner_prefix(&config.s3.prefix, identity)
            )),
            Err(e) => {
                let text = e.to_string();
                let fix = if text.contains("NoSuchBucket") {
                    format!(
                        "create the bucket {} (packaging/cloudformation/lifeboat.yaml does) or fix s3.bucket",
                        config.s3.bucket
                    )
                } else if text.contains("AccessDenied") || text.contains("Forbidden") {
                    format!(
                        "allow s3:PutObject and s3:AbortMultipartUpload on \
                         arn:aws:s3:::{}/{}{}/${{ec2:SourceInstanceARN}}/* (packaging/iam/instance-policy.json; \
                         and kms:GenerateDataKey, kms:Decrypt on the key with sse = \"aws:kms\")",
                        config.s3.bucket,
                        config.s3.prefix,
                        crate::manifest::key_group(&identity.group)
                    )
                } else {
                    "check the S3 endpoint and network route (VPC endpoint or NAT)".into()
                };
                Outcome::Fail(text, fix)
            }
        },
    });

    checks.push(Check {
        name: "report topic",
        outcome: match &config.sns.topic_arn {
            None => Outcome::Warn(
                "no sns.topic_arn: outcomes are only logged on the instance, which is going away"
                    .into(),
                "set sns.topic_arn to the stack's TopicArn output".into(),
            ),
            Some(topic) => {
                let attr = MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value("test")
                    .build()
                    .expect("data type is set");
                let sent = services
                    .sns
                    .publish()
                    .topic_arn(topic)
                    .subject(format!(
                        "lifeboat doctor: test from {}",
                        identity.instance_id
                    ))
                    .message(format!(
                        "lifeboat doctor on {} can publish here.",
                        identity.instance_id
                    ))
                    .message_attributes("status", attr)
                    .send()
                    .await;
                match sent {
                    Ok(_) => Outcome::Ok(format!("{topic} (one test message, status=test)")),
                    Err(e) => Outcome::Fail(
                        crate::upload::sdk_message(&e),
                        format!("allow sns:Publish on {topic}, and check the topic exists"),
                    ),
                }
            }
        },
    });

    let until = Instant::now() + Duration::from_secs(20);
    let hook = if identity.on_ec2 {
        group_and_hook(config, &services.lifecycle, &identity.instance_id, until).await
    } else {
        Err((
            "skipped: the instance is unknown without instance metadata".into(),
            "fix instance metadata first".into(),
        ))
    };
    checks.push(Check {
        name: "group and terminate hook",
        outcome: match &hook {
            Ok((group, hook)) => Outcome::Ok(format!(
                "group {group}, hook {} (heartbeat timeout {} s, default result {})",
                hook.name,
                hook.heartbeat_timeout.as_secs(),
                hook.default_result
            )),
            Err((what, fix)) => Outcome::Fail(what.clone(), fix.clone()),
        },
    });
    hook
}

/// The checks that need no AWS call: how long the data takes against the hook (when known),
/// and the memory budget.
fn local_checks(
    config: &Config,
    hook: &Result<(String, Hook), (String, String)>,
    checks: &mut Vec<Check>,
) {
    let plan = archive::plan(&ArchiveOptions {
        paths: &config.backup.paths,
        exclude: &config.backup.exclude_set,
        one_file_system: config.backup.one_file_system,
    });
    let rate = assumed_rate(config.backup.compression);
    let estimate = Duration::from_secs(plan.bytes / rate + 1);
    let size = crate::progress::bytes(plan.bytes);
    let estimate_text = format!(
        "{size} in {} files: about {} at {} MiB/s",
        plan.files,
        humantime::format_duration(estimate),
        rate >> 20
    );
    checks.push(Check {
        name: "time for the data",
        outcome: match hook {
            Ok((_, hook)) if estimate > hook.global_timeout() => Outcome::Fail(
                format!(
                    "{estimate_text}; the hook holds an instance at most {} (100 x its heartbeat timeout, at most 48 h)",
                    humantime::format_duration(hook.global_timeout())
                ),
                "raise the hook's heartbeat timeout, or archive less (backup.paths, backup.exclude)"
                    .into(),
            ),
            _ if config.watch.spot && estimate > Duration::from_secs(100) => Outcome::Warn(
                format!("{estimate_text}; a Spot interruption gives two minutes"),
                "on Spot, expect a partial archive (cut at the deadline), or archive less".into(),
            ),
            _ => Outcome::Ok(estimate_text),
        },
    });
    checks.push(memory_budget(config));
}

/// How a backup on this instance divides `backup.memory_limit`, and whether explicit part
/// settings had to be capped to fit it.
fn memory_budget(config: &Config) -> Check {
    let workers = crate::compress::wanted_workers(config.backup.workers);
    let limit = bytesize::ByteSize::b(config.backup.memory_limit)
        .display()
        .iec();
    let outcome = match crate::budget::plan(config.budget_request(workers)) {
        Err(e) => Outcome::Fail(e.to_string(), "raise backup.memory_limit".into()),
        Ok(plan) => {
            let what = format!(
                "{limit}: {} compression workers, parts of {} MiB, up to {} in flight",
                plan.workers,
                plan.part_size >> 20,
                plan.parts_in_flight
            );
            match config.check_budget() {
                Ok(()) => Outcome::Ok(what),
                Err(e) => Outcome::Warn(
                    format!("{what} (capped: {e})"),
                    "set s3.part_size and s3.concurrency to \"auto\", or raise backup.memory_limit"
                        .into(),
                ),
            }
        }
    };
    Check {
        name: "memory budget",
        outcome,
    }
}

async fn group_and_hook(
    config: &Config,
    lifecycle: &crate::lifecycle::Lifecycle,
    instance_id: &str,
    until: Instant,
) -> Result<(String, Hook), (String, String)> {
    let permission =
        "allow autoscaling:DescribeAutoScalingInstances and autoscaling:DescribeLifecycleHooks";
    let group = match lifecycle.describe_instance(instance_id, until).await {
        Ok(Some((group, _state))) => group,
        Ok(None) => {
            return Err((
                format!("{instance_id} is not in an Auto Scaling group"),
                "lifeboat completes lifecycle actions of Auto Scaling groups; standalone instances \
                 are backed up only on Spot notices and by hand"
                    .into(),
            ));
        }
        Err(e) => return Err((e.to_string(), permission.into())),
    };
    match lifecycle
        .terminate_hook(
            &group,
            config.lifecycle.hook_name.as_deref(),
            instance_id,
            until,
        )
        .await
    {
        Ok(hook) => Ok((group, hook)),
        Err(e) => {
            let text = e.to_string();
            let fix = if text.contains("AccessDenied") {
                permission.into()
            } else {
                "add a terminate lifecycle hook (packaging/cloudformation/lifeboat.yaml does), or \
                 set lifecycle.hook_name to the one lifeboat owns"
                    .into()
            };
            Err((text, fix))
        }
    }
}

/// Prints the checks; returns whether none failed.
pub fn print(checks: &[Check]) -> bool {
    println!("lifeboat doctor");
    let mut ok = true;
    for c in checks {
        match &c.outcome {
            Outcome::Ok(what) => println!("  ok    {}: {what}", c.name),
            Outcome::Warn(what, fix) => {
                println!("  WARN  {}: {what}\n        fix: {fix}", c.name);
            }
            Outcome::Fail(what, fix) => {
                ok = false;
                println!("  FAIL  {}: {what}\n        fix: {fix}", c.name);
            }
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(s3: &str) -> Config {
        Config::parse(
            std::path::Path::new("/etc/lifeboat/lifeboat.toml"),
            &format!("[s3]\nbucket = \"b-1\"\n{s3}"),
        )
        .unwrap()
    }

    #[test]
    fn the_memory_budget_check_says_how_memory_is_divided_and_what_was_capped() {
        let check = memory_budget(&config(""));
        assert!(
            matches!(&check.outcome, Outcome::Ok(what) if what.starts_with("128.0 MiB: ")),
            "{check:?}"
        );
        let check = memory_budget(&config("part_size = \"64MiB\"\nconcurrency = 4\n"));
        assert!(
            matches!(&check.outcome, Outcome::Warn(what, fix)
                if what.contains("capped") && what.contains("s3.part_size") && fix.contains("auto")),
            "{check:?}"
        );
    }
}
