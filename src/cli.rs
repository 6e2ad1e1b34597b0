//! The command line: parses arguments, loads the configuration once, sets up logging, runs the
//! command and maps its outcome to a documented exit code.
//!
//! Exit codes (the SSM document and systemd rely on them):
//! - 0: success;
//! - 1: the operation failed (S3 unreachable, access denied, bucket missing, …);
//! - 2: usage or configuration error;
//! - 3: a check failed: `verify` found a mismatch, or `restore` refused the archive;
//! - 4: `backup --complete-lifecycle` stored the data but the lifecycle action was not completed
//!   as intended (no such hook, access denied, out of time): whoever runs it must step in; or
//!   `restore-on-launch` could not complete the launch action;
//! - 5: `run` found no instance metadata within `watch.metadata_wait` (systemd restarts it);
//! - 130 / 143: interrupted by SIGINT / SIGTERM (any upload was aborted; a lifecycle action is
//!   left pending).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::SystemTime;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::archive::{self, ArchiveOptions};
use crate::config::{self, Config};
use crate::identity::InstanceIdentity;
use crate::job::{JobResult, JobStatus};
use crate::progress::{self, Progress};
use crate::runner::{Runner, Services};
use crate::state::{self, StateFile};
use crate::watch::{NoticeSource, TerminationNotice};
use crate::{aws, catalog, daemon, manifest, restore, verify};

/// Success.
pub const EXIT_OK: u8 = 0;
/// The operation failed.
pub const EXIT_FAILED: u8 = 1;
/// Usage or configuration error.
pub const EXIT_USAGE: u8 = 2;
/// A check failed (verify mismatch, restore refusals).
pub const EXIT_CHECK: u8 = 3;
/// The data is stored but the lifecycle action was not completed as intended.
pub const EXIT_NOT_COMPLETED: u8 = 4;
/// No instance metadata within `watch.metadata_wait` (`run`, and `backup --complete-lifecycle`
/// without `--instance-id`).
pub const EXIT_NO_METADATA: u8 = 5;
/// Interrupted by SIGTERM when the signal is not ours to know (a daemon's job).
const EXIT_SIGTERM: u8 = 128 + 15;

/// lifeboat saves an EC2 instance's data to S3 before Auto Scaling or Spot terminates it.
#[derive(Debug, Parser)]
#[command(name = "lifeboat", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "LIFEBOAT_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// More log lines on stderr: -v info, -vv debug (an AWS error's full detail).
    /// `LIFEBOAT_LOG` overrides both.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,
    /// Errors only on stderr: no warnings, no progress bar.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Print the outcome as one JSON document on stdout (list, status, verify, backup, restore,
    /// doctor, config check): stable field names, listed in the README.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Watch for termination notices and save the data (the systemd service).
    Run,
    /// Archive the configured paths into S3 now.
    Backup {
        /// Why (part of the object key).
        #[arg(long, default_value = "manual")]
        reason: String,
        /// Print what would be archived, without reading files or uploading.
        #[arg(long)]
        dry_run: bool,
        /// Complete the Auto Scaling lifecycle action when the backup ends (the SSM document's
        /// entry point): CONTINUE on success, `lifecycle.on_failure` otherwise.
        #[arg(long, requires_all = ["hook", "asg"], conflicts_with = "dry_run")]
        complete_lifecycle: bool,
        /// The lifecycle hook (with --complete-lifecycle).
        #[arg(long, requires = "complete_lifecycle")]
        hook: Option<String>,
        /// The Auto Scaling group (with --complete-lifecycle).
        #[arg(long, requires = "complete_lifecycle")]
        asg: Option<String>,
        /// The lifecycle action token, when known; otherwise the action is completed by instance id.
        #[arg(long, requires = "complete_lifecycle")]
        token: Option<String>,
        /// The hook's heartbeat timeout in seconds, when the caller has just read it (the
        /// lifeboat-backup document passes it): lifeboat then does not describe the hook.
        #[arg(long, requires = "hook", value_parser = clap::value_parser!(u64).range(1..=9999))]
        heartbeat_timeout: Option<u64>,
        /// The lifecycle action began after this time (RFC 3339; the lifeboat-backup document
        /// passes its event's time): the first heartbeat can then wait as long as the hook
        /// allows, so a short backup needs none.
        #[arg(long, requires = "complete_lifecycle", value_parser = parse_rfc3339)]
        action_began_after: Option<SystemTime>,
        /// The instance (defaults to this one, from instance metadata).
        #[arg(long)]
        instance_id: Option<String>,
    },
    /// List backups in the bucket, newest first.
    List {
        /// Only this instance's backups.
        #[arg(long)]
        instance_id: Option<String>,
        /// Only this Auto Scaling group's backups (`standalone` for hosts outside a group).
        #[arg(long)]
        group: Option<String>,
        /// Only backups started at or after this time: RFC 3339 (`2026-11-27T08:00:00Z`), a
        /// date (`2026-11-27`, UTC midnight), or a duration ago (`36h`, `7d`).
        #[arg(long, value_parser = parse_since)]
        since: Option<time::OffsetDateTime>,
        /// At most this many, newest first.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Apply `[retention]` (keep_last, keep_within) to the archives, per instance: say what
    /// would be deleted, or delete it (with its manifest) with --apply. Every instance's newest
    /// complete archive is kept.
    Prune {
        /// Only this instance's backups.
        #[arg(long)]
        instance_id: Option<String>,
        /// Only this Auto Scaling group's backups.
        #[arg(long)]
        group: Option<String>,
        /// Delete (without it, prune only says what it would delete).
        #[arg(long)]
        apply: bool,
    },
    /// Download and extract a backup into a directory (never writing outside it).
    #[command(group(
        clap::ArgGroup::new("which")
            .required(true)
            .args(["key", "instance_id"])
    ))]
    Restore {
        /// The archive's key.
        #[arg(long)]
        key: Option<String>,
        /// Restore this instance's newest complete backup.
        #[arg(long)]
        instance_id: Option<String>,
        /// Accepted for scripts written against earlier versions; the newest is what
        /// --instance-id restores anyway.
        #[arg(long, requires = "instance_id", hide = true)]
        latest: bool,
        /// Target directory.
        #[arg(long)]
        to: PathBuf,
        /// Give files the owners recorded in the archive and keep their setuid/setgid bits (as
        /// GNU tar's --same-owner; needs root). Without it, files belong to whoever restores and
        /// set-id bits are dropped.
        #[arg(long)]
        same_owner: bool,
        /// Replace files that already exist in the target (directories are merged either way).
        #[arg(long)]
        overwrite: bool,
        /// Restore an archive that cannot be checked against a manifest (none, or unreadable).
        #[arg(long)]
        force_unverified: bool,
        /// An archive in GLACIER or DEEP_ARCHIVE: ask S3 to restore a readable copy for a day
        /// (Standard tier), then exit 1; run the command again once the copy is ready.
        #[arg(long)]
        request_restore: bool,
    },
    /// At an instance's launch, restore the newest complete archive of its group (`[restore]`:
    /// `on_launch`, `from`, `if_none`, `max_age`, `to`), verified first; once per instance.
    /// `lifeboat-restore.service` runs it at boot, before the units that need the data; the
    /// `lifeboat-restore` document runs it through Run Command on a launch event.
    RestoreOnLaunch {
        /// The launch hook whose action to complete (default: `restore.hook_name`, or the
        /// group's only launch hook). Given (as the document does), the action is completed
        /// even when `restore.on_launch` is off: CONTINUE, with nothing restored.
        #[arg(long, value_name = "NAME")]
        hook: Option<String>,
    },
    /// Check an archive against its manifest (SHA-256 and file list).
    Verify {
        /// The archive's key.
        #[arg(long)]
        key: String,
    },
    /// Show the daemon's state and last job.
    Status,
    /// Check, on an instance, everything a backup at termination needs (metadata, credentials,
    /// bucket, topic, group and hook, time for the data), with a fix for each failure.
    Doctor,
    /// Write the manual pages (lifeboat.1 and one per command) into a directory; the packages
    /// ship them.
    #[command(hide = true)]
    Manpage {
        /// Output directory.
        dir: PathBuf,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and print the effective values.
    Check,
    /// As `check`, and say where each value came from (the file or parameter, a
    /// `LIFEBOAT_<SECTION>_<KEY>` variable, or the default).
    Show,
}

