//! Test bench: real servers on loopback and the built `lifeboat` binary as a process.
//!
//! moto's server and s3s-fs are started once per test binary, on free ports, from the project's
//! `.venv` and `.tools` (installed by `scripts/bootstrap.sh`). Each is wrapped in a tiny shell
//! guard that kills it when this process's end of a pipe closes, so no server outlives the tests.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;

/// Dummy credentials the servers accept.
pub const ACCESS_KEY: &str = "lifeboat-test";
/// Dummy secret.
pub const SECRET_KEY: &str = "lifeboat-test-secret";
/// Region used everywhere.
pub const REGION: &str = "us-east-1";

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Which S3 implementation a server is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// moto's server mode.
    Moto,
    /// s3s-fs.
    S3sFs,
}

/// A server running on loopback.
pub struct Server {
    /// What it is.
    pub kind: Kind,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// moto's lifecycle-action control API (`tests/emulators/moto_lifecycle.py`).
    pub control: Option<String>,
    /// s3s-fs keeps objects as files here.
    pub data_dir: Option<PathBuf>,
    _guard: Child,
}

/// A port nothing listens on yet.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Starts `program args…` under a guard shell that kills it when our stdin pipe closes.
fn spawn_guarded(program: &Path, args: &[&str], log: &Path) -> Child {
    assert!(
        program.exists(),
        "{} is missing: run scripts/bootstrap.sh (the README's test command does)",
        program.display()
    );
    let log = std::fs::File::create(log).expect("server log");
    Command::new("sh")
        .arg("-c")
        .arg(r#""$0" "$@" & pid=$!; read _unused; kill "$pid" 2>/dev/null; wait "$pid""#)
        .arg(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawning a test server")
}

/// Polls until `port` accepts connections, with a deadline.
fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("scratch dir"))
        .path()
}

/// moto's server with Auto Scaling lifecycle actions (`tests/emulators/moto_lifecycle.py`),
/// started once.
pub fn moto() -> &'static Server {
    static MOTO: OnceLock<Server> = OnceLock::new();
    MOTO.get_or_init(|| {
        let port = free_port();
        let control = free_port();
        let script = root().join("tests/emulators/moto_lifecycle.py");
        let guard = spawn_guarded(
            &root().join(".venv/bin/python"),
            &[
                script.to_str().unwrap(),
                "--port",
                &port.to_string(),
                "--control-port",
                &control.to_string(),
            ],
            &scratch().join("moto.log"),
        );
        wait_listening(port, "moto_server");
        wait_listening(control, "moto lifecycle control");
        Server {
            kind: Kind::Moto,
            endpoint: format!("http://127.0.0.1:{port}"),
            control: Some(format!("http://127.0.0.1:{control}")),
            data_dir: None,
            _guard: guard,
        }
    })
}

/// An IMDSv2 emulator (`tests/emulators/imds.py`), one per test; killed when dropped.
pub struct Imds {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    guard: Child,
}

impl Imds {
    /// Starts an emulator for `instance_id` in `group`.
    pub fn start(instance_id: &str, group: &str) -> Self {
        Self::start_on(free_port(), instance_id, group)
    }

    /// Starts an emulator on `port` (a test that first lets metadata refuse connections).
    pub fn start_on(port: u16, instance_id: &str, group: &str) -> Self {
        let script = root().join("tests/emulators/imds.py");
        let guard = spawn_guarded(
            &root().join(".venv/bin/python"),
            &[
                script.to_str().unwrap(),
                "--port",
                &port.to_string(),
                "--instance-id",
                instance_id,
                "--group",
                group,
            ],
            &scratch().join(format!("imds-{port}.log")),
        );
        wait_listening(port, "the IMDS emulator");
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            guard,
        }
    }

    /// Merges `json` into the emulator's state.
    pub fn set(&self, json: &str) {
        http("POST", &format!("{}/_emulator/state", self.endpoint), json);
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        // Closing the guard's stdin makes it kill the emulator and exit.
        drop(self.guard.stdin.take());
        let _ = self.guard.wait();
    }
}

