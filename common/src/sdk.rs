//! AWS SDK errors as one line of text, and whether one is throttling, the same way for every
//! service client.

use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// `Code: message` from the service when it sent one; otherwise one sentence of what went wrong
/// on the way (connection, timeout, an unreadable answer) with the likely fix. The SDK's full
/// error (with its debug form) is logged at debug level (`LIFEBOAT_LOG=debug`, or `-v`).
pub fn sdk_message<E>(err: &E) -> String
where
    E: ProvideErrorMetadata + std::error::Error,
{
    match (err.code(), err.message()) {
        (Some(code), Some(msg)) => format!("{code}: {msg}"),
        (Some(code), None) => code.to_owned(),
        _ => {
            tracing::debug!(error = %DisplayErrorContext(err), "AWS SDK error in full");
            sentence(err)
        }
    }
}

/// The error chain's messages as one sentence: what kind of failure (its first message, in
/// words an operator acts on), the causes after it, and the likely fix.
fn sentence(err: &dyn std::error::Error) -> String {
    let mut messages: Vec<String> = Vec::new();
    let mut next: Option<&dyn std::error::Error> = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        // Wrappers repeat their cause's text; keep each message once.
        if !text.is_empty() && !messages.iter().any(|m| m.contains(&text)) {
            messages.push(text);
        }
        next = e.source();
    }
    let Some((first, causes)) = messages.split_first() else {
        return "unknown error".into();
    };
    let endpoint = std::env::var("AWS_ENDPOINT_URL")
        .map(|u| format!("the endpoint {u} (AWS_ENDPOINT_URL)"))
        .unwrap_or_else(|_| "the region's endpoint".into());
    let reach = format!(
        "check {endpoint} and the network route to it (VPC endpoint, NAT, security groups)"
    );
    let (what, fix) = match first.as_str() {
        "dispatch failure" => ("could not reach the service", reach.as_str()),
        "timeout" | "request has timed out" => (
            "the service did not answer in time",
            "check the network route, or retry",
        ),
        "response error" => (
            "the service's answer could not be read",
            "check that the endpoint is the service's (a proxy or another server answered)",
        ),
        "failed to construct request" => ("the request could not be built", ""),
        _ => (first.as_str(), ""),
    };
    let mut out = what.to_owned();
    // The innermost causes say the most ("Connection refused (os error 111)").
    let causes: Vec<&str> = causes
        .iter()
        .map(String::as_str)
        .filter(|c| !matches!(*c, "io error" | "other"))
        .collect();
    if !causes.is_empty() {
        out.push_str(" (");
        out.push_str(&causes.join(": "));
        out.push(')');
    }
    if !fix.is_empty() {
        out.push_str(": ");
        out.push_str(fix);
    }
    out
}

/// Whether `err` is the service saying "too many requests" (rather than failing).
pub fn is_throttle(err: &impl ProvideErrorMetadata) -> bool {
    matches!(
        err.code(),
        Some("Throttling" | "ThrottlingException" | "RequestLimitExceeded")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Chain(&'static str, Option<Box<Chain>>);

    impl std::fmt::Display for Chain {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Chain {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|c| c as _)
        }
    }

    fn chain(messages: &[&'static str]) -> Chain {
        messages
            .iter()
            .rev()
            .fold(None, |inner, m| Some(Chain(m, inner.map(Box::new))))
            .unwrap()
    }

    /// A connection failure reads as one sentence with its cause and fix, not the SDK's debug
    /// dump (`DispatchFailure(DispatchFailure { source: ConnectorError { kind: Io, …`).
    #[test]
    fn a_connection_failure_is_one_sentence_with_its_cause_and_fix() {
        let e = chain(&[
            "dispatch failure",
            "io error",
            "client error (Connect)",
            "tcp connect error",
            "Connection refused (os error 111)",
        ]);
        let s = sentence(&e);
        assert!(
            s.starts_with(
                "could not reach the service (client error (Connect): tcp connect error: \
                 Connection refused (os error 111)): check the "
            ) && s.ends_with("and the network route to it (VPC endpoint, NAT, security groups)"),
            "{s}"
        );
        assert!(!s.contains("DispatchFailure"));
        let t = sentence(&chain(&["timeout", "operation timed out after 5s"]));
        assert!(
            t.starts_with("the service did not answer in time (operation timed out"),
            "{t}"
        );
    }
}