/// Renders the manual pages from the same definitions as `--help`, so the two never differ.
fn manpage(dir: &Path) -> ExitCode {
    use clap::CommandFactory;
    use std::io::Write;
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| clap_mangen::generate_to(Cli::command().name("lifeboat"), dir))
        .and_then(|()| {
            // What --help cannot say: the environment, the files, the exit codes and the keys.
            let mut page = std::fs::OpenOptions::new()
                .append(true)
                .open(dir.join("lifeboat.1"))?;
            page.write_all(MANUAL_SECTIONS.as_bytes())?;
            page.write_all(b".SH CONFIGURATION\nEvery key, commented at its default (the packaged /etc/lifeboat/lifeboat.toml):\n.PP\n.nf\n")?;
            for line in include_str!("../packaging/lifeboat.toml").lines() {
                // roff: a leading dot or quote starts a request; backslashes escape.
                let line = line.replace('\\', "\\e");
                let line = if line.starts_with(['.', '\'']) {
                    format!("\\&{line}")
                } else {
                    line
                };
                writeln!(page, "{line}")?;
            }
            page.write_all(b".fi\n")
        });
    match written {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(e) => {
            eprintln!(
                "lifeboat: writing the manual pages into {}: {e}",
                dir.display()
            );
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// The sections `lifeboat.1` adds to what clap renders from `--help`.
const MANUAL_SECTIONS: &str = r#".SH ENVIRONMENT
.TP
\fBLIFEBOAT_CONFIG\fR
The configuration: a file, or \fBssm:\fINAME\fR for an SSM Parameter Store parameter (as \fB\-\-config\fR).
.TP
\fBLIFEBOAT_\fISECTION\fB_\fIKEY\fR
Overrides one key, e.g. \fBLIFEBOAT_S3_BUCKET\fR; the value is read as TOML, else as text. \fBlifeboat config show\fR says where each value came from.
.TP
\fBLIFEBOAT_LOG\fR
The log filter (\fBdebug\fR, \fBlifeboat=trace\fR, ...); overrides \fB\-v\fR and \fB\-q\fR.
.TP
\fBRUNTIME_DIRECTORY\fR, \fBSTATE_DIRECTORY\fR
Where the control socket and lock, and the state, cached configuration and launch record, are kept (systemd sets them).
.TP
\fBAWS_REGION\fR, \fBAWS_ENDPOINT_URL\fR, \fBAWS_EC2_METADATA_SERVICE_ENDPOINT\fR, ...
The AWS SDK's standard settings (credentials from the instance profile by default).
.TP
\fBSSL_CERT_FILE\fR, \fBSSL_CERT_DIR\fR
The root certificates HTTPS to AWS is checked against (else the system's, from the ca-certificates package).
.SH FILES
.TP
\fI/etc/lifeboat/lifeboat.toml\fR
The configuration (or one line, \fBsource = "ssm:\fINAME\fB"\fR, naming a parameter).
.TP
\fI/var/lib/lifeboat/state.json\fR
The daemon, the last notice and the last job, as \fBlifeboat status\fR shows them.
.TP
\fI/var/lib/lifeboat/config\-cache.toml\fR
The last configuration read from Parameter Store, for boots when SSM does not answer.
.TP
\fI/var/lib/lifeboat/restored\-on\-launch\fR
The record that this instance's launch restore is done.
.TP
\fI/run/lifeboat/control.sock\fR
The daemon's control socket (\fBbackup\fR and \fBstatus\fR ask the running daemon through it).
.TP
\fI/usr/share/lifeboat/\fR
The SSM documents, IAM policies and CloudFormation template.
.SH EXIT STATUS
.TP
\fB0\fR
Success.
.TP
\fB1\fR
The operation failed (S3 unreachable, access denied, no root certificates, ...); any upload was aborted.
.TP
\fB2\fR
Usage or configuration error: the message names the file or parameter, the key and the problem.
.TP
\fB3\fR
A check failed: \fBverify\fR found a mismatch, \fBrestore\fR refused the archive, or \fBdoctor\fR found a problem.
.TP
\fB4\fR
The data is stored but the lifecycle action was not completed as intended.
.TP
\fB5\fR
No instance metadata within \fBwatch.metadata_wait\fR.
.TP
\fB130\fR, \fB143\fR
Interrupted by SIGINT or SIGTERM: nothing stored, any lifecycle action left pending.
"#;

/// The signal that interrupted the command (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Entry point of the binary.
pub fn main() -> ExitCode {
    crate::memory::bound_large_blocks();
    let cli = Cli::parse();
    if let Command::Manpage { dir } = &cli.command {
        return manpage(dir);
    }
    init_logging(matches!(cli.command, Command::Run), cli.verbose, cli.quiet);
    crate::json::set(cli.json);
    progress::set_quiet(cli.quiet);
    // `status` reads the daemon's socket or its state file, not the configuration: it answers
    // on an instance whose configuration is incomplete or broken, where it is most wanted.
    if matches!(cli.command, Command::Status) {
        return match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => ExitCode::from(finish(rt.block_on(status()))),
            Err(e) => {
                eprintln!("lifeboat: cannot start the async runtime: {e}");
                ExitCode::from(EXIT_FAILED)
            }
        };
    }
    let source = crate::source::ConfigSource::from_arg(&cli.config).resolve();
    // Every command from here on may build an AWS client (reading the configuration from
    // Parameter Store is one), which the SDK cannot do without root certificates (it panics):
    // say what to install instead. Doctor reports it as a check.
    let needs_aws = !matches!(
        cli.command,
        Command::Doctor
            | Command::Status
            | Command::Backup { dry_run: true, .. }
            | Command::Config { .. }
    ) || matches!(source, crate::source::ConfigSource::Parameter(_));
    if needs_aws && let Some(why) = crate::aws::missing_trust_store() {
        eprintln!("lifeboat: {why}");
        return ExitCode::from(EXIT_FAILED);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lifeboat")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lifeboat: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let loaded = match runtime.block_on(source.load()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("lifeboat: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Command::Config { command } = &cli.command {
        let show = matches!(command, ConfigCommand::Show);
        return ExitCode::from(config_check(&loaded, show));
    }
    let config = loaded.config.clone();
    let code = match cli.command {
        Command::Run => finish(runtime.block_on(run(source, loaded))),
        command => runtime.block_on(dispatch(command, config)),
    };
    // Part uploads are aborted or finished by now; do not wait for idle connection tasks.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    ExitCode::from(code)
}

/// `config check` / `config show`: validates and prints the effective configuration (with
/// `show`, where each value came from); its exit code.
fn config_check(loaded: &crate::source::Loaded, show: bool) -> u8 {
    let config = &loaded.config;
    let json = crate::json::wanted();
    // Parts a backup would cap to fit the memory limit are a mistake to fix here.
    if let Err(e) = config.check_budget() {
        eprintln!("lifeboat: {e}");
        return EXIT_USAGE;
    }
    if loaded.cached {
        eprintln!(
            "lifeboat: warning: {} could not be read: this is the cached copy ({})",
            config.source.display(),
            crate::source::ConfigSource::cache_path().display()
        );
    }
    if !json {
        println!("# effective configuration from {}", config.source.display());
    }
    for (inner, outer) in config.backup.overlaps() {
        let note = format!(
            "# note: backup.paths: {} is inside {}: archived once, as its own path (the walk of {} leaves it out, so it is archived even on another file system)",
            inner.display(),
            outer.display(),
            outer.display()
        );
        if json {
            eprintln!("{note}");
        } else {
            println!("{note}");
        }
    }
    // A path that is not there yet may appear later (an application's data directory created
    // at its first start): a word, not a refusal.
    for p in &config.backup.paths {
        if std::fs::symlink_metadata(p).is_err() {
            eprintln!(
                "lifeboat: warning: backup.paths: {} does not exist (now): nothing is archived from it until it does",
                p.display()
            );
        }
    }
    // Where each value came from: the source, an environment variable, or the default.
    let origin = |o: &String| {
        if o == "source" {
            config.source.display().to_string()
        } else {
            format!("environment {o}")
        }
    };
    if json {
        let origins: serde_json::Map<String, serde_json::Value> = config
            .origins
            .iter()
            .map(|(k, o)| (k.clone(), origin(o).into()))
            .collect();
        crate::json::print(&serde_json::json!({
            "source": config.source.display().to_string(),
            "version": loaded.version,
            "cached": loaded.cached,
            "config": config.to_json(),
            "origins": origins,
        }));
    } else {
        print!("{}", config.to_toml());
        if show {
            println!("\n# where the values came from (every other key has its default):");
            for (key, o) in &config.origins {
                println!("#   {key}: {}", origin(o));
            }
        }
    }
    EXIT_OK
}

/// Logs: structured fields to journald when systemd connected stderr to the journal, readable
/// text on stderr otherwise. `LIFEBOAT_LOG` sets the filter (`debug`, `lifeboat=trace`, …).
fn init_logging(daemon: bool, verbose: u8, quiet: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::prelude::*;
    let default = match (verbose, quiet) {
        (0, true) => "error",
        (0, false) if daemon => "info",
        (0, false) => "warn",
        (1, _) => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_env("LIFEBOAT_LOG").unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{default},aws_config=error,aws_smithy_runtime=warn"
        ))
    });
    let journal = std::env::var_os("JOURNAL_STREAM")
        .and_then(|_| tracing_journald::layer().ok())
        .map(|l| l.with_syslog_identifier("lifeboat".into()));
    // The job log collects lifeboat's info lines whatever the filter shows (src/joblog.rs).
    let joblog = crate::joblog::layer().with_filter(tracing_subscriber::filter::filter_fn(|m| {
        *m.level() <= tracing::Level::INFO && m.target().starts_with("lifeboat")
    }));
    match journal {
        Some(layer) => tracing_subscriber::registry()
            .with(joblog)
            .with(layer.with_filter(filter))
            .init(),
        None => tracing_subscriber::registry()
            .with(joblog)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_target(false)
                    .with_filter(filter),
            )
            .init(),
    }
}

