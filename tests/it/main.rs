//! Integration tests: the built `lifeboat` binary against real S3 servers on loopback
//! (moto's server and s3s-fs), started by the test bench in `support`.

mod backup;
mod cli;
mod daemon;
mod deployment;
mod doctor;
mod failures;
mod fleet;
mod lambda;
mod launch;
mod packages;
mod restore;
mod support;
mod systemd;
mod termination;
mod upload;
