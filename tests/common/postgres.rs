//! A real PostgreSQL for the tests that run on both stores. `STORYGPT_TEST_POSTGRES` may name
//! an administrator URL of a running server (postgres://postgres@127.0.0.1:5432/postgres);
//! without it, the first test that needs one starts a private cluster with the PostgreSQL
//! binaries Debian's `postgresql` package installs (`initdb`, `postgres`; about a second),
//! on a free port, which stops and is deleted when the test process ends.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Which database a test server keeps its records in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded default: `storygpt-v.db` in the data directory.
    Sqlite,
    /// `--database postgres://...`: a database of the test cluster.
    Postgres,
}

impl Backend {
    /// The `--database` URL a server on `data_dir` gets (`None` for SQLite). The database is
    /// made on first use and named after the directory.
    pub fn database_url(self, data_dir: &Path) -> Option<String> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres => Some(database_for(data_dir)),
        }
    }
}

struct Cluster {
    /// Administrator URL without the database name (`postgres://postgres@127.0.0.1:PORT`).
    base: String,
    /// Where psql is.
    bin: PathBuf,
}

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let bin = binaries();
        match std::env::var("STORYGPT_TEST_POSTGRES") {
            Ok(url) if !url.is_empty() => {
                let base = url
                    .rsplit_once('/')
                    .filter(|(head, _)| head.contains("://") && !head.ends_with('/'))
                    .map(|(head, _)| head.to_string())
                    .unwrap_or(url);
                Cluster { base, bin }
            }
            _ => start_private(bin),
        }
    })
}

/// The directory of the PostgreSQL server binaries (the newest Debian version installed).
fn binaries() -> PathBuf {
    if let Some(dir) = std::env::var_os("STORYGPT_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.retain(|dir| dir.join("initdb").exists());
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!(
            "these tests need PostgreSQL: install Debian's `postgresql` package (what .ci/run \
             does), or set STORYGPT_TEST_POSTGRES to an administrator URL of a running server"
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `program` as the `postgres` user when running as root (PostgreSQL refuses root).
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

fn start_private(bin: PathBuf) -> Cluster {
    let root = std::env::temp_dir().join(format!("storygpt-v-pg-{}", std::process::id()));
    let data = root.join("data");
    std::fs::create_dir_all(&root).expect("make the cluster directory");
    if is_root() {
        let status = Command::new("chown")
            .args(["postgres:"])
            .arg(&root)
            .status()
            .expect("chown");
        assert!(
            status.success(),
            "cannot give {} to the postgres user",
            root.display()
        );
    }
    let out = as_server_user(&bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
        .output()
        .expect("run initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    // A watchdog shell starts the server and stops it (immediate shutdown: nothing to keep) once
    // this test process has gone, whichever way it ended, then deletes the cluster.
    let mut server: Vec<String> = Vec::new();
    if is_root() {
        server.extend(["runuser", "-u", "postgres", "--"].map(String::from));
    }
    server.push(bin.join("postgres").display().to_string());
    server.extend([
        "-D".into(),
        data.display().to_string(),
        "-p".into(),
        port.to_string(),
    ]);
    server.extend(["-k".into(), root.display().to_string()]);
    for setting in [
        "listen_addresses=127.0.0.1",
        "fsync=off",
        "synchronous_commit=off",
        "max_connections=300",
    ] {
        server.extend(["-c".into(), setting.to_string()]);
    }
    let quote = |args: &[String]| {
        args.iter()
            .map(|arg| format!("'{}'", arg.replace('\'', "'\\''")))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut stop: Vec<String> = Vec::new();
    if is_root() {
        stop.extend(["runuser", "-u", "postgres", "--"].map(String::from));
    }
    stop.push(bin.join("pg_ctl").display().to_string());
    stop.extend(["-D".into(), data.display().to_string()]);
    stop.extend(["-m", "immediate", "-w", "stop"].map(String::from));
    // The server is stopped with pg_ctl, not a signal to the shell's child: as root that
    // child is `runuser`, which does not pass signals on.
    let script = format!(
        "{server} >{log} 2>&1 & \
         while kill -0 {parent} 2>/dev/null; do sleep 1; done; \
         {stop} >/dev/null 2>&1; rm -rf {root}",
        server = quote(&server),
        stop = quote(&stop),
        log = root.join("server.log").display(),
        parent = std::process::id(),
        root = root.display(),
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start postgres");
    let base = format!("postgres://postgres@127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        let ready = Command::new(bin.join("pg_isready"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-q",
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ready {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "PostgreSQL did not start; its log:\n{}",
            std::fs::read_to_string(root.join("server.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Cluster { base, bin }
}

/// Runs one SQL statement as the administrator, in database `database`.
pub fn admin_sql(database: &str, sql: &str) -> Result<String, String> {
    let cluster = cluster();
    let out = Command::new(cluster.bin.join("psql"))
        .arg(format!("{}/{database}", cluster.base))
        .args(["-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// The URL of a database named after `data_dir`, made if it does not exist yet.
pub fn database_for(data_dir: &Path) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    data_dir.hash(&mut hasher);
    let name = format!("t{:016x}", hasher.finish());
    let exists = admin_sql(
        "postgres",
        &format!("SELECT 1 FROM pg_database WHERE datname = '{name}'"),
    )
    .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL: {e}"));
    if exists != "1" {
        admin_sql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("cannot make database {name}: {e}"));
    }
    format!("{}/{name}", cluster().base)
}