async fn dispatch(command: Command, config: Config) -> u8 {
    let result = match command {
        Command::Run => unreachable!("run is started by main with its configuration source"),
        Command::Status => status().await,
        Command::Doctor => {
            let checks = crate::doctor::run(&config).await;
            let all_ok = if crate::json::wanted() {
                let doc = crate::json::doctor(&checks);
                crate::json::print(&doc);
                doc["ok"] == true
            } else {
                crate::doctor::print(&checks)
            };
            Ok(if all_ok { EXIT_OK } else { EXIT_CHECK })
        }
        Command::Backup {
            reason,
            dry_run: true,
            ..
        } => dry_run(&config, &reason),
        Command::Backup {
            reason,
            dry_run: false,
            complete_lifecycle,
            hook,
            asg,
            token,
            heartbeat_timeout,
            action_began_after,
            instance_id,
        } => {
            let notice = TerminationNotice {
                source: NoticeSource::Command,
                reason,
                group: asg,
                hook,
                token,
                deadline: None,
                complete_lifecycle,
                action_began_after,
                hook_heartbeat_timeout_s: heartbeat_timeout,
            };
            backup(config, notice, instance_id).await
        }
        Command::List {
            instance_id,
            group,
            since,
            limit,
        } => {
            let filter = catalog::ListFilter {
                instance_id,
                group,
                since,
                limit,
            };
            list(&config, &filter).await
        }
        Command::Restore {
            key,
            instance_id,
            to,
            latest: _,
            same_owner,
            overwrite,
            force_unverified,
            request_restore,
        } => {
            let flags = RestoreFlags {
                same_owner,
                keep_set_id: same_owner,
                routes: None,
                overwrite,
                force_unverified,
                chosen: false,
                request_restore,
            };
            let s3 = s3_client(&config).await;
            restore(&config, &s3, key, instance_id, to, flags).await
        }
        Command::RestoreOnLaunch { hook } => restore_on_launch(&config, hook).await,
        Command::Prune {
            instance_id,
            group,
            apply,
        } => {
            let filter = catalog::ListFilter {
                instance_id,
                group,
                ..catalog::ListFilter::default()
            };
            prune(&config, &filter, apply).await
        }
        Command::Verify { key } => verify(&config, &key).await,
        Command::Config { .. } | Command::Manpage { .. } => {
            unreachable!("handled before the runtime starts")
        }
    };
    finish(result)
}

