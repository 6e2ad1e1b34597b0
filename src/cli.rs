//! The command line: parses arguments, loads the configuration once, sets up logging, runs the
//! command and maps its outcome to a documented exit code.
//!
//! Exit codes (the SSM document and systemd rely on them):
//! - 0: success;
//! - 1: the operation failed (S3 unreachable, access denied, bucket missing, …);
//! - 2: usage or configuration error;
//! - 3: a check failed: `verify` found a mismatch, or `restore` refused entries;
//! - 130 / 143: interrupted by SIGINT / SIGTERM (any upload was aborted).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::archive::{self, ArchiveOptions, Counters};
use crate::config::{self, Config};
use crate::identity::InstanceIdentity;
use crate::job::{BackupJob, JobError};
use crate::progress::{self, Progress};
use crate::{aws, catalog, manifest, restore, verify};

/// Success.
pub const EXIT_OK: u8 = 0;
/// The operation failed.
pub const EXIT_FAILED: u8 = 1;
/// Usage or configuration error.
pub const EXIT_USAGE: u8 = 2;
/// A check failed (verify mismatch, restore refusals).
pub const EXIT_CHECK: u8 = 3;

/// lifeboat saves an EC2 instance's data to S3 before Auto Scaling or Spot terminates it.
#[derive(Debug, Parser)]
#[command(name = "lifeboat", version, about, long_about = None)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "LIFEBOAT_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
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
    },
    /// List backups in the bucket, newest first.
    List {
        /// Only this instance's backups.
        #[arg(long)]
        instance_id: Option<String>,
    },
    /// Download and extract a backup into a directory (never writing outside it).
    Restore {
        /// The archive's key.
        #[arg(
            long,
            conflicts_with = "instance_id",
            required_unless_present = "instance_id"
        )]
        key: Option<String>,
        /// Restore this instance's backup.
        #[arg(long)]
        instance_id: Option<String>,
        /// With --instance-id: the newest backup (the default).
        #[arg(long, requires = "instance_id")]
        latest: bool,
        /// Target directory.
        #[arg(long)]
        to: PathBuf,
    },
    /// Check an archive against its manifest (SHA-256 and file list).
    Verify {
        /// The archive's key.
        #[arg(long)]
        key: String,
    },
    /// Show the daemon's state and last job.
    Status,
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
}

/// The signal that interrupted the command (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(matches!(cli.command, Command::Run));
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lifeboat: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Command::Config {
        command: ConfigCommand::Check,
    } = cli.command
    {
        println!("# effective configuration from {}", config.source.display());
        print!("{}", config.to_toml());
        return ExitCode::from(EXIT_OK);
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
    let code = runtime.block_on(dispatch(cli.command, config));
    // Part uploads are aborted or finished by now; do not wait for idle connection tasks.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    ExitCode::from(code)
}