/// A plain HTTP/1.0 request to a loopback server; returns (status, body).
pub fn http(method: &str, url: &str, body: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut stream = TcpStream::connect(host).expect("connect");
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// Polls `probe` until it returns `Some`, failing the test after `limit`.
pub fn eventually<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// s3s-fs, started once.
pub fn s3s_fs() -> &'static Server {
    static S3S: OnceLock<Server> = OnceLock::new();
    S3S.get_or_init(|| {
        let port = free_port();
        let data = scratch().join("s3s-data");
        std::fs::create_dir_all(&data).unwrap();
        let guard = spawn_guarded(
            &root().join(".tools/bin/s3s-fs"),
            &[
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--access-key",
                ACCESS_KEY,
                "--secret-key",
                SECRET_KEY,
                data.to_str().unwrap(),
            ],
            &scratch().join("s3s-fs.log"),
        );
        wait_listening(port, "s3s-fs");
        Server {
            kind: Kind::S3sFs,
            endpoint: format!("http://127.0.0.1:{port}"),
            control: None,
            data_dir: Some(data),
            _guard: guard,
        }
    })
}

/// A runtime for the test-side S3 client.
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// A unique bucket name for one test.
pub fn bucket_name(test: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("lb-{}-{}-{n}", test.replace('_', "-"), std::process::id())
}

impl Server {
    /// Lifecycle actions recorded by moto's extension (JSON array).
    pub fn actions(&self) -> serde_json::Value {
        let url = format!("{}/actions", self.control.as_ref().expect("moto"));
        let (status, body) = http("GET", &url, "");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// An Auto Scaling client for this server.
    pub fn autoscaling(&self) -> aws_sdk_autoscaling::Client {
        let creds =
            aws_sdk_s3::config::Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test");
        let conf = aws_sdk_autoscaling::config::Builder::new()
            .behavior_version(aws_sdk_autoscaling::config::BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(aws_sdk_autoscaling::config::Region::new(REGION))
            .credentials_provider(creds)
            .build();
        aws_sdk_autoscaling::Client::from_conf(conf)
    }

    /// An SNS client for this server.
    pub fn sns(&self) -> aws_sdk_sns::Client {
        let creds =
            aws_sdk_s3::config::Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test");
        let conf = aws_sdk_sns::config::Builder::new()
            .behavior_version(aws_sdk_sns::config::BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(aws_sdk_sns::config::Region::new(REGION))
            .credentials_provider(creds)
            .build();
        aws_sdk_sns::Client::from_conf(conf)
    }

    /// An SSM client for this server.
    pub fn ssm(&self) -> aws_sdk_ssm::Client {
        let creds =
            aws_sdk_s3::config::Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test");
        let conf = aws_sdk_ssm::config::Builder::new()
            .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(aws_sdk_ssm::config::Region::new(REGION))
            .credentials_provider(creds)
            .build();
        aws_sdk_ssm::Client::from_conf(conf)
    }

    /// The test's own S3 client (not lifeboat's code).
    pub fn client(&self) -> Client {
        let creds =
            aws_sdk_s3::config::Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test");
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(aws_sdk_s3::config::Region::new(REGION))
            .credentials_provider(creds)
            .force_path_style(true)
            .build();
        Client::from_conf(conf)
    }

    /// Creates a fresh bucket and returns its name.
    pub fn bucket(&self, test: &str) -> String {
        let name = bucket_name(test);
        rt().block_on(self.client().create_bucket().bucket(&name).send())
            .expect("create bucket");
        name
    }

    /// All keys in `bucket`.
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let out = rt()
            .block_on(self.client().list_objects_v2().bucket(bucket).send())
            .expect("list objects");
        out.contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_owned))
            .collect()
    }

    /// The bytes of an object.
    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        rt().block_on(async {
            let out = self
                .client()
                .get_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .expect("get object");
            out.body.collect().await.unwrap().into_bytes().to_vec()
        })
    }

    /// Stores an object.
    pub fn put(&self, bucket: &str, key: &str, body: Vec<u8>) {
        rt().block_on(
            self.client()
                .put_object()
                .bucket(bucket)
                .key(key)
                .body(body.into())
                .send(),
        )
        .expect("put object");
    }

    /// Multipart uploads still open in `bucket` (moto implements ListMultipartUploads).
    pub fn open_uploads(&self, bucket: &str) -> usize {
        let out = rt()
            .block_on(self.client().list_multipart_uploads().bucket(bucket).send())
            .expect("list multipart uploads");
        out.uploads().len()
    }
}

