//! The configuration file: a raw serde mirror of `lifeboat.toml`, turned once into a validated,
//! immutable [`Config`] (sizes and durations parsed, paths checked). Every error names the file,
//! the key and the problem.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

/// Where the configuration lives unless `--config` or `LIFEBOAT_CONFIG` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/lifeboat/lifeboat.toml";

/// S3's smallest part (except the last one).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// S3's largest part.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read the configuration file: {source}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has keys lifeboat does not know.
    #[error("{path}: {message}")]
    Parse {
        /// The configuration file.
        path: PathBuf,
        /// The parser's message, with line, column and key.
        message: String,
    },
    /// A key has a value lifeboat cannot use.
    #[error("{path}: {key}: {problem}")]
    Invalid {
        /// The configuration file.
        path: PathBuf,
        /// The key, as `section.key`.
        key: String,
        /// What is wrong with its value.
        problem: String,
    },
}

/// Compression applied to the tar stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionKind {
    /// gzip, compressed on every core; `gzip -d` reads it as one file.
    Gzip,
    /// zstd, multi-threaded.
    Zstd,
    /// Plain tar.
    None,
}

impl CompressionKind {
    /// The archive's file-name extension.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Gzip => "tar.gz",
            Self::Zstd => "tar.zst",
            Self::None => "tar",
        }
    }

    /// The name used in the config file and the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
            Self::None => "none",
        }
    }

    fn levels(self) -> (i32, i32, i32) {
        // (min, max, default)
        match self {
            Self::Gzip => (0, 9, 6),
            Self::Zstd => (1, 19, 3),
            Self::None => (0, 0, 0),
        }
    }
}

pub use crate::lifecycle::LifecycleResult;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (for messages).
    pub source: PathBuf,
    /// What to archive.
    pub backup: BackupConfig,
    /// Where to store it.
    pub s3: S3Config,
    /// Where to report.
    pub sns: SnsConfig,
    /// How to complete the lifecycle action.
    pub lifecycle: LifecycleConfig,
    /// How to watch for termination.
    pub watch: WatchConfig,
    /// What to bring back at launch.
    pub restore: RestoreConfig,
    /// Where each key's value came from, `section.key` to `source` (the file or parameter)
    /// or the `LIFEBOAT_…` variable that overrode it; keys not listed have their defaults.
    pub origins: BTreeMap<String, String>,
    /// Snapshots between terminations.
    pub schedule: ScheduleConfig,
    /// Which archives `lifeboat prune` keeps.
    pub retention: RetentionConfig,
}

/// `[retention]`: which archives `lifeboat prune` keeps, per instance. The newest complete
/// archive of every instance is kept whatever these say.
#[derive(Debug, Clone, Default)]
pub struct RetentionConfig {
    /// Keep each instance's newest this many; `None`: no count rule.
    pub keep_last: Option<usize>,
    /// Keep what S3 stored within this long; `None`: no age rule.
    pub keep_within: Option<Duration>,
    /// After each successful backup, prune this instance's own archives (needs
    /// `s3:DeleteObject` on them).
    pub after_backup: bool,
}

/// `[schedule]`: snapshots between terminations, by the daemon.
#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    /// About how often; `None`: never. Each wait is drawn between three quarters of this and
    /// all of it, so a fleet started together does not snapshot in step.
    pub every: Option<Duration>,
}

/// Whose archives a launching instance restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreFrom {
    /// The newest complete archive of any instance of this group.
    Group,
    /// The same, from an instance in this instance's availability zone.
    Az,
}

/// What a launch with nothing to restore (`if_none`), or whose restore failed (`on_failure`),
/// does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IfNone {
    /// Start without data (a fresh group has nothing to restore).
    Continue,
    /// Fail the launch: the restore unit fails, and a launch hook's action is abandoned (Auto
    /// Scaling terminates the instance and launches another).
    Abandon,
}

/// `[restore]`: the data a replacement instance takes over from its predecessors.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// Restore at launch (`lifeboat restore-on-launch`, `lifeboat-restore.service`).
    pub on_launch: bool,
    /// Whose archives.
    pub from: RestoreFrom,
    /// Nothing to restore: go on, or fail.
    pub if_none: IfNone,
    /// Archives older than this (by S3's time of their upload) are ignored.
    pub max_age: Option<Duration>,
    /// Where the archived paths go: `/` puts each back where it was archived from.
    pub to: PathBuf,
    /// Archived paths restored somewhere else than under `to` (`[restore.paths]`): each key
    /// is one of `backup.paths`.
    pub paths: Vec<(PathBuf, PathBuf)>,
    /// Replace files the image already has.
    pub overwrite: bool,
    /// Also take partial archives (cut short by their deadline).
    pub partial: bool,
    /// The group's launch hook lifeboat completes; `None`: the group's only launch hook.
    pub hook_name: Option<String>,
    /// A restore that fails (S3 unreachable, an archive that fails verification): the launch
    /// goes on without the data, or fails.
    pub on_failure: IfNone,
}

