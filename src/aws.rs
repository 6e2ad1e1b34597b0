//! AWS SDK set-up shared by every command: the standard configuration chain (environment,
//! profile, IMDS), the region from instance metadata as a fallback, and path-style S3 addressing
//! when a custom endpoint (an S3-compatible store, a test server) is configured.

use std::time::Duration;

use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_runtime::auth::PayloadSigningOverride;
use aws_sdk_s3::config::interceptors::BeforeSerializationInterceptorContextRef;
use aws_sdk_s3::config::{ConfigBag, Intercept};

/// Why the SDK could not make an HTTPS client, if so: it reads the root certificates as
/// `rustls-native-certs` does (`SSL_CERT_FILE` / `SSL_CERT_DIR`, else the system's store) and
/// panics when there are none (a minimal root without `ca-certificates`), even for a plain-HTTP
/// endpoint. Checked before any client is built, so that lifeboat says what to install instead.
pub fn missing_trust_store() -> Option<String> {
    let found = rustls_native_certs::load_native_certs();
    if !found.certs.is_empty() {
        return None;
    }
    let why = found
        .errors
        .first()
        .map_or_else(|| "none found".to_owned(), ToString::to_string);
    Some(format!(
        "no root CA certificates ({why}): HTTPS to AWS cannot be checked, so no AWS call can be \
         made; install the ca-certificates package (the lifeboat packages depend on it), or point \
         SSL_CERT_FILE at a PEM bundle"
    ))
}

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

/// The S3 endpoint a client for `conf` uses, when one is configured (else AWS's, over HTTPS).
fn s3_endpoint(conf: &SdkConfig) -> Option<String> {
    std::env::var("AWS_ENDPOINT_URL_S3")
        .ok()
        .or_else(|| conf.endpoint_url().map(str::to_owned))
}

/// Whether SigV4's hash of each request body adds nothing: over HTTPS (AWS's endpoints, or a
/// custom `https://` one) TLS protects the body, and on loopback nothing is between the two
/// ends; every part and object also carries a CRC32C that S3 checks. The hash is a second
/// SHA-256 pass over every byte uploaded, on top of the manifest's (measured: 44% of the
/// agent's CPU samples with `compression = "none"`, 26% without it). A plain-HTTP endpoint
/// elsewhere keeps it.
fn payload_hash_adds_nothing(endpoint: Option<&str>) -> bool {
    let Some(url) = endpoint else {
        return true;
    };
    if url.starts_with("https://") {
        return true;
    }
    let host = url
        .strip_prefix("http://")
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default();
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Sends every request of the client with an unsigned payload (the per-request
/// `disable_payload_signing()`, for the whole client).
#[derive(Debug)]
struct UnsignedPayload;

impl Intercept for UnsignedPayload {
    fn name(&self) -> &'static str {
        "UnsignedPayload"
    }

    fn read_before_execution(
        &self,
        _context: &BeforeSerializationInterceptorContextRef<'_>,
        cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        cfg.interceptor_state()
            .store_put(PayloadSigningOverride::UnsignedPayload);
        Ok(())
    }
}

/// An S3 client for `conf`: each request retries (jittered backoff, five attempts) within
/// `retry_budget`, and no single attempt may hang for more than two minutes. Request bodies
/// are sent unsigned where [`payload_hash_adds_nothing`].
pub fn s3_client(conf: &SdkConfig, retry_budget: Duration) -> aws_sdk_s3::Client {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(retry_budget.min(Duration::from_secs(120)))
        .operation_timeout(retry_budget)
        .build();
    let mut s3 = aws_sdk_s3::config::Builder::from(conf)
        .force_path_style(custom_s3_endpoint(conf))
        .retry_config(RetryConfig::standard().with_max_attempts(5))
        .timeout_config(timeouts);
    if payload_hash_adds_nothing(s3_endpoint(conf).as_deref()) {
        s3 = s3.interceptor(UnsignedPayload);
    }
    aws_sdk_s3::Client::from_conf(s3.build())
}

/// Timeouts of a client whose calls are small: to connect, and for each attempt (seconds).
fn short_timeouts(connect: u64, attempt: u64) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(connect))
        .operation_attempt_timeout(Duration::from_secs(attempt))
        .build()
}

/// An Auto Scaling client for `conf`, without the SDK's retries: lifeboat's own loops
/// (`lifeboat_common::lifecycle`) retry within the deadline and pace by the throttling seen;
/// the SDK's three quick attempts under each of theirs would triple the throttled calls a
/// fleet spends of the account's shared bucket.
pub fn autoscaling_client(conf: &SdkConfig) -> aws_sdk_autoscaling::Client {
    let c = aws_sdk_autoscaling::config::Builder::from(conf)
        .retry_config(RetryConfig::disabled())
        .timeout_config(short_timeouts(5, 20))
        .build();
    aws_sdk_autoscaling::Client::from_conf(c)
}

/// An SSM client (the configuration in Parameter Store), with short timeouts: a boot must not
/// wait long for it when a cached copy will do.
pub fn ssm_client(conf: &SdkConfig) -> aws_sdk_ssm::Client {
    let c = aws_sdk_ssm::config::Builder::from(conf)
        .timeout_config(short_timeouts(3, 5))
        .build();
    aws_sdk_ssm::Client::from_conf(c)
}

/// An SNS client for `conf`.
pub fn sns_client(conf: &SdkConfig) -> aws_sdk_sns::Client {
    let c = aws_sdk_sns::config::Builder::from(conf)
        .timeout_config(short_timeouts(5, 10))
        .build();
    aws_sdk_sns::Client::from_conf(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_go_unsigned_over_https_and_on_loopback_only() {
        let yes = [
            None,
            Some("https://s3.example.com"),
            Some("https://10.0.0.5:9000/x"),
            Some("http://127.0.0.1:9000"),
            Some("http://localhost:4566"),
            Some("http://[::1]:9000"),
        ];
        for e in yes {
            assert!(payload_hash_adds_nothing(e), "{e:?}");
        }
        for e in [
            "http://10.0.0.5:9000",
            "http://minio.internal",
            "http://[fd00::1]:9000",
        ] {
            assert!(!payload_hash_adds_nothing(Some(e)), "{e}");
        }
    }
}