/// A lifeboat invocation against `endpoint` with a config file written into `dir`.
pub struct Lifeboat {
    /// Scratch directory of the test (config file, outputs).
    pub dir: PathBuf,
    /// The config file.
    pub config: PathBuf,
    endpoint: String,
    secret: String,
}

impl Lifeboat {
    /// Writes `config` (TOML) into `dir` and points lifeboat at `endpoint`.
    pub fn new(dir: &Path, endpoint: &str, config: &str) -> Self {
        let path = dir.join("lifeboat.toml");
        std::fs::write(&path, config).unwrap();
        Self {
            dir: dir.to_owned(),
            config: path,
            endpoint: endpoint.to_owned(),
            secret: SECRET_KEY.to_owned(),
        }
    }

    /// Uses a different secret key (for access-denied tests).
    pub fn with_secret(mut self, secret: &str) -> Self {
        self.secret = secret.to_owned();
        self
    }

    /// lifeboat's environment (besides PATH) in the tests.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let path = |p: PathBuf| p.display().to_string();
        vec![
            ("HOME", path(self.dir.clone())),
            ("LIFEBOAT_CONFIG", path(self.config.clone())),
            // Each test has its own lock file, control socket and state file.
            ("RUNTIME_DIRECTORY", path(self.dir.join("run"))),
            ("STATE_DIRECTORY", path(self.dir.join("state"))),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", REGION.into()),
            // Off EC2: nothing listens on the discard port, so metadata fails fast.
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                "http://127.0.0.1:9".into(),
            ),
        ]
    }

    /// The command, environment set, not started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lifeboat"));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs to completion (failing the test if it takes longer than `limit`).
    pub fn run_with_limit(&self, args: &[&str], limit: Duration) -> Run {
        let child = self.command(args).spawn().expect("spawn lifeboat");
        wait_output(child, limit, args)
    }

    /// Runs to completion within five minutes (generous for a busy 2-core machine; a hang still
    /// fails the test).
    pub fn run(&self, args: &[&str]) -> Run {
        self.run_with_limit(args, Duration::from_secs(300))
    }
}

/// A finished lifeboat process.
#[derive(Debug)]
pub struct Run {
    /// Exit code (None if killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Asserts success and returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "lifeboat failed: {self:#?}");
        &self.stdout
    }

    /// The `s3://bucket/key` printed by a successful backup: the key.
    pub fn stored_key(&self) -> String {
        let line = self
            .ok()
            .lines()
            .find_map(|l| l.strip_prefix("stored s3://"))
            .expect("a `stored` line");
        line.split_once('/').expect("bucket/key").1.to_owned()
    }
}