/// A command's exit code; a failure is printed first.
fn finish(result: Result<u8, Failure>) -> u8 {
    match result {
        Ok(code) => code,
        Err(f) => {
            eprintln!("lifeboat: {:#}", f.error);
            f.code
        }
    }
}

/// An error with the exit code it maps to.
struct Failure {
    error: anyhow::Error,
    code: u8,
}

impl Failure {
    fn usage(msg: &str) -> Self {
        Self {
            error: anyhow::anyhow!("{msg}"),
            code: EXIT_USAGE,
        }
    }
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Self {
            error: e.into(),
            code: EXIT_FAILED,
        }
    }
}

fn dry_run(config: &Config, reason: &str) -> Result<u8, Failure> {
    let plan = archive::plan(&ArchiveOptions {
        paths: &config.backup.paths,
        exclude: &config.backup.exclude_set,
        one_file_system: config.backup.one_file_system,
    });
    println!("dry run ({reason}): nothing is read or uploaded");
    for p in &config.backup.paths {
        println!("  path {}", p.display());
    }
    println!(
        "would archive {} files ({}), {} directories, {} symlinks, {} hard links",
        plan.files,
        progress::bytes(plan.bytes),
        plan.dirs,
        plan.symlinks,
        plan.hardlinks
    );
    println!(
        "compression {} level {}, to s3://{}/{}",
        config.backup.compression.name(),
        config.backup.level,
        config.s3.bucket,
        config.s3.prefix
    );
    println!("would skip {}", plan.skipped.len());
    for s in &plan.skipped {
        println!("  skip {} ({})", s.path.path, s.reason);
    }
    Ok(EXIT_OK)
}

/// Cancels `token` on SIGINT or SIGTERM and remembers which; a second signal ends the process at
/// once (the first one's clean-up is taking too long for whoever sent it).
fn cancel_on_signals(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        let signo = tokio::select! {
            _ = int.recv() => 2,
            _ = term.recv() => 15,
        };
        SIGNAL.store(signo, Ordering::SeqCst);
        tracing::info!(signal = signo, "interrupted");
        token.cancel();
        let again = tokio::select! {
            _ = int.recv() => 2,
            _ = term.recv() => 15,
        };
        eprintln!("lifeboat: interrupted again; exiting now");
        std::process::exit(128 + again);
    });
}

async fn s3_client(config: &Config) -> aws_sdk_s3::Client {
    aws::s3_client(&aws::sdk_config(None).await, config.s3.retry_budget)
}

async fn run(
    source: crate::source::ConfigSource,
    mut loaded: crate::source::Loaded,
) -> Result<u8, Failure> {
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    if loaded.cached {
        tracing::warn!(source = %source.label().display(), "starting with the cached copy of the configuration; Parameter Store is read again every watch.config_poll");
    }
    loop {
        let config = loaded.config.clone();
        if let Err(e) = config.check_budget() {
            tracing::warn!("{e}; backups cap them to fit");
        }
        let reload = daemon::Reload {
            source: source.clone(),
            text: loaded.text.clone(),
            version: loaded.version.clone(),
        };
        match daemon::run(Arc::new(config), shutdown.clone(), reload).await {
            Ok(daemon::Ended::Stopped) => return Ok(EXIT_OK),
            Ok(daemon::Ended::Reload(new)) => {
                tracing::info!(version = %new.version, "running with the new configuration");
                loaded = *new;
            }
            Err(e) => {
                let code = match e.downcast_ref::<daemon::DaemonError>() {
                    Some(daemon::DaemonError::NoMetadata(
                        crate::identity::IdentityError::Stopped,
                    )) => {
                        return Ok(EXIT_OK);
                    }
                    Some(daemon::DaemonError::NoMetadata(_)) => EXIT_NO_METADATA,
                    Some(daemon::DaemonError::Socket { .. }) => EXIT_USAGE,
                    None => EXIT_FAILED,
                };
                return Err(Failure { error: e, code });
            }
        }
    }
}

async fn status() -> Result<u8, Failure> {
    let socket = state::control_socket();
    let live = match daemon::ask(&socket, &daemon::Request::Status, |_| {}).await {
        Some(Ok(daemon::Reply::Status {
            state,
            job_running,
            job,
        })) => Some((*state, job_running, job)),
        _ => None,
    };
    let (state, running, job) = match live {
        Some((s, running, job)) => (s, Some(running), job),
        None => (
            StateFile::read(&state::state_dir().join("state.json")).unwrap_or_default(),
            None,
            None,
        ),
    };
    if crate::json::wanted() {
        crate::json::print(&serde_json::json!({
            "daemon_running": running.is_some(),
            "job_running": running.unwrap_or(false),
            "job": job,
            "daemon": state.daemon,
            "last_notice": state.last_notice,
            "last_job": state.last_job,
        }));
        return Ok(EXIT_OK);
    }
    match (&state.daemon, running) {
        (Some(d), Some(_)) => {
            println!(
                "daemon: running (pid {}, since {}) on {}",
                d.pid, d.started_at, d.instance_id
            );
            println!("watching: {}", d.sources.join(", "));
            if !d.config.is_empty() {
                println!("configuration: {}", d.config);
            }
            match &job {
                Some(p) => println!("job: {}", p.line()),
                None => println!("job: none running"),
            }
        }
        (Some(d), None) => println!(
            "daemon: not running (last: pid {}, {} since {})",
            d.pid, d.state, d.started_at
        ),
        (None, _) => println!("daemon: not running"),
    }
    match &state.last_notice {
        Some(n) => println!(
            "last notice: {} ({:?}) at {}",
            n.notice.reason,
            n.notice.source,
            crate::manifest::rfc3339(n.at)
        ),
        None => println!("last notice: none"),
    }
    match &state.last_job {
        Some(j) => {
            println!(
                "last job: {:?}, {} files, {} stored, finished {}",
                j.status,
                j.file_count,
                progress::bytes(j.bytes_stored),
                crate::manifest::rfc3339(j.finished_at)
            );
            if let Some(url) = &j.object_url {
                println!("  archive: {url}");
            }
            if let Some(l) = &j.lifecycle {
                println!("  lifecycle: {l}");
            }
            if let Some(e) = &j.error {
                println!("  error: {e}");
            }
        }
        None => println!("last job: none"),
    }
    Ok(EXIT_OK)
}