fn init_logging(daemon: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if daemon { "info" } else { "warn" };
    let filter = EnvFilter::try_from_env("LIFEBOAT_LOG").unwrap_or_else(|_| {
        EnvFilter::new(format!("{default},aws_config=warn,aws_smithy_runtime=warn"))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

async fn dispatch(command: Command, config: Config) -> u8 {
    let result = match command {
        Command::Run | Command::Status => Err(Failure::usage(
            "the daemon (`run`, `status`) is not part of this build yet; use `lifeboat backup`",
        )),
        Command::Backup {
            reason,
            dry_run: true,
        } => dry_run(&config, &reason),
        Command::Backup {
            reason,
            dry_run: false,
        } => backup(&config, reason).await,
        Command::List { instance_id } => list(&config, instance_id.as_deref()).await,
        Command::Restore {
            key,
            instance_id,
            to,
            latest: _,
        } => restore(&config, key, instance_id, to).await,
        Command::Verify { key } => verify(&config, &key).await,
        Command::Config { .. } => unreachable!("handled before the runtime starts"),
    };
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

/// Cancels `token` on SIGINT or SIGTERM and remembers which.
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
        tracing::warn!(signal = signo, "interrupted; aborting the upload");
        token.cancel();
    });
}

async fn s3_client(region_hint: Option<&str>) -> aws_sdk_s3::Client {
    aws::s3_client(&aws::sdk_config(region_hint).await)
}

async fn backup(config: &Config, reason: String) -> Result<u8, Failure> {
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    let identity = InstanceIdentity::discover().await;
    let region = identity.on_ec2.then_some(identity.region.as_str());
    let s3 = s3_client(region).await;
    let counters = Arc::new(Counters::default());
    let progress = Progress::start(Arc::clone(&counters));
    let job = BackupJob {
        config,
        reason,
        identity,
        s3,
        cancel,
        counters,
    };
    let result = job.run().await;
    progress.stop();
    match result {
        Ok(outcome) => {
            let m = &outcome.manifest;
            let secs = outcome.elapsed.as_secs_f64().max(0.001);
            println!("stored s3://{}/{}", m.bucket, m.key);
            println!(
                "  {} files, {} read, {} stored, {} skipped, {} changed while read{}",
                m.file_count,
                progress::bytes(m.bytes_read),
                progress::bytes(m.bytes_stored),
                m.skipped.len(),
                m.changed.len(),
                if m.partial { ", PARTIAL" } else { "" }
            );
            println!(
                "  {:.2} s, {}/s; manifest s3://{}/{}",
                secs,
                progress::bytes((m.bytes_read as f64 / secs) as u64),
                m.bucket,
                m.key()
            );
            Ok(EXIT_OK)
        }
        Err(JobError::Cancelled) => {
            let signo = SIGNAL.load(Ordering::SeqCst);
            eprintln!(
                "lifeboat: backup interrupted; the upload was aborted and nothing was stored"
            );
            Ok(if signo > 0 {
                128 + signo as u8
            } else {
                EXIT_FAILED
            })
        }
        Err(e) => Err(anyhow::Error::new(e).context("backup failed").into()),
    }
}

async fn list(config: &Config, instance_id: Option<&str>) -> Result<u8, Failure> {
    let s3 = s3_client(None).await;
    let entries = catalog::list(&s3, &config.s3, instance_id).await?;
    if entries.is_empty() {
        eprintln!(
            "no backups under s3://{}/{}",
            config.s3.bucket, config.s3.prefix
        );
        return Ok(EXIT_OK);
    }
    println!("{:<12} {:>10}  {:<20} KEY", "STATUS", "SIZE", "INSTANCE");
    for e in entries {
        println!(
            "{:<12} {:>10}  {:<20} {}",
            e.status.name(),
            progress::bytes(e.size),
            e.instance_id,
            e.key
        );
    }
    Ok(EXIT_OK)
}

async fn verify(config: &Config, key: &str) -> Result<u8, Failure> {
    let s3 = s3_client(None).await;
    let manifest = catalog::manifest(&s3, &config.s3, key).await?;
    let compression = manifest::compression_of(key).context("unknown archive suffix")?;
    let (reader, _) = catalog::open_archive(&s3, &config.s3, key).await?;
    let report = tokio::task::spawn_blocking(move || {
        let r = verify::verify(reader, compression, &manifest);
        (r, manifest)
    })
    .await
    .context("the verify thread failed")?;
    let (report, manifest) = report;
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

async fn restore(
    config: &Config,
    key: Option<String>,
    instance_id: Option<String>,
    to: PathBuf,
) -> Result<u8, Failure> {
    let s3 = s3_client(None).await;
    let key = match (key, instance_id) {
        (Some(k), _) => k,
        (None, Some(id)) => catalog::latest(&s3, &config.s3, &id).await?.key,
        (None, None) => return Err(Failure::usage("give --key or --instance-id")),
    };
    let compression = manifest::compression_of(&key)
        .ok_or_else(|| catalog::CatalogError::NotAnArchive { key: key.clone() })?;
    let (reader, _) = catalog::open_archive(&s3, &config.s3, &key).await?;
    let target = to.clone();
    let report =
        tokio::task::spawn_blocking(move || restore::extract(reader, compression, &target))
            .await
            .context("the restore thread failed")??;
    println!(
        "restored {} entries ({}) from s3://{}/{} into {}",
        report.entries,
        progress::bytes(report.bytes),
        config.s3.bucket,
        key,
        to.display()
    );
    if report.refused.is_empty() {
        return Ok(EXIT_OK);
    }
    println!("refused {} entries:", report.refused.len());
    for r in &report.refused {
        println!("  {}: {}", r.name, r.reason);
    }
    Ok(EXIT_CHECK)
}
