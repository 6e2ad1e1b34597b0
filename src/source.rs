//! Where the configuration comes from: a file (`--config PATH`), or an SSM Parameter Store
//! parameter (`--config ssm:NAME`, as the CloudWatch agent's `-c ssm:NAME`), String or
//! SecureString. A parameter read is kept on disk (`STATE_DIRECTORY/config-cache.toml`,
//! mode 0600), so an instance that boots while SSM is unreachable starts with the last copy it
//! read instead of without protection. The daemon reads the source again every
//! `watch.config_poll` and on SIGHUP, and swaps only a configuration that validates.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Config, ConfigError};

/// A configuration's source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A TOML file.
    File(PathBuf),
    /// A Parameter Store parameter's name (or ARN).
    Parameter(String),
}

/// A configuration as read, with its text (to tell a change from a re-read).
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The validated configuration.
    pub config: Config,
    /// The TOML it came from.
    pub text: String,
    /// The parameter's version, or the file's length and time; for `status`.
    pub version: String,
    /// Read from the cached copy because the parameter could not be.
    pub cached: bool,
}

/// How long reading a parameter may take.
const FETCH_BUDGET: Duration = Duration::from_secs(10);

impl ConfigSource {
    /// `ssm:NAME` is a parameter; anything else a file.
    pub fn from_arg(arg: &Path) -> Self {
        match arg.to_str().and_then(|s| s.strip_prefix("ssm:")) {
            Some(name) => Self::Parameter(name.to_owned()),
            None => Self::File(arg.to_owned()),
        }
    }

    /// A file that holds only `source = "ssm:NAME"` (the packaged file on an image, pointed at
    /// the group's parameter) stands for that parameter.
    pub fn resolve(self) -> Self {
        let Self::File(path) = &self else {
            return self;
        };
        let redirect = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| toml::from_str::<toml::Table>(&text).ok())
            .and_then(|t| {
                let target = t.get("source")?.as_str()?.strip_prefix("ssm:")?.to_owned();
                if t.len() > 1 {
                    tracing::warn!(path = %path.display(), "source names a parameter: the file's other keys are not read");
                }
                Some(target)
            });
        match redirect {
            Some(name) => Self::Parameter(name),
            None => self,
        }
    }

    /// The source as errors and `config check` name it: the path, or `ssm:NAME`.
    pub fn label(&self) -> PathBuf {
        match self {
            Self::File(p) => p.clone(),
            Self::Parameter(name) => PathBuf::from(format!("ssm:{name}")),
        }
    }

    /// Where a parameter's last good copy is kept.
    pub fn cache_path() -> PathBuf {
        crate::state::state_dir().join("config-cache.toml")
    }

    /// Reads and validates the configuration. A parameter that cannot be read (SSM unreachable,
    /// throttled) falls back to the cached copy, with a warning; one that reads but does not
    /// validate is an error (the cache is for outages, not for bad values).
    pub async fn load(&self) -> Result<Loaded, ConfigError> {
        let label = self.label();
        match self {
            Self::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                let version = std::fs::metadata(path)
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .map(|t| crate::manifest::rfc3339(t.into()))
                    .unwrap_or_default();
                let config = Config::parse(&label, &text)?;
                Ok(Loaded {
                    config,
                    text,
                    version,
                    cached: false,
                })
            }
            Self::Parameter(name) => match fetch(name).await {
                Ok((text, version)) => {
                    let config = Config::parse(&label, &text)?;
                    if let Err(e) = write_cache(&text) {
                        tracing::warn!(path = %Self::cache_path().display(), error = %e, "the configuration's cached copy was not written");
                    }
                    Ok(Loaded {
                        config,
                        text,
                        version,
                        cached: false,
                    })
                }
                Err(why) => {
                    let cache = Self::cache_path();
                    let text = std::fs::read_to_string(&cache).map_err(|_| ConfigError::Read {
                        path: label.clone(),
                        source: std::io::Error::other(format!(
                            "{why}; and no cached copy at {}",
                            cache.display()
                        )),
                    })?;
                    tracing::warn!(parameter = %name, error = %why, cache = %cache.display(), "Parameter Store did not answer: using the cached copy of the configuration");
                    let config = Config::parse(&label, &text)?;
                    Ok(Loaded {
                        config,
                        text,
                        version: "cached".into(),
                        cached: true,
                    })
                }
            },
        }
    }
}