async fn backup(
    config: Config,
    notice: TerminationNotice,
    instance_id: Option<String>,
) -> Result<u8, Failure> {
    // A running daemon owns the job: join it there.
    let socket = state::control_socket();
    let request = daemon::Request::Backup(notice.clone());
    let bar = progress::Bar::new();
    let asked = daemon::ask(&socket, &request, |reply| {
        if let daemon::Reply::Progress {
            bytes_read,
            entries,
            job,
        } = reply
        {
            match job {
                Some(job) => bar.show(job),
                None => bar.show_counts(*bytes_read, *entries),
            }
        }
    })
    .await;
    bar.finish();
    if let Some(reply) = asked {
        return match reply {
            Ok(daemon::Reply::Result(r)) => Ok(print_result(&r)),
            Ok(other) => Err(anyhow::anyhow!("unexpected reply from the daemon: {other:?}").into()),
            Err(e) => Err(anyhow::Error::new(e)
                .context(format!("talking to the daemon at {}", socket.display()))
                .into()),
        };
    }
    // No daemon: run the job here, one at a time across processes.
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    let mut identity = if notice.complete_lifecycle && instance_id.is_none() {
        // Completing a lifecycle action by instance id needs this instance's id: wait for
        // metadata (a blip at boot, a scale-in of a thousand asking at once) rather than back up
        // and complete as "standalone", which would file the archive under the wrong name and
        // leave the real action to time out.
        match InstanceIdentity::wait_for(config.watch.metadata_wait, &cancel, |_| {}).await {
            Ok(identity) => identity,
            Err(e) => {
                return Err(Failure {
                    error: anyhow::Error::new(e).context(
                        "--complete-lifecycle without --instance-id needs this instance's id \
                         from instance metadata",
                    ),
                    code: EXIT_NO_METADATA,
                });
            }
        }
    } else {
        InstanceIdentity::discover().await
    };
    // Off EC2 (or without metadata) the command line names the instance and its group.
    if !identity.on_ec2 {
        if let Some(id) = instance_id {
            identity.instance_id = id;
        }
        if let Some(group) = &notice.group {
            identity.group = group.clone();
        }
    }
    let region = identity.on_ec2.then_some(identity.region.as_str());
    let services = Services::connect(&config, region).await;
    identity
        .find_group(&services.lifecycle, notice.group.as_deref())
        .await;
    let state_file = Arc::new(StateFile::open(&state::state_dir()));
    let runner = Runner::new(Arc::new(config), identity, services, state_file, cancel);
    let progress = {
        let runner = Arc::clone(&runner);
        Progress::start(move || runner.job_progress())
    };
    let result = runner.submit_exclusive(notice).await;
    progress.stop();
    Ok(print_result(&result))
}

/// Prints a job's result (stdout for what was stored, stderr for what failed); its exit code.
fn print_result(r: &JobResult) -> u8 {
    if crate::json::wanted() {
        crate::json::print(r);
    } else if let Some(url) = &r.object_url {
        println!("stored {url}");
        println!(
            "  {} files, {} read, {} stored, {} skipped, {} changed while read{}",
            r.file_count,
            progress::bytes(r.bytes_read),
            progress::bytes(r.bytes_stored),
            r.skipped,
            r.changed,
            if r.status == JobStatus::Partial {
                ", PARTIAL (deadline)"
            } else {
                ""
            }
        );
        let secs = r.duration_seconds.max(0.001);
        println!(
            "  {:.2} s, {}/s",
            secs,
            progress::bytes((r.bytes_read as f64 / secs) as u64)
        );
    }
    if let Some(l) = r.lifecycle.as_ref().filter(|_| !crate::json::wanted()) {
        println!("  lifecycle action: {l}");
    }
    let code = exit_code(r);
    match r.status {
        JobStatus::Succeeded | JobStatus::Partial => {}
        JobStatus::Interrupted => eprintln!(
            "lifeboat: backup interrupted; the upload was aborted and nothing was stored{}",
            if r.lifecycle.is_some() {
                "; the lifecycle action is left pending"
            } else {
                ""
            }
        ),
        JobStatus::Failed => eprintln!(
            "lifeboat: backup failed: {}",
            r.error.as_deref().unwrap_or("unknown error")
        ),
    }
    if code == EXIT_NOT_COMPLETED {
        eprintln!(
            "lifeboat: the data is stored but the lifecycle action was {}",
            r.lifecycle
                .as_ref()
                .map_or_else(String::new, ToString::to_string)
        );
    }
    code
}

/// The exit code of a job's result: the only place outcomes become exit codes.
fn exit_code(r: &JobResult) -> u8 {
    match r.status {
        JobStatus::Interrupted => match SIGNAL.load(Ordering::SeqCst) {
            0 => EXIT_SIGTERM,
            signo => 128 + signo as u8,
        },
        JobStatus::Failed => EXIT_FAILED,
        JobStatus::Succeeded | JobStatus::Partial => {
            if r.lifecycle.as_ref().is_some_and(|l| !l.settled()) {
                EXIT_NOT_COMPLETED
            } else {
                EXIT_OK
            }
        }
    }
}

/// `--action-began-after`: an RFC 3339 time.
fn parse_rfc3339(v: &str) -> Result<SystemTime, String> {
    time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
        .map(SystemTime::from)
        .map_err(|e| format!("{v:?} is not an RFC 3339 time (2026-11-27T08:00:00Z): {e}"))
}

