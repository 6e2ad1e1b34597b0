//! `bootstrap`: the companion Lambda's entry point for the `provided.al2023` runtime.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    lifeboat_lambda::run().await
}