impl RestoreConfig {
    /// Where a launch restores each of `backed_up` (this instance's `backup.paths`): as
    /// `[restore.paths]` says, otherwise beneath `to` where it was archived from.
    pub fn routes(&self, backed_up: &[PathBuf]) -> Vec<crate::restore::Route> {
        backed_up
            .iter()
            .map(|p| crate::restore::Route {
                archived: p.clone(),
                to: self.paths.iter().find(|(from, _)| from == p).map_or_else(
                    || self.to.join(p.strip_prefix("/").unwrap_or(p)),
                    |(_, to)| to.clone(),
                ),
            })
            .collect()
    }
}

/// `[backup]`.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// Absolute files or directories, archived in this order: normalised (no `.`, `..` or
    /// trailing `/`) and without repeats. A path inside another is archived once, as its own
    /// path (see [`BackupConfig::overlaps`]).
    pub paths: Vec<PathBuf>,
    /// Exclude patterns as written.
    pub exclude: Vec<String>,
    /// Compiled exclude patterns.
    pub exclude_set: GlobSet,
    /// Compression of the tar stream.
    pub compression: CompressionKind,
    /// Compression level.
    pub level: i32,
    /// Do not descend into other file systems.
    pub one_file_system: bool,
    /// The memory the backup pipeline may use, in bytes ([`crate::budget`]).
    pub memory_limit: u64,
    /// Compression workers; `None` means one per core.
    pub workers: Option<usize>,
}

/// `[s3]`.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix, empty or ending in `/`.
    pub prefix: String,
    /// Starting part size in bytes; `None` means chosen by the memory budget.
    pub part_size: Option<u64>,
    /// Parts in flight at most; `None` means chosen by the memory budget.
    pub concurrency: Option<usize>,
    /// S3 storage class.
    pub storage_class: String,
    /// `AES256`, `aws:kms` or empty (bucket default).
    pub sse: String,
    /// KMS key for `aws:kms`.
    pub kms_key_id: String,
    /// Expected bucket owner account id, or empty.
    pub expected_bucket_owner: String,
    /// How long one S3 request may keep retrying before the job gives up (a dead endpoint must
    /// not hold a scale-in for hours).
    pub retry_budget: Duration,
    /// How long a download (`restore`, `verify`) may go without receiving a byte before it fails.
    pub read_timeout: Duration,
}

/// `[sns]`.
#[derive(Debug, Clone)]
pub struct SnsConfig {
    /// Topic for reports; `None` means no report.
    pub topic_arn: Option<String>,
}

/// `[lifecycle]`.
#[derive(Debug, Clone)]
pub struct LifecycleConfig {
    /// Hook name; `None` means discover it.
    pub hook_name: Option<String>,
    /// Result on failure.
    pub on_failure: LifecycleResult,
    /// Heartbeat interval; `None` means half the hook's heartbeat timeout.
    pub heartbeat_interval: Option<Duration>,
}

/// `[watch]`.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// How often instance metadata is polled.
    pub poll_interval: Duration,
    /// Watch for Spot interruption notices.
    pub spot: bool,
    /// Start an early backup on a rebalance recommendation.
    pub rebalance: bool,
    /// How long `lifeboat run` (and `lifeboat backup --complete-lifecycle` without
    /// `--instance-id`) keeps asking instance metadata who it is before it concludes that it is
    /// not on EC2 (and exits with [`crate::cli::EXIT_NO_METADATA`], which systemd restarts).
    pub metadata_wait: Duration,
    /// How often the daemon reads a configuration kept in Parameter Store again (at least a
    /// minute; SIGHUP reads it at once).
    pub config_poll: Duration,
}

/// `path` without `.`, `..` and trailing `/`, lexically (as tar names it; symlinks are not
/// resolved: a configured path that is a symlink is archived as the link).
/// The sections `LIFEBOAT_<SECTION>_<KEY>` may override.
const SECTIONS: [&str; 8] = [
    "backup",
    "s3",
    "sns",
    "lifecycle",
    "watch",
    "restore",
    "schedule",
    "retention",
];

/// `(section, key)` a variable overrides: `LIFEBOAT_S3_PART_SIZE` is `s3.part_size`.
/// Other `LIFEBOAT_` variables (`LIFEBOAT_CONFIG`, `LIFEBOAT_LOG`, …) are not overrides.
pub fn override_key(var: &str) -> Option<(String, String)> {
    let rest = var.strip_prefix("LIFEBOAT_")?.to_ascii_lowercase();
    let (section, key) = rest.split_once('_')?;
    (SECTIONS.contains(&section) && !key.is_empty()).then(|| (section.to_owned(), key.to_owned()))
}