/// `--since`: RFC 3339, a date (UTC midnight), or a duration ago.
fn parse_since(v: &str) -> Result<time::OffsetDateTime, String> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(v, &Rfc3339) {
        return Ok(t);
    }
    if let Ok(d) = time::Date::parse(v, time::macros::format_description!("[year]-[month]-[day]")) {
        return Ok(d.midnight().assume_utc());
    }
    match humantime::parse_duration(v) {
        Ok(ago) => Ok(time::OffsetDateTime::now_utc() - ago),
        Err(_) => Err(format!(
            "{v:?} is not a time (2026-11-27T08:00:00Z), a date (2026-11-27) or a duration ago (36h)"
        )),
    }
}

async fn list(config: &Config, filter: &catalog::ListFilter) -> Result<u8, Failure> {
    let s3 = s3_client(config).await;
    let entries = catalog::list(&s3, &config.s3, filter).await?;
    if crate::json::wanted() {
        crate::json::print(&crate::json::list(
            &config.s3.bucket,
            &config.s3.prefix,
            &entries,
        ));
        return Ok(EXIT_OK);
    }
    if entries.is_empty() {
        eprintln!(
            "no backups under s3://{}/{}",
            config.s3.bucket, config.s3.prefix
        );
        return Ok(EXIT_OK);
    }
    println!(
        "{:<20} {:<12} {:>10}  {:<16} {:<20} KEY",
        "TIME", "STATUS", "SIZE", "REASON", "INSTANCE"
    );
    for e in entries {
        let (time, reason) = manifest::name_parts(&e.name).unzip();
        println!(
            "{:<20} {:<12} {:>10}  {:<16} {:<20} {}",
            time.map(manifest::rfc3339).unwrap_or_default(),
            e.status.name(),
            progress::bytes(e.size),
            reason.unwrap_or_default(),
            e.instance_id,
            e.key
        );
    }
    Ok(EXIT_OK)
}

async fn prune(config: &Config, filter: &catalog::ListFilter, apply: bool) -> Result<u8, Failure> {
    use crate::prune::{PruneError, Verdict};
    let s3 = s3_client(config).await;
    let plan = crate::prune::plan(&s3, &config.s3, &config.retention, filter, &config.source)
        .await
        .map_err(|e| Failure {
            code: if matches!(e, PruneError::NoRules { .. }) {
                EXIT_USAGE
            } else {
                EXIT_FAILED
            },
            error: e.into(),
        })?;
    let doomed: Vec<String> = plan
        .iter()
        .filter(|(_, v)| *v == Verdict::Delete)
        .map(|(e, _)| e.key.clone())
        .collect();
    for (e, verdict) in &plan {
        match verdict {
            Verdict::Keep(why) => println!("keep    {:<12} {} ({why})", e.status.name(), e.key),
            Verdict::Delete if apply => println!("delete  {:<12} {}", e.status.name(), e.key),
            Verdict::Delete => println!("would delete  {:<12} {}", e.status.name(), e.key),
        }
    }
    if !apply {
        println!(
            "{} of {} archives would be deleted (with their manifests); run with --apply to delete them",
            doomed.len(),
            plan.len()
        );
        return Ok(EXIT_OK);
    }
    crate::prune::delete(&s3, &config.s3, &doomed)
        .await
        .map_err(|e| Failure {
            error: e.into(),
            code: EXIT_FAILED,
        })?;
    println!(
        "deleted {} of {} archives (with their manifests)",
        doomed.len(),
        plan.len()
    );
    Ok(EXIT_OK)
}

async fn verify(config: &Config, key: &str) -> Result<u8, Failure> {
    let s3 = s3_client(config).await;
    let manifest: manifest::Manifest = catalog::manifest(&s3, &config.s3, key).await?;
    let compression = manifest::compression_of(key).context("unknown archive suffix")?;
    let (reader, _) = catalog::open_archive(&s3, &config.s3, key).await?;
    let report = tokio::task::spawn_blocking(move || {
        let r = verify::verify(reader, compression, &manifest);
        (r, manifest)
    })
    .await
    .context("the verify thread failed")?;
    let (report, manifest) = report;
    if crate::json::wanted() {
        crate::json::print(&serde_json::json!({
            "key": key,
            "ok": report.ok(),
            "entries": report.entries,
            "bytes": report.bytes,
            "sha256": report.sha256,
            "partial": manifest.partial,
            "problems": report.problems,
        }));
        return Ok(if report.ok() { EXIT_OK } else { EXIT_CHECK });
    }
    if report.ok() {
        println!(
            "OK s3://{}/{}: {} entries match the manifest, SHA-256 {}",
            config.s3.bucket, key, report.entries, report.sha256
        );
        if manifest.partial {
            println!("  note: this backup is partial (cut short by its deadline)");
        }
        Ok(EXIT_OK)
    } else {
        println!("FAILED s3://{}/{}:", config.s3.bucket, key);
        for p in &report.problems {
            println!("  {p}");
        }
        Ok(EXIT_CHECK)
    }
}

/// `restore`'s switches.
struct RestoreFlags {
    same_owner: bool,
    /// Setuid and setgid bits as archived (with `same_owner`).
    keep_set_id: bool,
    /// Restore only these archived paths, each to its place; `None`: everything into `to`.
    routes: Option<Vec<restore::Route>>,
    overwrite: bool,
    force_unverified: bool,
    /// Chosen from a listing (not named by an operator): a manifest that disagrees with the
    /// key's instance refuses the archive.
    chosen: bool,
    /// Ask S3 to restore an archive that is in an archive tier.
    request_restore: bool,
}

