//! The .deb and the .rpm built by `scripts/package.sh` (which `scripts/test.sh` runs first): their
//! file lists, modes and config flags, lintian and rpmlint, and the .deb installed, upgraded,
//! removed and purged by dpkg in a scratch root, its maintainer scripts running against stubs
//! (adduser, systemctl, deb-systemd-helper) that record what they were asked to do.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use crate::support::root;

fn package(dir: &str, ext: &str) -> PathBuf {
    let dir = root().join("target").join(dir);
    std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == ext))
        .unwrap_or_else(|| {
            panic!(
                "no .{ext} in {}: run scripts/package.sh (scripts/test.sh does)",
                dir.display()
            )
        })
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Path → permission bits, for every file the package must ship.
fn expected_files() -> BTreeMap<&'static str, u32> {
    BTreeMap::from([
        ("/usr/bin/lifeboat", 0o755),
        ("/usr/lib/systemd/system/lifeboat.service", 0o644),
        ("/usr/lib/systemd/system/lifeboat-restore.service", 0o644),
        ("/etc/lifeboat/lifeboat.toml", 0o640),
        (
            "/usr/share/lifeboat/ssm-documents/lifeboat-backup.json",
            0o644,
        ),
        (
            "/usr/share/lifeboat/ssm-documents/lifeboat-snapshot.json",
            0o644,
        ),
        (
            "/usr/share/lifeboat/ssm-documents/lifeboat-restore.json",
            0o644,
        ),
        ("/usr/lib/sysusers.d/lifeboat.conf", 0o644),
        (
            "/usr/share/lifeboat/ssm-documents/lifeboat-status.json",
            0o644,
        ),
        ("/usr/share/lifeboat/iam/instance-policy.json", 0o644),
        ("/usr/share/lifeboat/iam/lambda-policy.json", 0o644),
        ("/usr/share/lifeboat/cloudformation/lifeboat.yaml", 0o644),
        ("/usr/share/doc/lifeboat/README.md", 0o644),
        ("/usr/share/man/man1/lifeboat.1.gz", 0o644),
        ("/usr/share/man/man1/lifeboat-backup.1.gz", 0o644),
    ])
}

fn mode_bits(perms: &str) -> u32 {
    perms[1..10]
        .chars()
        .zip([0o400, 0o200, 0o100, 0o40, 0o20, 0o10, 0o4, 0o2, 0o1])
        .filter(|(c, _)| *c != '-')
        .map(|(_, bit)| bit)
        .sum()
}

#[test]
fn deb_ships_the_files_with_their_modes_and_the_config_as_a_conffile() {
    let deb = package("debian", "deb");
    let listing = text(&run(Command::new("dpkg-deb").arg("-c").arg(&deb)));
    let files: BTreeMap<String, (u32, String)> = listing
        .lines()
        .filter(|l| l.starts_with('-'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f[5].trim_start_matches('.').to_owned();
            (path, (mode_bits(f[0]), f[1].to_owned()))
        })
        .collect();
    for (path, mode) in expected_files() {
        let (got, owner) = files
            .get(path)
            .unwrap_or_else(|| panic!("{path} missing from the .deb:\n{listing}"));
        assert_eq!(*got, mode, "{path}: mode {got:o}");
        assert!(
            owner == "root/root" || owner == "0/0",
            "{path}: owner {owner}"
        );
    }
    let conffiles = text(&run(Command::new("sh").arg("-c").arg(format!(
        "dpkg-deb --ctrl-tarfile '{}' | tar -xOf - ./conffiles",
        deb.display()
    ))));
    assert_eq!(conffiles.trim(), "/etc/lifeboat/lifeboat.toml");
    let depends = text(&run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb)
        .arg("Depends")));
    // The user comes from sysusers.d; HTTPS to AWS needs the trust store.
    assert!(
        depends.contains("libc6")
            && depends.contains("systemd-sysusers")
            && depends.contains("ca-certificates")
            && !depends.contains("adduser"),
        "{depends}"
    );
}