/// Waits for `child` with a deadline, collecting its output.
pub fn wait_output(mut child: Child, limit: Duration, what: &[&str]) -> Run {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("lifeboat {what:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

/// A config for `bucket` archiving `paths`, with extra `[backup]` and `[s3]` lines.
pub fn config_for(bucket: &str, paths: &[&Path], backup_extra: &str, s3_extra: &str) -> String {
    let paths: Vec<String> = paths
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    format!(
        "[backup]\npaths = [{}]\n{backup_extra}\n[s3]\nbucket = \"{bucket}\"\nprefix = \"backups/\"\n{s3_extra}\n",
        paths.join(", ")
    )
}

/// Incompressible bytes (xorshift), `len` of them.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` to `path`, creating parents.
pub fn write(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
}

// Auto Scaling groups, lifecycle actions and reports in moto, shared by the daemon and Lambda tests.

/// A group with one instance and a terminate hook; returns (group, instance id, topic ARN).
pub fn group_with_hook(
    server: &Server,
    name: &str,
    heartbeat_timeout: i32,
) -> (String, String, String) {
    let (group, mut instances, topic) = group_of(server, name, 1, heartbeat_timeout);
    (group, instances.remove(0), topic)
}

/// [`group_with_hook`] with `n` instances: (group, instances, topic).
pub fn group_of(
    server: &Server,
    name: &str,
    n: i32,
    heartbeat_timeout: i32,
) -> (String, Vec<String>, String) {
    let asg = server.autoscaling();
    let group = crate::support::bucket_name(name);
    rt().block_on(async {
        asg.create_launch_configuration()
            .launch_configuration_name(&group)
            .image_id("ami-12c6146b")
            .instance_type("t3.micro")
            .send()
            .await
            .unwrap();
        asg.create_auto_scaling_group()
            .auto_scaling_group_name(&group)
            .launch_configuration_name(&group)
            .min_size(0)
            .max_size(n.max(2))
            .desired_capacity(n)
            .availability_zones("us-east-1a")
            .send()
            .await
            .unwrap();
        asg.put_lifecycle_hook()
            .auto_scaling_group_name(&group)
            .lifecycle_hook_name("lifeboat")
            .lifecycle_transition("autoscaling:EC2_INSTANCE_TERMINATING")
            .heartbeat_timeout(heartbeat_timeout)
            .default_result("ABANDON")
            .send()
            .await
            .unwrap();
    });
    let instances = rt()
        .block_on(
            asg.describe_auto_scaling_groups()
                .auto_scaling_group_names(&group)
                .send(),
        )
        .unwrap()
        .auto_scaling_groups()[0]
        .instances()
        .iter()
        .map(|i| i.instance_id().unwrap().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(instances.len(), n as usize, "moto launched {instances:?}");
    let topic = rt()
        .block_on(
            server
                .sns()
                .create_topic()
                .name(group.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "-"))
                .send(),
        )
        .unwrap()
        .topic_arn()
        .unwrap()
        .to_owned();
    (group, instances, topic)
}

/// The lifecycle action of `instance` once it has a result.
pub fn finished_action(server: &Server, instance: &str) -> serde_json::Value {
    eventually(
        "the lifecycle action to end",
        Duration::from_secs(120),
        || {
            server
                .actions()
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["instance_id"] == instance && !a["result"].is_null())
                .cloned()
        },
    )
}

/// SNS messages moto holds for `topic`: (subject, message JSON, attributes).
pub fn notifications(
    server: &Server,
    topic: &str,
) -> Vec<(String, serde_json::Value, serde_json::Value)> {
    // moto's data.json answers 500 while any multipart upload has parts: poll past that.
    let body = eventually("moto's data.json", Duration::from_secs(60), || {
        let (status, body) = http(
            "GET",
            &format!("{}/moto-api/data.json", server.endpoint),
            "",
        );
        (status == 200).then_some(body)
    });
    let data: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut out = Vec::new();
    for t in data["sns"]["Topic"].as_array().into_iter().flatten() {
        if t["arn"] != topic {
            continue;
        }
        for n in t["sent_notifications"].as_array().into_iter().flatten() {
            let message = serde_json::from_str(n[1].as_str().unwrap()).unwrap();
            out.push((
                n[2].as_str().unwrap_or_default().to_owned(),
                message,
                n[3].clone(),
            ));
        }
    }
    out
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

pub fn scale_in(server: &Server, group: &str) {
    rt().block_on(
        server
            .autoscaling()
            .set_desired_capacity()
            .auto_scaling_group_name(group)
            .desired_capacity(0)
            .send(),
    )
    .unwrap();
}

pub fn fault(server: &Server, json: &str) {
    let url = format!("{}/faults", server.control.as_ref().unwrap());
    assert_eq!(http("POST", &url, json).0, 200);
}

pub fn daemon_config(bucket: &str, data: &std::path::Path, topic: &str, extra: &str) -> String {
    format!(
        "[backup]\npaths = [{:?}]\ncompression = \"none\"\n[s3]\nbucket = \"{bucket}\"\nprefix = \"backups/\"\npart_size = \"5MiB\"\nconcurrency = 1\n[sns]\ntopic_arn = \"{topic}\"\n[lifecycle]\nheartbeat_interval = \"1s\"\n{extra}\n[watch]\npoll_interval = \"1s\"\n",
        data.display().to_string()
    )
}

/// The companion Lambda's `bootstrap`, built beside `lifeboat` by `cargo test --workspace`.
pub fn bootstrap() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_lifeboat")).with_file_name("bootstrap");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (scripts/test.sh)",
        path.display()
    );
    path
}