/// `restore-on-launch`: see [`crate::launch`].
async fn restore_on_launch(config: &Config, hook: Option<String>) -> Result<u8, Failure> {
    use crate::lifecycle::LifecycleResult;
    let cfg = &config.restore;
    if !cfg.on_launch {
        println!(
            "restore.on_launch is off in {}: nothing to restore",
            config.source.display()
        );
        // Asked for a hook (the Run Command path): its action must not wait for a timeout.
        if hook.is_none() {
            return Ok(EXIT_OK);
        }
    }
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    // The group and zone come from instance metadata: wait for it (a blip at boot) rather than
    // restore nothing, or another group's data.
    let mut identity = InstanceIdentity::wait_for(config.watch.metadata_wait, &cancel, |_| {})
        .await
        .map_err(|e| Failure {
            error: anyhow::Error::new(e)
                .context("restore on launch needs this instance's group from instance metadata"),
            code: EXIT_NO_METADATA,
        })?;
    let services = Services::connect(config, Some(&identity.region)).await;
    identity.find_group(&services.lifecycle, None).await;
    // A launch hook holds the instance in Pending:Wait while the data comes back.
    let held = crate::launch::held_by_hook(
        &services.lifecycle,
        &identity.instance_id,
        hook.as_deref().or(cfg.hook_name.as_deref()),
    )
    .await
    .map_err(|e| Failure {
        error: e.into(),
        code: EXIT_FAILED,
    })?;
    let beating = held.as_ref().map(|(action, hook)| {
        println!(
            "instance {} waits in Pending:Wait on launch hook {} of group {}",
            action.instance_id, action.hook, action.group
        );
        crate::launch::keep_alive(services.lifecycle.clone(), action.clone(), hook)
    });
    let outcome = if cfg.on_launch {
        launch_restore(config, &identity, &services.s3).await
    } else {
        Ok(LaunchOutcome::Off)
    };
    if let Some(beat) = beating {
        beat.abort();
    }
    // The launch action, when a hook holds the instance: CONTINUE once the data is in place
    // (or there was none to restore and that is fine), otherwise as if_none / on_failure say.
    let abandon_or_continue = |choice: config::IfNone| match choice {
        config::IfNone::Continue => LifecycleResult::Continue,
        config::IfNone::Abandon => LifecycleResult::Abandon,
    };
    let result = match &outcome {
        Ok(LaunchOutcome::Restored(_) | LaunchOutcome::Nothing | LaunchOutcome::Off) => {
            LifecycleResult::Continue
        }
        Ok(LaunchOutcome::NothingAbandon(_)) => LifecycleResult::Abandon,
        Err(_) => abandon_or_continue(cfg.on_failure),
    };
    let mut completion = Ok(());
    if let Some((action, hook)) = &held {
        if let Err(f) = &outcome {
            eprintln!("lifeboat: {:#}", f.error);
        }
        let until = tokio::time::Instant::now()
            + hook
                .heartbeat_timeout
                .min(std::time::Duration::from_secs(300));
        match services.lifecycle.complete(action, result, until).await {
            Ok(_) => println!(
                "completed the launch action of {} on hook {}: {}",
                action.instance_id,
                action.hook,
                result.as_str()
            ),
            Err(e) => {
                completion = Err(Failure {
                    error: anyhow::Error::new(e).context("completing the launch lifecycle action"),
                    code: EXIT_NOT_COMPLETED,
                })
            }
        }
    }
    // The report says which archive went where, or why none did.
    let (status, from, error) = match &outcome {
        Ok(LaunchOutcome::Restored(None) | LaunchOutcome::Off) => ("", None, None),
        Ok(LaunchOutcome::Restored(Some(url))) => ("restored", Some(url.clone()), None),
        Ok(LaunchOutcome::Nothing) => ("nothing-to-restore", None, None),
        Ok(LaunchOutcome::NothingAbandon(what)) => ("nothing-to-restore", None, Some(what.clone())),
        Err(f) => ("restore-failed", None, Some(format!("{:#}", f.error))),
    };
    if let (false, Some(topic)) = (status.is_empty(), &config.sns.topic_arn) {
        let report = crate::report::Report::restore(
            status,
            &identity.instance_id,
            &identity.group,
            from,
            &restored_to(cfg),
            error,
            held.as_ref().map(|_| result.as_str().to_owned()),
        );
        let sent = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            crate::report::publish(&services.sns, topic, &report),
        )
        .await;
        match sent {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("lifeboat: warning: {e}"),
            Err(_) => eprintln!("lifeboat: warning: SNS did not take the report within 10 s"),
        }
    }
    completion?;
    match outcome {
        Ok(LaunchOutcome::NothingAbandon(what)) => Err(Failure {
            error: anyhow::anyhow!("{what} (restore.if_none = \"abandon\")"),
            code: EXIT_FAILED,
        }),
        Ok(_) => Ok(EXIT_OK),
        // With a hook the error was printed before completing; the code still says it failed.
        Err(f) if held.is_some() => Ok(f.code),
        Err(f) => Err(f),
    }
}

/// Where a launch restore puts the data, as the report says it: `restore.to`, and the paths
/// `[restore.paths]` puts elsewhere.
fn restored_to(cfg: &config::RestoreConfig) -> String {
    let to = cfg.to.display().to_string();
    if cfg.paths.is_empty() {
        return to;
    }
    let moved: Vec<String> = cfg
        .paths
        .iter()
        .map(|(from, at)| format!("{} at {}", from.display(), at.display()))
        .collect();
    format!("{to} ({})", moved.join(", "))
}

/// How a launch restore ended, short of failing.
enum LaunchOutcome {
    /// The data is in place: now, from this archive (`s3://…`), or at an earlier run for this
    /// instance (`None`).
    Restored(Option<String>),
    /// Nothing to restore, and `if_none = "continue"`.
    Nothing,
    /// Nothing to restore (what was looked for), and `if_none = "abandon"`.
    NothingAbandon(String),
    /// `restore.on_launch` is off: nothing was looked for.
    Off,
}

async fn launch_restore(
    config: &Config,
    identity: &InstanceIdentity,
    s3: &aws_sdk_s3::Client,
) -> Result<LaunchOutcome, Failure> {
    let cfg = &config.restore;
    let state_dir = state::state_dir();
    let _lock = crate::launch::lock(&state_dir)
        .await
        .with_context(|| format!("taking the launch restore lock in {}", state_dir.display()))?;
    if let Some(done) = crate::launch::already_done(&state_dir, &identity.instance_id) {
        println!("already restored at this instance's launch ({done}): nothing to do");
        return Ok(LaunchOutcome::Restored(None));
    }
    let now = time::OffsetDateTime::now_utc();
    let record = |what: &str| {
        crate::launch::record_done(&state_dir, &identity.instance_id, what).with_context(|| {
            format!(
                "recording the launch restore in {}",
                crate::launch::marker(&state_dir).display()
            )
        })
    };
    // Outside a group there is no predecessor: every such host files under "standalone", and
    // another host's data is not this one's.
    let chosen = if identity.group == crate::identity::STANDALONE {
        None
    } else {
        crate::launch::choose(s3, &config.s3, identity, cfg, now).await?
    };
    let Some(chosen) = chosen else {
        let what = if identity.group == crate::identity::STANDALONE {
            format!(
                "instance {} is not in an Auto Scaling group: no predecessor to restore from",
                identity.instance_id
            )
        } else {
            format!(
                "no complete archive of group {} under s3://{}/{}",
                identity.group, config.s3.bucket, config.s3.prefix
            )
        };
        return match cfg.if_none {
            config::IfNone::Continue => {
                record("none")?;
                println!("{what}: starting without data (restore.if_none = \"continue\")");
                Ok(LaunchOutcome::Nothing)
            }
            config::IfNone::Abandon => Ok(LaunchOutcome::NothingAbandon(what)),
        };
    };
    println!(
        "restoring s3://{}/{} (instance {}) into {}",
        config.s3.bucket,
        chosen.key,
        chosen.instance_id,
        cfg.to.display()
    );
    let flags = RestoreFlags {
        // Owners as archived when run as root (at boot, by systemd), so the application keeps
        // its files. A member of the group wrote the archive, and what it wrote is confined:
        // no set-id bits, and only the paths this instance backs up itself.
        same_owner: rustix::process::geteuid().is_root(),
        keep_set_id: false,
        routes: Some(cfg.routes(&config.backup.paths)),
        overwrite: cfg.overwrite,
        force_unverified: false,
        chosen: true,
        request_restore: false,
    };
    restore(
        config,
        s3,
        Some(chosen.key.clone()),
        None,
        cfg.to.clone(),
        flags,
    )
    .await?;
    let url = format!("s3://{}/{}", config.s3.bucket, chosen.key);
    record(&url)?;
    Ok(LaunchOutcome::Restored(Some(url)))
}