#[test]
fn lintian_finds_no_errors() {
    let deb = package("debian", "deb");
    let out = Command::new("lintian")
        .args(["--fail-on", "error", "--no-tag-display-limit"])
        .arg(&deb)
        .output()
        .expect("lintian (scripts/bootstrap.sh installs it)");
    let report = text(&out);
    println!("lintian:\n{report}");
    assert!(out.status.success(), "lintian failed:\n{report}");
    assert!(!report.lines().any(|l| l.starts_with("E: ")), "{report}");
}

#[test]
fn rpm_ships_the_files_with_their_modes_and_the_config_as_noreplace() {
    let rpm = package("generate-rpm", "rpm");
    // path size mtime digest mode owner group isconfig isdoc rdev symlink
    let dump = text(&run(Command::new("rpm").args(["-qp", "--dump"]).arg(&rpm)));
    let files: BTreeMap<&str, Vec<&str>> = dump
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0], f)
        })
        .collect();
    for (path, mode) in expected_files() {
        let f = files
            .get(path)
            .unwrap_or_else(|| panic!("{path} missing from the .rpm:\n{dump}"));
        let got = u32::from_str_radix(f[4], 8).unwrap() & 0o7777;
        assert_eq!(got, mode, "{path}: mode {got:o}");
        assert_eq!((f[5], f[6]), ("root", "root"), "{path}");
        assert_eq!(
            f[7] == "1",
            path.starts_with("/etc/"),
            "{path}: config flag"
        );
    }
    let config = text(&run(Command::new("rpm")
        .args(["-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\\n]"])
        .arg(&rpm)));
    assert!(
        config.contains("/etc/lifeboat/lifeboat.toml cn"),
        "config(noreplace) expected:\n{config}"
    );
    assert!(files.contains_key("/usr/lib/systemd/system-preset/80-lifeboat.preset"));
    let scripts = text(&run(Command::new("rpm")
        .args(["-qp", "--scripts"])
        .arg(&rpm)));
    // The user from the sysusers.d line, in %pre (before the files are installed), not useradd.
    let line = std::fs::read_to_string(root().join("packaging/lifeboat.sysusers"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("u "))
        .unwrap()
        .to_owned();
    let pre = scripts
        .split("postinstall scriptlet")
        .next()
        .unwrap()
        .split("preinstall scriptlet")
        .nth(1)
        .unwrap_or_else(|| panic!("no %pre:\n{scripts}"));
    assert!(
        pre.contains("systemd-sysusers --replace=/usr/lib/sysusers.d/lifeboat.conf")
            && pre.contains(&line),
        "{scripts}"
    );
    assert!(!scripts.contains("useradd"), "{scripts}");
    assert!(scripts.contains("preset lifeboat.service"));
    let requires = text(&run(Command::new("rpm")
        .args(["-qp", "--requires"])
        .arg(&rpm)));
    assert!(requires.contains("ca-certificates"), "{requires}");
}

#[test]
fn rpmlint_finds_no_errors() {
    let rpm = package("generate-rpm", "rpm");
    let out = Command::new("rpmlint")
        .arg("-r")
        .arg(root().join("packaging/rpm/lifeboat.rpmlintrc"))
        .arg(&rpm)
        .output()
        .expect("rpmlint (scripts/bootstrap.sh installs it)");
    let report = text(&out);
    println!("rpmlint:\n{report}");
    let summary = report
        .lines()
        .find(|l| l.contains("errors") && l.contains("warnings"))
        .unwrap_or_else(|| panic!("no summary:\n{report}"));
    assert!(summary.contains(" 0 errors"), "{report}");
}

