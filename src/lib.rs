//! lifeboat: saves an EC2 instance's data to S3 before Auto Scaling or Spot terminates it.
//!
//! The pipeline reads like the modules: [`archive`] walks and writes tar, [`compress`] wraps it,
//! [`upload`] streams it into S3, [`job`] ties them together with the manifest; [`catalog`],
//! [`verify`] and [`restore`] get data back. [`watch`] turns instance metadata into termination
//! notices, [`runner`] owns the termination story around the pipeline (single flight, the
//! [`deadline`], heartbeats and completion with [`lifecycle`] (Auto Scaling), the [`report`]
//! (SNS)), [`state`] records outcomes, and [`daemon`] is `lifeboat run`. [`cli`] parses the
//! command line, dispatches, prints, and maps outcomes to exit codes.

pub mod archive;
pub mod aws;
pub mod budget;
pub mod catalog;
pub mod cli;
pub mod compress;
pub mod config;
pub mod daemon;
pub mod deadline;
pub mod decompress;
pub mod doctor;
pub mod download;
pub mod identity;
pub mod job;
pub mod joblog;
pub mod json;
pub mod launch;
pub mod manifest;
pub mod memory;
pub mod prefetch;
pub mod progress;
pub mod prune;
pub mod restore;
pub mod runner;
pub mod source;
pub mod state;
pub mod upload;
pub mod verify;
pub mod watch;
pub mod zeros;

pub use lifeboat_common::{lifecycle, report};