async fn restore(
    config: &Config,
    s3: &aws_sdk_s3::Client,
    key: Option<String>,
    instance_id: Option<String>,
    to: PathBuf,
    flags: RestoreFlags,
) -> Result<u8, Failure> {
    let named = key.is_some() && !flags.chosen;
    let key = match (key, instance_id) {
        (Some(k), _) => k,
        (None, Some(id)) => catalog::latest(s3, &config.s3, &id).await?.key,
        (None, None) => return Err(Failure::usage("give --key or --instance-id")),
    };
    let compression = manifest::compression_of(&key)
        .ok_or_else(|| catalog::CatalogError::NotAnArchive { key: key.clone() })?;
    // Prove before trusting: the manifest says what the archive must be. The archive's download
    // starts meanwhile (nothing is read from it before the manifest is checked).
    let (summary, archive) = tokio::join!(
        catalog::manifest::<manifest::Summary>(s3, &config.s3, &key),
        catalog::open_archive(s3, &config.s3, &key),
    );
    let expected = match summary {
        Ok(m) => {
            if m.partial {
                eprintln!(
                    "lifeboat: warning: s3://{}/{key} is partial (cut short by its deadline)",
                    config.s3.bucket
                );
            }
            let in_key = manifest::parse_key(&config.s3.prefix, &key)
                .map(|p| p.instance_id)
                .unwrap_or_default();
            if m.instance.instance_id != in_key {
                let what = format!(
                    "s3://{}/{key} is filed under {in_key} but its manifest says it is from {}",
                    config.s3.bucket, m.instance.instance_id
                );
                if !named {
                    return Err(Failure {
                        error: anyhow::anyhow!(
                            "{what}: refusing it (name it with --key to restore it anyway)"
                        ),
                        code: EXIT_CHECK,
                    });
                }
                eprintln!("lifeboat: warning: {what}");
            }
            Some(restore::Expected {
                size: m.bytes_stored,
                sha256: m.sha256,
            })
        }
        Err(e) if flags.force_unverified => {
            eprintln!(
                "lifeboat: warning: NOT VERIFIED: no usable manifest for s3://{}/{key} ({e}); restoring it as it is",
                config.s3.bucket
            );
            None
        }
        Err(e) => {
            return Err(Failure {
                error: anyhow::Error::new(e).context(format!(
                    "s3://{}/{key} cannot be verified without its manifest (--force-unverified restores it anyway)",
                    config.s3.bucket
                )),
                code: EXIT_CHECK,
            });
        }
    };
    let (reader, _) = match archive {
        Err(e @ catalog::CatalogError::Archived { .. }) if flags.request_restore => {
            let requested = catalog::request_restore(s3, &config.s3, &key).await?;
            return Err(Failure {
                error: anyhow::anyhow!(
                    "{} s3://{}/{key}: run this command again once it is ready ({e})",
                    if requested {
                        "asked S3 to restore a readable copy of"
                    } else {
                        "S3 is already restoring a readable copy of"
                    },
                    config.s3.bucket
                ),
                code: EXIT_FAILED,
            });
        }
        other => other?,
    };
    let target = to.clone();
    let opts = restore::RestoreOptions {
        same_owner: flags.same_owner,
        keep_set_id: flags.keep_set_id,
        overwrite: flags.overwrite,
        expected,
    };
    let routes = flags.routes.clone();
    let restored = tokio::task::spawn_blocking(move || match routes {
        Some(routes) => restore::restore_routed(reader, compression, &routes, &opts),
        None => restore::restore(reader, compression, &target, &opts),
    })
    .await
    .context("the restore thread failed")?;
    let report = match restored {
        Ok(r) => r,
        Err(restore::RestoreError::Refused { first, refused }) => {
            println!("refused {} entries:", refused.len());
            for r in &refused {
                println!("  {}: {}", r.name, r.reason);
            }
            return Err(Failure {
                error: anyhow::anyhow!(
                    "s3://{}/{key} cannot be restored exactly: {} entries refused (first: {first}); nothing was restored",
                    config.s3.bucket,
                    refused.len()
                ),
                code: EXIT_CHECK,
            });
        }
        Err(
            e @ (restore::RestoreError::Mismatch { .. }
            | restore::RestoreError::Conflict { .. }
            | restore::RestoreError::Corrupt { .. }),
        ) => {
            return Err(Failure {
                error: e.into(),
                code: EXIT_CHECK,
            });
        }
        Err(e) => return Err(e.into()),
    };
    if !report.outside.is_empty() {
        const SHOWN: usize = 5;
        let more = report.outside.len().saturating_sub(SHOWN);
        eprintln!(
            "lifeboat: warning: {} entries of s3://{}/{key} are not in backup.paths and were not restored: {}{}",
            report.outside.len(),
            config.s3.bucket,
            report.outside[..report.outside.len().min(SHOWN)].join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            },
        );
    }
    if crate::json::wanted() {
        crate::json::print(&serde_json::json!({
            "key": key,
            "to": to,
            "entries": report.entries,
            "bytes": report.bytes,
            "outside": report.outside,
        }));
        return Ok(EXIT_OK);
    }
    println!(
        "restored {} entries ({}) from s3://{}/{} into {}",
        report.entries,
        progress::bytes(report.bytes),
        config.s3.bucket,
        key,
        to.display()
    );
    Ok(EXIT_OK)
}