/// What is wrong with `name` as a general purpose bucket's name, by S3's naming rules (S3 User
/// Guide, "General purpose bucket naming rules"); `None` when it is a valid name.
pub fn bucket_name_problem(name: &str) -> Option<String> {
    if !(3..=63).contains(&name.len()) {
        return Some(format!("{} characters (3 to 63)", name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.'))
    {
        return Some(format!(
            "{c:?} is not allowed (lowercase letters, digits, '-' and '.' only)"
        ));
    }
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !edge(name.chars().next()) || !edge(name.chars().last()) {
        return Some("it must begin and end with a letter or digit".into());
    }
    if name.contains("..") {
        return Some("two periods in a row".into());
    }
    if name.split('.').count() == 4 && name.split('.').all(|p| p.parse::<u8>().is_ok()) {
        return Some("it is formatted as an IP address".into());
    }
    if let Some(p) = ["xn--", "sthree-", "amzn-s3-demo-"]
        .iter()
        .find(|p| name.starts_with(*p))
    {
        return Some(format!("names beginning {p:?} are reserved"));
    }
    if let Some(s) = ["-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"]
        .iter()
        .find(|s| name.ends_with(*s))
    {
        return Some(format!("names ending {s:?} are reserved"));
    }
    None
}

fn normalise(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

impl BackupConfig {
    /// Configured paths inside other configured paths, as (inner, outer): each is archived once,
    /// as its own path, and the outer walk leaves it out (so a nested path on another file
    /// system is archived even with `one_file_system`).
    pub fn overlaps(&self) -> Vec<(&Path, &Path)> {
        let mut out = Vec::new();
        for inner in &self.paths {
            // The nearest enclosing configured path.
            if let Some(outer) = self
                .paths
                .iter()
                .filter(|o| *o != inner && inner.starts_with(o))
                .max_by_key(|o| o.components().count())
            {
                out.push((inner.as_path(), outer.as_path()));
            }
        }
        out
    }
}

/// A size as written in the file: `"16MiB"` or a number of bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

/// A count as written: a number, or text such as `"auto"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum CountValue {
    Number(u64),
    Text(String),
}

const AUTO: &str = "auto";

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    backup: RawBackup,
    s3: RawS3,
    sns: RawSns,
    lifecycle: RawLifecycle,
    watch: RawWatch,
    restore: RawRestore,
    schedule: RawSchedule,
    retention: RawRetention,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRetention {
    keep_last: u64,
    keep_within: String,
    after_backup: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSchedule {
    every: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRestore {
    on_launch: bool,
    from: RestoreFrom,
    if_none: IfNone,
    max_age: String,
    to: PathBuf,
    overwrite: bool,
    partial: bool,
    hook_name: String,
    on_failure: IfNone,
    paths: std::collections::BTreeMap<PathBuf, PathBuf>,
}

impl Default for RawRestore {
    fn default() -> Self {
        Self {
            on_launch: false,
            from: RestoreFrom::Group,
            if_none: IfNone::Continue,
            max_age: String::new(),
            to: PathBuf::from("/"),
            overwrite: true,
            partial: false,
            hook_name: String::new(),
            on_failure: IfNone::Abandon,
            paths: std::collections::BTreeMap::new(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawBackup {
    paths: Vec<PathBuf>,
    exclude: Vec<String>,
    compression: CompressionKind,
    level: Option<i32>,
    one_file_system: bool,
    memory_limit: SizeValue,
    workers: CountValue,
}

impl Default for RawBackup {
    fn default() -> Self {
        Self {
            paths: vec![PathBuf::from("/var/log")],
            exclude: Vec::new(),
            compression: CompressionKind::Gzip,
            level: None,
            one_file_system: true,
            memory_limit: SizeValue::Text("128MiB".into()),
            workers: CountValue::Text(AUTO.into()),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawS3 {
    bucket: String,
    prefix: String,
    part_size: SizeValue,
    concurrency: CountValue,
    storage_class: String,
    sse: String,
    kms_key_id: String,
    expected_bucket_owner: String,
    retry_budget: String,
    read_timeout: String,
}

impl Default for RawS3 {
    fn default() -> Self {
        Self {
            bucket: String::new(),
            prefix: "lifeboat/".into(),
            part_size: SizeValue::Text(AUTO.into()),
            concurrency: CountValue::Text(AUTO.into()),
            storage_class: "STANDARD".into(),
            sse: "AES256".into(),
            kms_key_id: String::new(),
            expected_bucket_owner: String::new(),
            retry_budget: "3m".into(),
            read_timeout: "1m".into(),
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSns {
    topic_arn: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLifecycle {
    hook_name: String,
    on_failure: LifecycleResult,
    heartbeat_interval: String,
}

impl Default for RawLifecycle {
    fn default() -> Self {
        Self {
            hook_name: String::new(),
            on_failure: LifecycleResult::Continue,
            heartbeat_interval: "auto".into(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawWatch {
    poll_interval: String,
    spot: bool,
    rebalance: bool,
    metadata_wait: String,
    config_poll: String,
}

impl Default for RawWatch {
    fn default() -> Self {
        Self {
            poll_interval: "5s".into(),
            spot: true,
            rebalance: false,
            metadata_wait: "2m".into(),
            config_poll: "5m".into(),
        }
    }
}

const STORAGE_CLASSES: &[&str] = &[
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER",
    "DEEP_ARCHIVE",
    "GLACIER_IR",
];

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validates `text` as if read from `path`, with the process's `LIFEBOAT_<SECTION>_<KEY>`
    /// environment overrides applied.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        Self::parse_with(path, text, std::env::vars())
    }

    /// [`Config::parse`] with the environment `vars`.
    pub fn parse_with(
        path: &Path,
        text: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let parse_error = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            message: message.trim_end().to_owned(),
        };
        // The text alone first: its errors carry line numbers.
        let plain: RawConfig = toml::from_str(text).map_err(|e| parse_error(e.to_string()))?;
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| parse_error(e.to_string()))?;
        // Keys the source sets, before the environment's.
        let mut origins: BTreeMap<String, String> = BTreeMap::new();
        for (section, keys) in &table {
            if let Some(keys) = keys.as_table() {
                for key in keys.keys() {
                    origins.insert(format!("{section}.{key}"), "source".into());
                }
            }
        }
        for (var, value) in vars {
            let Some((section, key)) = override_key(&var) else {
                continue;
            };
            let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value));
            let entry = table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(keys) = entry.as_table_mut() else {
                return Err(parse_error(format!("{var}: [{section}] is not a table")));
            };
            keys.insert(key.clone(), value);
            origins.insert(format!("{section}.{key}"), var.clone());
        }
        let overridden: Vec<String> = origins
            .values()
            .filter(|o| o.starts_with("LIFEBOAT_"))
            .cloned()
            .collect();
        let raw = if overridden.is_empty() {
            plain
        } else {
            RawConfig::deserialize(table).map_err(|e| {
                let mut message = e.to_string();
                if !overridden.is_empty() {
                    message.push_str(&format!(
                        " (environment overrides: {})",
                        overridden.join(", ")
                    ));
                }
                parse_error(message)
            })?
        };
        let mut config = Validator { path }.validate(raw)?;
        config.origins = origins;
        Ok(config)
    }

    /// Whether explicit `s3.part_size` and `s3.concurrency` fit `backup.memory_limit` as asked
    /// with one compression worker. A backup caps values that do not (fewer parts in flight, then
    /// automatic parts) and logs this error as a warning; `config check` refuses them.
    pub fn check_budget(&self) -> Result<(), ConfigError> {
        crate::budget::check(self.budget_request(1)).map_err(|e| ConfigError::Invalid {
            path: self.source.clone(),
            key: "backup.memory_limit".into(),
            problem: e.to_string(),
        })
    }

    /// What the backup pipeline asks of the memory budget with `workers` compression workers.
    pub fn budget_request(&self, workers: usize) -> crate::budget::Request {
        crate::budget::Request {
            limit: self.backup.memory_limit,
            kind: self.backup.compression,
            level: self.backup.level,
            workers,
            part_size: self.s3.part_size,
            concurrency: self.s3.concurrency,
        }
    }

    /// The effective configuration as TOML, defaults filled in.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.to_raw()).expect("the effective config serializes")
    }

    /// The effective configuration as JSON (`config check --json`): the same keys and values
    /// as [`Config::to_toml`].
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.to_raw()).expect("the effective config serializes")
    }

    fn to_raw(&self) -> RawConfig {
        RawConfig {
            backup: RawBackup {
                paths: self.backup.paths.clone(),
                exclude: self.backup.exclude.clone(),
                compression: self.backup.compression,
                level: Some(self.backup.level),
                one_file_system: self.backup.one_file_system,
                memory_limit: exact_size(self.backup.memory_limit),
                workers: auto_or(self.backup.workers.map(|n| n as u64)),
            },
            s3: RawS3 {
                bucket: self.s3.bucket.clone(),
                prefix: self.s3.prefix.clone(),
                part_size: self
                    .s3
                    .part_size
                    .map_or(SizeValue::Text(AUTO.into()), exact_size),
                concurrency: auto_or(self.s3.concurrency.map(|n| n as u64)),
                storage_class: self.s3.storage_class.clone(),
                sse: self.s3.sse.clone(),
                kms_key_id: self.s3.kms_key_id.clone(),
                expected_bucket_owner: self.s3.expected_bucket_owner.clone(),
                retry_budget: humantime::format_duration(self.s3.retry_budget).to_string(),
                read_timeout: humantime::format_duration(self.s3.read_timeout).to_string(),
            },
            sns: RawSns {
                topic_arn: self.sns.topic_arn.clone().unwrap_or_default(),
            },
            lifecycle: RawLifecycle {
                hook_name: self.lifecycle.hook_name.clone().unwrap_or_default(),
                on_failure: self.lifecycle.on_failure,
                heartbeat_interval: match self.lifecycle.heartbeat_interval {
                    None => "auto".into(),
                    Some(d) => humantime::format_duration(d).to_string(),
                },
            },
            watch: RawWatch {
                poll_interval: humantime::format_duration(self.watch.poll_interval).to_string(),
                spot: self.watch.spot,
                rebalance: self.watch.rebalance,
                metadata_wait: humantime::format_duration(self.watch.metadata_wait).to_string(),
                config_poll: humantime::format_duration(self.watch.config_poll).to_string(),
            },
            restore: RawRestore {
                on_launch: self.restore.on_launch,
                from: self.restore.from,
                if_none: self.restore.if_none,
                max_age: self
                    .restore
                    .max_age
                    .map(|d| humantime::format_duration(d).to_string())
                    .unwrap_or_default(),
                to: self.restore.to.clone(),
                overwrite: self.restore.overwrite,
                partial: self.restore.partial,
                hook_name: self.restore.hook_name.clone().unwrap_or_default(),
                on_failure: self.restore.on_failure,
                paths: self.restore.paths.iter().cloned().collect(),
            },
            retention: RawRetention {
                keep_last: self.retention.keep_last.map_or(0, |n| n as u64),
                keep_within: self
                    .retention
                    .keep_within
                    .map(|d| humantime::format_duration(d).to_string())
                    .unwrap_or_default(),
                after_backup: self.retention.after_backup,
            },
            schedule: RawSchedule {
                every: self
                    .schedule
                    .every
                    .map(|d| humantime::format_duration(d).to_string())
                    .unwrap_or_default(),
            },
        }
    }
}

/// `"auto"` for `None`, else the number.
fn auto_or(n: Option<u64>) -> CountValue {
    n.map_or(CountValue::Text(AUTO.into()), CountValue::Number)
}

/// A size as the config file would write it, exactly: `16MiB`, `1GiB`, or bytes.
fn exact_size(bytes: u64) -> SizeValue {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes % unit == 0 {
            return SizeValue::Text(format!("{}{name}", bytes / unit));
        }
    }
    SizeValue::Bytes(bytes)
}

struct Validator<'a> {
    path: &'a Path,
}

impl Validator<'_> {
    fn invalid(&self, key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.into(),
            problem: problem.into(),
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let backup = self.backup(raw.backup)?;
        let restore = self.restore(raw.restore, &backup.paths)?;
        let config = Config {
            source: self.path.to_owned(),
            backup,
            origins: BTreeMap::new(),
            s3: self.s3(raw.s3)?,
            sns: self.sns(raw.sns)?,
            lifecycle: self.lifecycle(raw.lifecycle)?,
            watch: self.watch(raw.watch)?,
            restore,
            retention: RetentionConfig {
                keep_last: usize::try_from(raw.retention.keep_last)
                    .ok()
                    .filter(|n| *n > 0),
                keep_within: match raw.retention.keep_within.trim() {
                    "" => None,
                    text => Some(self.duration("retention.keep_within", text)?),
                },
                after_backup: raw.retention.after_backup,
            },
            schedule: ScheduleConfig {
                every: match raw.schedule.every.trim() {
                    "" => None,
                    text => Some(self.duration("schedule.every", text)?).filter(|d| !d.is_zero()),
                },
            },
        };
        let r = &config.retention;
        if r.after_backup && r.keep_last.is_none() && r.keep_within.is_none() {
            return Err(self.invalid(
                "retention.after_backup",
                "is true but no rule is set: set retention.keep_last or retention.keep_within",
            ));
        }
        Ok(config)
    }

    fn backup(&self, raw: RawBackup) -> Result<BackupConfig, ConfigError> {
        if raw.paths.is_empty() {
            return Err(self.invalid("backup.paths", "is empty: list at least one path"));
        }
        let mut paths: Vec<PathBuf> = Vec::with_capacity(raw.paths.len());
        for (i, p) in raw.paths.iter().enumerate() {
            if !p.is_absolute() {
                return Err(self.invalid(
                    format!("backup.paths[{i}]"),
                    format!("{:?} is not an absolute path", p),
                ));
            }
            let p = normalise(p);
            if !paths.contains(&p) {
                paths.push(p);
            }
        }
        let mut set = GlobSetBuilder::new();
        for (i, pattern) in raw.exclude.iter().enumerate() {
            let glob = Glob::new(pattern).map_err(|e| {
                self.invalid(format!("backup.exclude[{i}]"), format!("{pattern:?}: {e}"))
            })?;
            set.add(glob);
        }
        let exclude_set = set
            .build()
            .map_err(|e| self.invalid("backup.exclude", e.to_string()))?;
        let (min, max, default) = raw.compression.levels();
        let level = raw.level.unwrap_or(default);
        if raw.compression != CompressionKind::None && !(min..=max).contains(&level) {
            return Err(self.invalid(
                "backup.level",
                format!(
                    "{level} is out of range for {}: use {min} to {max}",
                    raw.compression.name()
                ),
            ));
        }
        let memory_limit = self.size("backup.memory_limit", &raw.memory_limit)?;
        if memory_limit < crate::budget::MIN_LIMIT {
            return Err(self.invalid(
                "backup.memory_limit",
                format!("{memory_limit} bytes is below the smallest limit that works (40MiB)"),
            ));
        }
        let workers = self.count("backup.workers", &raw.workers, 1..=1024)?;
        Ok(BackupConfig {
            paths,
            exclude: raw.exclude,
            exclude_set,
            compression: raw.compression,
            level,
            one_file_system: raw.one_file_system,
            memory_limit,
            workers,
        })
    }

    fn s3(&self, raw: RawS3) -> Result<S3Config, ConfigError> {
        if raw.bucket.is_empty() {
            return Err(self.invalid("s3.bucket", "is missing: name the bucket backups go to"));
        }
        if let Some(problem) = bucket_name_problem(&raw.bucket) {
            return Err(self.invalid(
                "s3.bucket",
                format!("{:?} is not a name S3 accepts: {problem}", raw.bucket),
            ));
        }
        let mut prefix = raw.prefix.trim_start_matches('/').to_owned();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        let part_size = match &raw.part_size {
            SizeValue::Text(t) if t.trim() == AUTO => None,
            other => Some(self.size("s3.part_size", other)?),
        };
        if let Some(part_size) = part_size
            && !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part_size)
        {
            return Err(self.invalid(
                "s3.part_size",
                format!("{part_size} bytes is outside S3's part limits (5MiB to 5GiB)"),
            ));
        }
        let concurrency = self.count("s3.concurrency", &raw.concurrency, 1..=64)?;
        if !STORAGE_CLASSES.contains(&raw.storage_class.as_str()) {
            return Err(self.invalid(
                "s3.storage_class",
                format!(
                    "{:?} is not one of {}",
                    raw.storage_class,
                    STORAGE_CLASSES.join(", ")
                ),
            ));
        }
        match raw.sse.as_str() {
            "" | "AES256" | "aws:kms" => {}
            other => {
                return Err(self.invalid(
                    "s3.sse",
                    format!("{other:?} is not one of \"AES256\", \"aws:kms\" or \"\""),
                ));
            }
        }
        if !raw.kms_key_id.is_empty() && raw.sse != "aws:kms" {
            return Err(self.invalid("s3.kms_key_id", "is set but s3.sse is not \"aws:kms\""));
        }
        if !raw.expected_bucket_owner.is_empty()
            && (raw.expected_bucket_owner.len() != 12
                || !raw
                    .expected_bucket_owner
                    .bytes()
                    .all(|b| b.is_ascii_digit()))
        {
            return Err(self.invalid(
                "s3.expected_bucket_owner",
                format!(
                    "{:?} is not a 12-digit account id",
                    raw.expected_bucket_owner
                ),
            ));
        }
        let retry_budget = self.duration("s3.retry_budget", &raw.retry_budget)?;
        let read_timeout = self.duration("s3.read_timeout", &raw.read_timeout)?;
        Ok(S3Config {
            retry_budget,
            read_timeout,
            bucket: raw.bucket,
            prefix,
            part_size,
            concurrency,
            storage_class: raw.storage_class,
            sse: raw.sse,
            kms_key_id: raw.kms_key_id,
            expected_bucket_owner: raw.expected_bucket_owner,
        })
    }

    fn sns(&self, raw: RawSns) -> Result<SnsConfig, ConfigError> {
        if !raw.topic_arn.is_empty() && !raw.topic_arn.starts_with("arn:") {
            return Err(self.invalid(
                "sns.topic_arn",
                format!("{:?} is not an ARN (arn:aws:sns:…)", raw.topic_arn),
            ));
        }
        Ok(SnsConfig {
            topic_arn: Some(raw.topic_arn).filter(|s| !s.is_empty()),
        })
    }

    fn lifecycle(&self, raw: RawLifecycle) -> Result<LifecycleConfig, ConfigError> {
        let heartbeat_interval = match raw.heartbeat_interval.as_str() {
            "auto" | "" => None,
            text => Some(self.duration("lifecycle.heartbeat_interval", text)?),
        };
        Ok(LifecycleConfig {
            hook_name: Some(raw.hook_name).filter(|s| !s.is_empty()),
            on_failure: raw.on_failure,
            heartbeat_interval,
        })
    }

    fn watch(&self, raw: RawWatch) -> Result<WatchConfig, ConfigError> {
        let poll_interval = self.duration("watch.poll_interval", &raw.poll_interval)?;
        let metadata_wait = self.duration("watch.metadata_wait", &raw.metadata_wait)?;
        let config_poll = self.duration("watch.config_poll", &raw.config_poll)?;
        if config_poll < Duration::from_secs(60) {
            return Err(self.invalid(
                "watch.config_poll",
                "is under a minute: the daemon would wake more than once a minute for it",
            ));
        }
        Ok(WatchConfig {
            poll_interval,
            spot: raw.spot,
            rebalance: raw.rebalance,
            metadata_wait,
            config_poll,
        })
    }

    fn restore(
        &self,
        raw: RawRestore,
        backed_up: &[PathBuf],
    ) -> Result<RestoreConfig, ConfigError> {
        if !raw.to.is_absolute() {
            return Err(self.invalid(
                "restore.to",
                format!("{:?} is not an absolute path", raw.to),
            ));
        }
        let mut paths = Vec::with_capacity(raw.paths.len());
        for (from, to) in &raw.paths {
            let key = format!("restore.paths.{:?}", from.display().to_string());
            let from = normalise(from);
            if !backed_up.contains(&from) {
                return Err(self.invalid(
                    key,
                    "is not one of backup.paths: a launch restores only what this instance backs up",
                ));
            }
            if !to.is_absolute() {
                return Err(self.invalid(key, format!("{to:?} is not an absolute path")));
            }
            paths.push((from, normalise(to)));
        }
        let max_age = match raw.max_age.trim() {
            "" => None,
            text => Some(self.duration("restore.max_age", text)?),
        };
        Ok(RestoreConfig {
            on_launch: raw.on_launch,
            from: raw.from,
            if_none: raw.if_none,
            max_age,
            to: normalise(&raw.to),
            paths,
            overwrite: raw.overwrite,
            partial: raw.partial,
            hook_name: (!raw.hook_name.is_empty()).then_some(raw.hook_name),
            on_failure: raw.on_failure,
        })
    }

    fn size(&self, key: &str, value: &SizeValue) -> Result<u64, ConfigError> {
        match value {
            SizeValue::Bytes(n) => Ok(*n),
            SizeValue::Text(text) => text
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|b| b.0)
                .map_err(|_| {
                    self.invalid(
                        key,
                        format!(
                            "{text:?} is not a size (write it like \"16MiB\" or a number of bytes)"
                        ),
                    )
                }),
        }
    }

    /// `"auto"` (`None`) or a number within `range`.
    fn count(
        &self,
        key: &str,
        value: &CountValue,
        range: std::ops::RangeInclusive<usize>,
    ) -> Result<Option<usize>, ConfigError> {
        let n = match value {
            CountValue::Text(t) if t.trim() == AUTO => return Ok(None),
            CountValue::Text(t) => {
                return Err(self.invalid(key, format!("{t:?} is not \"auto\" or a number")));
            }
            CountValue::Number(n) => *n,
        };
        match usize::try_from(n) {
            Ok(n) if range.contains(&n) => Ok(Some(n)),
            _ => Err(self.invalid(
                key,
                format!(
                    "{n} is out of range: use {} to {} (or \"auto\")",
                    range.start(),
                    range.end()
                ),
            )),
        }
    }

    fn duration(&self, key: &str, text: &str) -> Result<Duration, ConfigError> {
        let d = humantime::parse_duration(text.trim()).map_err(|e| {
            self.invalid(
                key,
                format!("{text:?} is not a duration ({e}; write it like \"5s\" or \"2m\")"),
            )
        })?;
        if d < Duration::from_secs(1) {
            return Err(self.invalid(key, format!("{text:?} is shorter than one second")));
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/lifeboat/lifeboat.toml"), text)
    }

    /// S3's naming rules in full: a name S3 would refuse is refused here, naming the rule,
    /// instead of at the first upload (at a termination).
    #[test]
    fn bucket_names_follow_s3s_rules() {
        for ok in [
            "my-backups",
            "a.b.c",
            "abc",
            "backups-2026",
            &"a".repeat(63),
        ] {
            assert_eq!(bucket_name_problem(ok), None, "{ok}");
        }
        for (bad, why) in [
            ("-my..backups-", "begin and end"),
            ("my..backups", "two periods"),
            ("ab", "3 to 63"),
            ("My-Backups", "not allowed"),
            ("my_backups", "not allowed"),
            ("192.168.5.4", "IP address"),
            ("xn--backups", "reserved"),
            ("sthree-backups", "reserved"),
            ("backups-s3alias", "reserved"),
            ("backups--ol-s3", "reserved"),
            ("backups.mrap", "reserved"),
            ("backups--x-s3", "reserved"),
        ] {
            let problem = bucket_name_problem(bad).unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(problem.contains(why), "{bad}: {problem}");
        }
        let e = parse("[s3]\nbucket = \"-my..backups-\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("s3.bucket") && e.contains("begin and end"),
            "{e}"
        );
    }

    #[test]
    fn defaults_apply_with_only_a_bucket() {
        let c = parse("[s3]\nbucket = \"my-backups\"\n").unwrap();
        assert_eq!(c.backup.paths, vec![PathBuf::from("/var/log")]);
        assert_eq!(c.backup.compression, CompressionKind::Gzip);
        assert_eq!(c.backup.level, 6);
        assert_eq!(c.s3.part_size, None);
        assert_eq!(c.s3.concurrency, None);
        assert_eq!(c.backup.memory_limit, 128 * 1024 * 1024);
        assert_eq!(c.backup.workers, None);
        assert_eq!(c.s3.prefix, "lifeboat/");
        assert_eq!(c.watch.poll_interval, Duration::from_secs(5));
        assert!(c.lifecycle.heartbeat_interval.is_none());
        assert!(c.sns.topic_arn.is_none());
    }

    #[test]
    fn memory_settings_are_checked_against_each_other() {
        let e = parse("[backup]\nmemory_limit = \"16MiB\"\n[s3]\nbucket = \"b-1\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("backup.memory_limit") && e.contains("40MiB"),
            "{e}"
        );
        // Parts that do not fit load (a backup caps them) and are named by check_budget.
        let c = parse("[s3]\nbucket = \"b-1\"\npart_size = \"64MiB\"\nconcurrency = 4\n").unwrap();
        let e = c.check_budget().unwrap_err().to_string();
        assert!(
            e.contains("backup.memory_limit") && e.contains("s3.concurrency = 4"),
            "{e}"
        );
        let e = parse("[s3]\nbucket = \"b-1\"\n[schedule]\nevery = \"often\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("schedule.every") && e.contains("often"), "{e}");
        let c = parse("[s3]\nbucket = \"b-1\"\n[schedule]\nevery = \"6h\"\n").unwrap();
        assert_eq!(c.schedule.every, Some(Duration::from_secs(6 * 3600)));
        let e = parse("[s3]\nbucket = \"b-1\"\n[restore]\nto = \"relative\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("restore.to"), "{e}");
        let e = parse("[backup]\nworkers = \"many\"\n[s3]\nbucket = \"b-1\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("backup.workers") && e.contains("\"many\""),
            "{e}"
        );
        let c = parse(
            "[backup]\nmemory_limit = \"1GiB\"\nworkers = 16\n[s3]\nbucket = \"b-1\"\npart_size = \"64MiB\"\nconcurrency = 4\n",
        )
        .unwrap();
        assert_eq!(c.backup.workers, Some(16));
        assert_eq!(c.s3.concurrency, Some(4));
        assert!(c.check_budget().is_ok());
        let again = parse(&c.to_toml()).unwrap();
        assert_eq!(again.backup.memory_limit, 1 << 30);
        assert_eq!(again.backup.workers, Some(16));
    }

    #[test]
    fn missing_bucket_names_the_key() {
        let e = parse("").unwrap_err().to_string();
        assert!(
            e.contains("/etc/lifeboat/lifeboat.toml: s3.bucket: is missing"),
            "{e}"
        );
    }

    /// `LIFEBOAT_<SECTION>_<KEY>` overrides one key, typed as TOML (else a string); other
    /// `LIFEBOAT_` variables are not overrides; a wrong key names its variable; the origins say
    /// where each value came from.
    #[test]
    fn environment_overrides_single_keys_and_say_so() {
        let vars = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let c = Config::parse_with(
            Path::new("f.toml"),
            "[s3]\nbucket = \"b-1\"\n",
            vars(&[
                ("LIFEBOAT_S3_BUCKET", "b-2"),
                ("LIFEBOAT_BACKUP_PATHS", "[\"/srv\"]"),
                ("LIFEBOAT_S3_CONCURRENCY", "4"),
                ("LIFEBOAT_LOG", "debug"),
                ("LIFEBOAT_WORKERS", "2"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.s3.bucket, "b-2");
        assert_eq!(c.backup.paths, vec![PathBuf::from("/srv")]);
        assert_eq!(c.s3.concurrency, Some(4));
        assert_eq!(c.origins["s3.bucket"], "LIFEBOAT_S3_BUCKET");
        assert_eq!(c.origins["backup.paths"], "LIFEBOAT_BACKUP_PATHS");
        assert!(!c.origins.contains_key("backup.compression"));
        let e = Config::parse_with(
            Path::new("f.toml"),
            "[s3]\nbucket = \"b-1\"\n",
            vars(&[("LIFEBOAT_S3_BUKCET", "x")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("bukcet") && e.contains("LIFEBOAT_S3_BUKCET"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_names_the_key() {
        let e = parse("[s3]\nbucket = \"b-1\"\nbukcet = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bukcet"), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn relative_path_is_refused() {
        let e = parse("[backup]\npaths = [\"/a\", \"var/log\"]\n[s3]\nbucket = \"b-1\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("backup.paths[1]"), "{e}");
        assert!(e.contains("not an absolute path"), "{e}");
    }

    #[test]
    fn paths_are_normalised_and_repeats_dropped_and_overlaps_named() {
        let c = parse(
            "[backup]\npaths = [\"/var/log/\", \"/var/./lib/../\", \"/var/log\", \"/srv\"]\n[s3]\nbucket = \"b-1\"\n",
        )
        .unwrap();
        let paths: Vec<&str> = c.backup.paths.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(paths, ["/var/log", "/var", "/srv"]);
        assert_eq!(
            c.backup.overlaps(),
            [(Path::new("/var/log"), Path::new("/var"))]
        );
    }

    #[test]
    fn bad_size_and_duration_are_refused() {
        let e = parse("[s3]\nbucket = \"b-1\"\npart_size = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("s3.part_size"), "{e}");
        let e = parse("[s3]\nbucket = \"b-1\"\npart_size = \"1MiB\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside S3's part limits"), "{e}");
        let e = parse("[s3]\nbucket = \"b-1\"\n[watch]\npoll_interval = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("watch.poll_interval"), "{e}");
    }

    #[test]
    fn sizes_accept_numbers_and_units() {
        let c = parse("[s3]\nbucket = \"b-1\"\npart_size = 8388608\n").unwrap();
        assert_eq!(c.s3.part_size, Some(8 * 1024 * 1024));
        let c = parse("[s3]\nbucket = \"b-1\"\npart_size = \"32 MiB\"\n").unwrap();
        assert_eq!(c.s3.part_size, Some(32 * 1024 * 1024));
    }

    #[test]
    fn effective_config_round_trips() {
        let c = parse("[s3]\nbucket = \"b-1\"\nprefix = \"x\"\n").unwrap();
        let again = parse(&c.to_toml()).unwrap();
        assert_eq!(again.s3.prefix, "x/");
        assert_eq!(again.s3.part_size, c.s3.part_size);
        assert_eq!(again.watch.poll_interval, c.watch.poll_interval);
    }
}