/// The SSM client, built once per process: the daemon's polls reuse its credentials and
/// connections instead of resolving the SDK's configuration chain every time.
static SSM: tokio::sync::OnceCell<aws_sdk_ssm::Client> = tokio::sync::OnceCell::const_new();

/// The parameter's value (decrypted) and version.
async fn fetch(name: &str) -> Result<(String, String), String> {
    let client = SSM
        .get_or_init(|| async { crate::aws::ssm_client(&crate::aws::sdk_config(None).await) })
        .await;
    let out = tokio::time::timeout(
        FETCH_BUDGET,
        client
            .get_parameter()
            .name(name)
            .with_decryption(true)
            .send(),
    )
    .await
    .map_err(|_| {
        format!(
            "Parameter Store did not answer within {} s",
            FETCH_BUDGET.as_secs()
        )
    })?
    .map_err(|e| {
        format!(
            "reading parameter {name}: {}",
            crate::upload::sdk_message(&e)
        )
    })?;
    let p = out
        .parameter()
        .ok_or_else(|| format!("parameter {name}: no value in the answer"))?;
    Ok((
        p.value().unwrap_or_default().to_owned(),
        p.version().to_string(),
    ))
}

/// Writes the cached copy atomically, readable by its owner only.
fn write_cache(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = ConfigSource::cache_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// What changed between two configurations, as `key: old -> new` lines of their TOML (for the
/// daemon's log when it swaps one for the other).
pub fn changes(old: &Config, new: &Config) -> Vec<String> {
    let flatten = |c: &Config| -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let serde_json::Value::Object(sections) = c.to_json() {
            for (section, keys) in sections {
                if let serde_json::Value::Object(keys) = keys {
                    for (k, v) in keys {
                        out.push((format!("{section}.{k}"), v.to_string()));
                    }
                }
            }
        }
        out
    };
    let before = flatten(old);
    let after = flatten(new);
    let mut out = Vec::new();
    for (key, value) in &after {
        match before.iter().find(|(k, _)| k == key) {
            Some((_, was)) if was == value => {}
            Some((_, was)) => out.push(format!("{key}: {was} -> {value}")),
            None => out.push(format!("{key}: {value}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssm_names_a_parameter_and_anything_else_a_file() {
        assert_eq!(
            ConfigSource::from_arg(Path::new("ssm:/lifeboat/web")),
            ConfigSource::Parameter("/lifeboat/web".into())
        );
        assert_eq!(
            ConfigSource::from_arg(Path::new("/etc/lifeboat/lifeboat.toml")),
            ConfigSource::File("/etc/lifeboat/lifeboat.toml".into())
        );
        assert_eq!(
            ConfigSource::Parameter("/x".into()).label(),
            PathBuf::from("ssm:/x")
        );
    }

    #[test]
    fn a_file_that_names_a_parameter_stands_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lifeboat.toml");
        std::fs::write(
            &file,
            "# the group's configuration\nsource = \"ssm:/lifeboat/web\"\n",
        )
        .unwrap();
        assert_eq!(
            ConfigSource::File(file.clone()).resolve(),
            ConfigSource::Parameter("/lifeboat/web".into())
        );
        std::fs::write(&file, "[s3]\nbucket = \"b-1\"\n").unwrap();
        assert_eq!(
            ConfigSource::File(file.clone()).resolve(),
            ConfigSource::File(file)
        );
    }

    #[test]
    fn changes_name_each_key_that_changed() {
        let a = Config::parse_with(Path::new("a"), "[s3]\nbucket = \"b-1\"\n", []).unwrap();
        let b = Config::parse_with(
            Path::new("a"),
            "[s3]\nbucket = \"b-2\"\nprefix = \"p/\"\n",
            [],
        )
        .unwrap();
        assert_eq!(
            changes(&a, &b),
            vec![
                "s3.bucket: \"b-1\" -> \"b-2\"".to_owned(),
                "s3.prefix: \"lifeboat/\" -> \"p/\"".to_owned()
            ]
        );
        assert!(changes(&a, &a).is_empty());
    }
}
