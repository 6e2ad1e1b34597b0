//! Where lifeboat keeps things between runs: the runtime directory (control socket, lock file)
//! and the state directory (`state.json`: daemon state, last notice, last job result).
//!
//! systemd's `RuntimeDirectory=` and `StateDirectory=` set `RUNTIME_DIRECTORY` and
//! `STATE_DIRECTORY`; without them, `/run/lifeboat` and `/var/lib/lifeboat`. Writing the state
//! never fails a job: errors are logged.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::job::JobResult;
use crate::watch::TerminationNotice;

fn dir_from_env(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .and_then(|v| {
            // systemd may list several directories separated by ':'; the first is ours.
            v.to_str()
                .and_then(|s| s.split(':').next())
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(default))
}

/// The runtime directory (control socket, lock file).
pub fn runtime_dir() -> PathBuf {
    dir_from_env("RUNTIME_DIRECTORY", "/run/lifeboat")
}

/// The state directory (`state.json`).
pub fn state_dir() -> PathBuf {
    dir_from_env("STATE_DIRECTORY", "/var/lib/lifeboat")
}

/// The daemon's control socket.
pub fn control_socket() -> PathBuf {
    runtime_dir().join("control.sock")
}

/// Takes an exclusive `flock` on `path` (created if missing, with its directory), held while
/// the returned file lives; when another process holds it, `on_wait` is called once and the
/// lock is waited for on a blocking thread. The second value says whether it had to wait.
pub async fn lock_file(
    path: &Path,
    on_wait: impl FnOnce(),
) -> std::io::Result<(std::fs::File, bool)> {
    use rustix::fs::{FlockOperation, flock};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    if flock(&file, FlockOperation::NonBlockingLockExclusive).is_ok() {
        return Ok((file, false));
    }
    on_wait();
    tokio::task::spawn_blocking(move || {
        flock(&file, FlockOperation::LockExclusive)?;
        Ok((file, true))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// What the daemon is doing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DaemonInfo {
    /// Its process id.
    pub pid: u32,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// The sources it watches.
    pub sources: Vec<String>,
    /// The instance it runs on.
    pub instance_id: String,
    /// `running` or `stopped`.
    pub state: String,
    /// The configuration it runs with: its source and version (a parameter's version, a
    /// file's time), `cached` when read from the cached copy.
    #[serde(default)]
    pub config: String,
}

/// A notice as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NoticeRecord {
    /// When it arrived.
    #[serde(with = "time::serde::rfc3339")]
    pub at: time::OffsetDateTime,
    /// The notice.
    pub notice: TerminationNotice,
}

/// The contents of `state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// The daemon, when one ran.
    pub daemon: Option<DaemonInfo>,
    /// The last notice.
    pub last_notice: Option<NoticeRecord>,
    /// The last job's result.
    pub last_job: Option<JobResult>,
}

/// `state.json`, kept in memory and written through on every change.
pub struct StateFile {
    path: PathBuf,
    state: Mutex<State>,
}

impl StateFile {
    /// Opens (or starts) the state file in `dir`.
    pub fn open(dir: &Path) -> Self {
        let path = dir.join("state.json");
        let state = Self::read(&path).unwrap_or_default();
        Self {
            path,
            state: Mutex::new(state),
        }
    }

    /// Reads a state file, if there is a valid one.
    pub fn read(path: &Path) -> Option<State> {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state as on disk now (another process may have written it), kept as the current one;
    /// the one in memory when the file cannot be read.
    pub fn reload(&self) -> State {
        let mut state = self.state.lock().expect("state lock");
        if let Some(on_disk) = Self::read(&self.path) {
            *state = on_disk;
        }
        state.clone()
    }

    /// A copy of the current state.
    pub fn snapshot(&self) -> State {
        self.state.lock().expect("state lock").clone()
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        let mut state = self.state.lock().expect("state lock");
        f(&mut state);
        if let Err(e) = self.write(&state) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the state file");
        }
    }

    fn write(&self, state: &State) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(state).expect("state serializes"),
        )?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Records the daemon's state.
    pub fn set_daemon(&self, info: DaemonInfo) {
        self.update(|s| s.daemon = Some(info));
    }

    /// Records a notice.
    pub fn record_notice(&self, notice: &TerminationNotice) {
        let at = time::OffsetDateTime::now_utc();
        self.update(|s| {
            s.last_notice = Some(NoticeRecord {
                at,
                notice: notice.clone(),
            });
        });
    }

    /// Records a job's result.
    pub fn record_result(&self, result: &JobResult) {
        self.update(|s| s.last_job = Some(result.clone()));
    }
}