/// The Lambda under a local Runtime API (`tests/emulators/lambda_runtime.py`); killed on drop.
pub struct LambdaRuntime {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    guard: Child,
}

impl LambdaRuntime {
    /// Starts `bootstrap` with the Lambda's variables `env` (AWS endpoint and keys added).
    pub fn start(server: &Server, env: &[(&str, &str)]) -> Self {
        Self::start_with_timeout(server, env, 30)
    }

    /// [`LambdaRuntime::start`] with a function timeout of `timeout_s` seconds.
    pub fn start_with_timeout(server: &Server, env: &[(&str, &str)], timeout_s: u32) -> Self {
        Self::start_with_args(server, env, timeout_s, &[])
    }

    /// [`LambdaRuntime::start_with_timeout`] with more of the emulator's options (`extra`).
    pub fn start_with_args(
        server: &Server,
        env: &[(&str, &str)],
        timeout_s: u32,
        extra: &[&str],
    ) -> Self {
        let port = free_port();
        let script = root().join("tests/emulators/lambda_runtime.py");
        let mut line = vec![
            "env".to_owned(),
            format!("AWS_ENDPOINT_URL={}", server.endpoint),
            format!("AWS_ACCESS_KEY_ID={ACCESS_KEY}"),
            format!("AWS_SECRET_ACCESS_KEY={SECRET_KEY}"),
            format!("AWS_REGION={REGION}"),
            "AWS_LAMBDA_LOG_LEVEL=debug".to_owned(),
        ];
        line.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        line.push(bootstrap().display().to_string());
        let mut args = vec![
            script.display().to_string(),
            "--port".into(),
            port.to_string(),
            "--timeout".into(),
            timeout_s.to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push("--".into());
        args.extend(line);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let guard = spawn_guarded(
            &root().join(".venv/bin/python"),
            &argv,
            &scratch().join(format!("lambda-{port}.log")),
        );
        wait_listening(port, "the Lambda runtime emulator");
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            guard,
        }
    }

    /// Where EventBridge-style asynchronous events go.
    pub fn events_url(&self) -> String {
        format!("{}/events", self.endpoint)
    }

    /// Where EventBridge-style events go through the lifecycle queue (SQS and the event source
    /// mapping).
    pub fn queue_url(&self) -> String {
        format!("{}/queue", self.endpoint)
    }

    /// The queue's counters: `sent`, `deleted`, `receives`, `in_queue`, `dead`.
    pub fn queue(&self) -> serde_json::Value {
        let (_, body) = http("GET", &self.queue_url(), "");
        serde_json::from_str(&body).unwrap()
    }

