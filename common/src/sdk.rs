//! AWS SDK errors as one line of text, and whether one is throttling, the same way for every
//! service client.

use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// `Code: message` from the service when it sent one, else the whole error chain (connection,
/// timeout, parse errors).
pub fn sdk_message<E>(err: &E) -> String
where
    E: ProvideErrorMetadata + std::error::Error,
{
    match (err.code(), err.message()) {
        (Some(code), Some(msg)) => format!("{code}: {msg}"),
        (Some(code), None) => code.to_owned(),
        _ => DisplayErrorContext(err).to_string(),
    }
}

/// Whether `err` is the service saying "too many requests" (rather than failing).
pub fn is_throttle(err: &impl ProvideErrorMetadata) -> bool {
    matches!(
        err.code(),
        Some("Throttling" | "ThrottlingException" | "RequestLimitExceeded")
    )
}
