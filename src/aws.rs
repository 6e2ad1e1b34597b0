//! AWS SDK set-up shared by every command: the standard configuration chain (environment,
//! profile, IMDS), the region from instance metadata as a fallback, and path-style S3 addressing
//! when a custom endpoint (an S3-compatible store, a test server) is configured.

use std::time::Duration;

use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};

/// Loads the SDK configuration. The region: the environment, the profile, `region_hint` (the
/// instance identity, already read from metadata), then instance metadata itself.
pub async fn sdk_config(region_hint: Option<&str>) -> SdkConfig {
    let fallback = region_hint.map(|r| Region::new(r.to_owned()));
    let region = RegionProviderChain::first_try(
        aws_config::environment::region::EnvironmentVariableRegionProvider::new(),
    )
    .or_else(aws_config::profile::ProfileFileRegionProvider::builder().build())
    .or_else(fallback)
    .or_else(aws_config::imds::region::ImdsRegionProvider::builder().build());
    aws_config::defaults(BehaviorVersion::latest())
        .region(region)
        .load()
        .await
}

/// Whether a custom S3 endpoint is configured (then buckets are addressed path-style).
fn custom_s3_endpoint(conf: &SdkConfig) -> bool {
    conf.endpoint_url().is_some()
        || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some()
        || std::env::var_os("AWS_ENDPOINT_URL").is_some()
}

/// An S3 client for `conf`: each request retries (jittered backoff, five attempts) within
/// `retry_budget`, and no single attempt may hang for more than two minutes.
pub fn s3_client(conf: &SdkConfig, retry_budget: Duration) -> aws_sdk_s3::Client {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(retry_budget.min(Duration::from_secs(120)))
        .operation_timeout(retry_budget)
        .build();
    let s3 = aws_sdk_s3::config::Builder::from(conf)
        .force_path_style(custom_s3_endpoint(conf))
        .retry_config(RetryConfig::standard().with_max_attempts(5))
        .timeout_config(timeouts)
        .build();
    aws_sdk_s3::Client::from_conf(s3)
}

/// An Auto Scaling client for `conf`, without the SDK's retries: lifeboat's own loops
/// (`lifeboat_common::lifecycle`) retry within the deadline and pace by the throttling seen;
/// the SDK's three quick attempts under each of theirs would triple the throttled calls a
/// fleet spends of the account's shared bucket.
pub fn autoscaling_client(conf: &SdkConfig) -> aws_sdk_autoscaling::Client {
    let c = aws_sdk_autoscaling::config::Builder::from(conf)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(20))
                .build(),
        )
        .build();
    aws_sdk_autoscaling::Client::from_conf(c)
}

/// An SNS client for `conf`.
pub fn sns_client(conf: &SdkConfig) -> aws_sdk_sns::Client {
    let c = aws_sdk_sns::config::Builder::from(conf)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(10))
                .build(),
        )
        .build();
    aws_sdk_sns::Client::from_conf(c)
}
