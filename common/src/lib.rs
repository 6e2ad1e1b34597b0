//! What the lifeboat agent and its companion Lambda share, kept in one place so they never drift:
//! [`lifecycle`] (Auto Scaling heartbeats and completion with their retry discipline), [`report`]
//! (the SNS report), [`event`] (the EventBridge events the Lambda consumes) and [`document`] (the
//! `lifeboat-backup` SSM document's parameters and the patterns that keep them shell-inert), and
//! [`sdk`] (SDK errors as text).
//!
//! It holds nothing of the archive pipeline, so the Lambda's binary stays small.

pub mod document;
pub mod event;
pub mod lifecycle;
pub mod report;
pub mod sdk;