    /// Invokes synchronously; returns the invocation record (`ok`, `result` or `error`).
    pub fn invoke(&self, event: &serde_json::Value) -> serde_json::Value {
        let (status, body) = http(
            "POST",
            &format!("{}/invoke", self.endpoint),
            &event.to_string(),
        );
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Every invocation so far.
    pub fn invocations(&self) -> Vec<serde_json::Value> {
        let (_, body) = http("GET", &format!("{}/invocations", self.endpoint), "");
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for LambdaRuntime {
    fn drop(&mut self) {
        drop(self.guard.stdin.take());
        let _ = self.guard.wait();
    }
}

/// POSTs `json` to the moto extension's control server at `path`.
pub fn control(server: &Server, path: &str, json: &serde_json::Value) -> serde_json::Value {
    let url = format!("{}{path}", server.control.as_ref().unwrap());
    let (status, body) = http("POST", &url, &json.to_string());
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_default()
}

/// What the SSM agent stand-in ran (one record per command and instance).
pub fn ssm_commands(server: &Server) -> Vec<serde_json::Value> {
    let url = format!("{}/ssm/commands", server.control.as_ref().unwrap());
    serde_json::from_str(&http("GET", &url, "").1).unwrap()
}

/// A `lifeboat run` process, killed when dropped (a failing test leaves no daemon behind).
pub struct Daemon(Option<Child>);

impl Daemon {
    /// Wraps a spawned `lifeboat run`.
    pub fn new(child: Child) -> Self {
        Self(Some(child))
    }

    /// The process, while it runs.
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("running")
    }

    /// Stops it with SIGTERM and returns its output.
    pub fn stop(mut self) -> Run {
        let child = self.0.take().expect("running");
        sigterm(&child);
        wait_output(child, Duration::from_secs(60), &["run"])
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `lifeboat run` against `imds` (with extra `env`) and waits for its control socket.
pub fn start_daemon(lb: &Lifeboat, imds: &Imds, env: &[(&str, &str)]) -> Daemon {
    let mut cmd = lb.command(&["run"]);
    cmd.env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.endpoint);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let daemon = Daemon::new(cmd.spawn().unwrap());
    let socket = lb.dir.join("run/control.sock");
    eventually(
        "the daemon's control socket",
        Duration::from_secs(30),
        || socket.exists().then_some(()),
    );
    daemon
}

/// Where an instance on the IMDS emulator files its archives: under its instance ARN (the
/// emulator's account and region), as the per-instance IAM policy requires.
pub fn instance_prefix(group: &str, instance: &str) -> String {
    format!("backups/{group}/arn:aws:ec2:{REGION}:123456789012:instance/{instance}/")
}

/// Sends SIGTERM to a lifeboat process.
pub fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM");
}

/// Stops the daemon with SIGTERM and returns its output.
pub fn stop_daemon(daemon: Daemon) -> Run {
    daemon.stop()
}

/// A Spot interruption time `in_secs` from now, and as the notice writes it.
pub fn spot_time(in_secs: i64) -> (time::OffsetDateTime, String) {
    let when = time::OffsetDateTime::now_utc() + time::Duration::seconds(in_secs);
    let text = when
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    (when, text)
}

/// Waits for the first manifest in `bucket` and checks it describes a partial archive finished
/// before `when` (a Spot interruption); returns it.
pub fn partial_manifest_before(
    server: &Server,
    bucket: &str,
    when: time::OffsetDateTime,
) -> serde_json::Value {
    let key = eventually("the manifest", Duration::from_secs(90), || {
        server
            .keys(bucket)
            .into_iter()
            .find(|k| k.ends_with(".manifest.json"))
    });
    let manifest: serde_json::Value = serde_json::from_slice(&server.get(bucket, &key)).unwrap();
    assert_eq!(manifest["partial"], true, "{}", manifest["changed"]);
    let finished = time::OffsetDateTime::parse(
        manifest["finished_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(
        finished < when,
        "finished {finished}, the Spot notice said {when}"
    );
    manifest
}

/// Adds the launch lifecycle hook `lifeboat-launch` to `group`: a scale-out then holds each new
/// instance in Pending:Wait (the moto extension) until its action ends.
pub fn add_launch_hook(server: &Server, group: &str, heartbeat_timeout: i32, default_result: &str) {
    rt().block_on(
        server
            .autoscaling()
            .put_lifecycle_hook()
            .auto_scaling_group_name(group)
            .lifecycle_hook_name("lifeboat-launch")
            .lifecycle_transition("autoscaling:EC2_INSTANCE_LAUNCHING")
            .heartbeat_timeout(heartbeat_timeout)
            .default_result(default_result)
            .send(),
    )
    .unwrap();
}

/// Sets `group`'s desired capacity.
pub fn set_capacity(server: &Server, group: &str, n: i32) {
    rt().block_on(
        server
            .autoscaling()
            .set_desired_capacity()
            .auto_scaling_group_name(group)
            .desired_capacity(n)
            .send(),
    )
    .unwrap();
}

/// `group`'s instances in lifecycle state `state` (all of them with `None`).
pub fn instances_in(server: &Server, group: &str, state: Option<&str>) -> Vec<String> {
    rt().block_on(
        server
            .autoscaling()
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(group)
            .send(),
    )
    .unwrap()
    .auto_scaling_groups()[0]
        .instances()
        .iter()
        .filter(|i| state.is_none_or(|s| i.lifecycle_state().map(|x| x.as_str()) == Some(s)))
        .map(|i| i.instance_id().unwrap().to_owned())
        .collect()
}