/// A scratch root with an empty dpkg database and stub commands that log their arguments.
struct Scratch {
    _dir: tempfile::TempDir,
    root: PathBuf,
    stubs: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let stubs = dir.path().join("stubs");
        for d in [
            "var/lib/dpkg/info",
            "var/lib/dpkg/updates",
            "var/lib/dpkg/triggers",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
        std::fs::create_dir_all(&stubs).unwrap();
        let log = dir.path().join("calls.log");
        for name in [
            "adduser",
            "deluser",
            "getent",
            "systemctl",
            "deb-systemd-helper",
            "deb-systemd-invoke",
        ] {
            // adduser makes the user exist for getent (as the real ones would); all record.
            let user = dir.path().join("user-exists");
            let action = match name {
                "getent" => format!("[ -e '{}' ]", user.display()),
                "adduser" => format!("touch '{}'", user.display()),
                "deluser" => format!("rm -f '{}'", user.display()),
                _ => "true".to_owned(),
            };
            std::fs::write(
                stubs.join(name),
                format!(
                    "#!/bin/sh\necho \"{name} $*\" >> '{}'\n{action}\n",
                    log.display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(
                stubs.join(name),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .unwrap();
        }
        Scratch {
            _dir: dir,
            root,
            stubs,
        }
    }

    fn dpkg(&self, args: &[&str]) -> Output {
        let path = format!(
            "{}:{}",
            self.stubs.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new("dpkg")
            .env("PATH", path)
            .arg(format!("--root={}", self.root.display()))
            .args([
                "--force-script-chrootless",
                "--force-depends",
                "--force-not-root",
                "--log=/dev/null",
            ])
            .args(args))
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.root.parent().unwrap().join("calls.log")).unwrap_or_default()
    }

    fn clear_calls(&self) {
        let _ = std::fs::remove_file(self.root.parent().unwrap().join("calls.log"));
    }
}

#[test]
fn deb_installs_upgrades_removes_and_purges_in_a_scratch_root() {
    let deb = package("debian", "deb");
    let s = Scratch::new();
    let deb = deb.to_str().unwrap();

    s.dpkg(&["-i", deb]);
    assert!(s.root.join("usr/bin/lifeboat").exists());
    let calls = s.calls();
    // The real systemd-sysusers applied the packaged sysusers.d file inside the scratch root.
    let users = |root: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(root.join("etc/passwd"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("lifeboat:"))
            .map(str::to_owned)
            .collect()
    };
    let user = users(&s.root);
    assert_eq!(user.len(), 1, "{user:?}");
    assert!(user[0].contains(":/var/lib/lifeboat:"), "{user:?}");
    assert!(!calls.contains("adduser"), "{calls}");
    assert!(
        calls.contains("deb-systemd-helper enable lifeboat.service"),
        "{calls}"
    );

    // Upgrade (reinstall): the operator's configuration stays.
    let config = s.root.join("etc/lifeboat/lifeboat.toml");
    std::fs::write(&config, "[s3]\nbucket = \"operators-bucket\"\n").unwrap();
    s.clear_calls();
    s.dpkg(&["--force-confold", "-i", deb]);
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .contains("operators-bucket")
    );
    assert_eq!(
        users(&s.root),
        user,
        "the user is the same after the upgrade"
    );

    // Remove: the binary goes, the configuration stays.
    s.clear_calls();
    s.dpkg(&["-r", "lifeboat"]);
    assert!(!s.root.join("usr/bin/lifeboat").exists());
    assert!(config.exists(), "remove deleted the configuration");
    assert!(
        s.calls()
            .contains("deb-systemd-helper mask lifeboat.service")
    );

    // Purge: configuration and state go (inside the scratch root only), and the user.
    std::fs::create_dir_all(s.root.join("var/lib/lifeboat")).unwrap();
    std::fs::write(s.root.join("var/lib/lifeboat/state.json"), "{}").unwrap();
    s.clear_calls();
    s.dpkg(&["-P", "lifeboat"]);
    assert!(!config.exists());
    assert!(!s.root.join("var/lib/lifeboat").exists());
    let calls = s.calls();
    assert!(
        calls.contains("deb-systemd-helper purge lifeboat.service"),
        "{calls}"
    );
    assert!(!calls.contains("deluser"), "{calls}");
}

#[test]
fn the_packaged_binary_needs_glibc_2_34_at_most() {
    // Amazon Linux 2023 and RHEL 9 ship glibc 2.34; Debian 12 2.36; Ubuntu 22.04 2.35.
    let deb = package("debian", "deb");
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dir.path()));
    let symbols = text(&run(Command::new("objdump")
        .arg("-T")
        .arg(dir.path().join("usr/bin/lifeboat"))));
    let newest = symbols
        .split("GLIBC_2.")
        .skip(1)
        .filter_map(|s| {
            s.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse::<u32>().ok())
        })
        .max()
        .unwrap();
    println!("the packaged binary needs GLIBC_2.{newest}");
    assert!(newest <= 34, "needs GLIBC_2.{newest}");
}
