//! Service configuration: defaults, an optional TOML file, environment variables and flags,
//! merged in that order of increasing precedence (the CLI resolves flags and environment).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

/// Default listen address.
pub const DEFAULT_BIND: &str = "127.0.0.1:8080";
/// Default data directory (holds the SQLite database).
pub const DEFAULT_DATA_DIR: &str = "./data";
/// Largest accepted portrait upload.
pub const MAX_PORTRAIT_BYTES: usize = 10 * 1024 * 1024;
/// Hard cap on the body of an upload route. Portraits are limited to 10 MiB by the handlers,
/// which read (and discard) an oversized upload up to this cap so the client gets a clean 413
/// rather than a reset connection; bodies beyond it are cut off at once. Other routes keep
/// axum's 2 MiB default, plenty for 200 captions.
pub const UPLOAD_BODY_LIMIT: usize = 32 * 1024 * 1024;

/// The settings a TOML config file may hold; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address to listen on, e.g. "0.0.0.0:8080".
    pub bind: Option<String>,
    /// Directory for the database and other state.
    pub data_dir: Option<PathBuf>,
}

impl FileConfig {
    /// Reads and validates a config file; unknown keys are an error so typos do not pass silently.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }
}

/// The resolved configuration the server runs with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Socket address to bind.
    pub bind: SocketAddr,
    /// Directory holding `storygpt-v.db`.
    pub data_dir: PathBuf,
}

impl ServeConfig {
    /// Merges explicit values (flags or environment, already resolved) over the file config
    /// over the defaults.
    pub fn resolve(
        bind: Option<String>,
        data_dir: Option<PathBuf>,
        file: FileConfig,
    ) -> anyhow::Result<Self> {
        let bind_text = bind
            .or(file.bind)
            .unwrap_or_else(|| DEFAULT_BIND.to_string());
        let bind = parse_bind(&bind_text)?;
        let data_dir = data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        if data_dir.as_os_str().is_empty() {
            bail!("the data directory must not be empty");
        }
        Ok(Self { bind, data_dir })
    }

    /// Path of the SQLite database inside the data directory.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("storygpt-v.db")
    }
}

fn parse_bind(text: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    text.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .with_context(|| {
            format!("invalid bind address {text:?}: expected HOST:PORT such as 127.0.0.1:8080")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_values_win_over_file_and_defaults() {
        let file = FileConfig {
            bind: Some("0.0.0.0:9000".into()),
            data_dir: Some("/srv/a".into()),
        };
        let cfg = ServeConfig::resolve(Some("127.0.0.1:7000".into()), None, file).unwrap();
        assert_eq!(cfg.bind.port(), 7000);
        assert_eq!(cfg.data_dir, PathBuf::from("/srv/a"));
        let cfg = ServeConfig::resolve(None, None, FileConfig::default()).unwrap();
        assert_eq!(cfg.bind.to_string(), DEFAULT_BIND);
        assert_eq!(cfg.database_path(), PathBuf::from("./data/storygpt-v.db"));
    }

    #[test]
    fn bad_bind_and_unknown_keys_are_refused() {
        assert!(
            ServeConfig::resolve(Some("nonsense".into()), None, FileConfig::default()).is_err()
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "bnd = \"1.2.3.4:5\"\n").unwrap();
        let err = FileConfig::load(&path).unwrap_err();
        assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
    }
}
