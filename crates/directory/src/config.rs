//! `DirectoryConfig`: what an operator gives the directory (a TOML file;
//! every field has an embedded default, so `cloudlet directory serve` runs
//! with no file at all).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DirectoryConfig {
    /// Where the REST API listens.
    pub listen: SocketAddr,
    /// The embedded store's file (default: `$CLOUDLET_HOME/directory.redb`).
    pub store: PathBuf,
    /// etcd endpoints (`http://host:2379`): a fleet of directory instances
    /// sharing one view. Empty: the embedded store.
    pub etcd: Vec<String>,
    /// The prefix of every etcd key of this directory.
    pub etcd_prefix: String,
    /// How often cloudlets are asked to heartbeat, ms.
    pub heartbeat_ms: u64,
    /// How long an entry lives after a heartbeat, ms (more than two
    /// heartbeats: a cloudlet that missed two is gone).
    pub lease_ms: u64,
    /// Cloudlets and their credentials, bound in advance.
    pub cloudlets: Vec<CloudletCredential>,
    /// A cloudlet not listed may register: its name is then bound to the
    /// credential of its first registration (no one else can take it).
    pub open_enrollment: bool,
    /// Bearer tokens of devices allowed to search and watch.
    pub device_tokens: Vec<String>,
    /// Searches and watches without a token.
    pub anonymous_search: bool,
    /// Serve HTTPS only, with these files (`cloudlet pki issue`).
    pub tls: Option<cloudlet_trust::tls::TlsConfig>,
    /// Without `tls`, serve plain HTTP on an address other than loopback
    /// anyway (refused otherwise).
    pub plain_http: bool,
}

/// A cloudlet allowed to register, with its credential.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudletCredential {
    pub name: String,
    pub token: String,
}

pub const DEFAULT_PORT: u16 = 7470;

impl Default for DirectoryConfig {
    fn default() -> Self {
        let home = cloudlet_base::default_home();
        DirectoryConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            store: home.join("directory.redb"),
            etcd: vec![],
            etcd_prefix: "/cloudlet/directory".into(),
            heartbeat_ms: 5_000,
            lease_ms: 12_000,
            cloudlets: vec![],
            open_enrollment: true,
            device_tokens: vec![],
            anonymous_search: true,
            tls: None,
            plain_http: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("Invalid config {path}: {detail}")]
    Parse { path: String, detail: String },
    #[error("Invalid config: {0}")]
    Invalid(String),
    #[error(transparent)]
    Exposed(#[from] cloudlet_trust::secrets::SecretError),
}

impl DirectoryConfig {
    /// Read a TOML file; missing fields take their defaults. A file that
    /// holds credentials (cloudlets' or devices') must be readable by its
    /// owner only.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        let c: DirectoryConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        c.check()?;
        if !c.cloudlets.is_empty() || !c.device_tokens.is_empty() {
            cloudlet_trust::secrets::check_private(path)?;
        }
        Ok(c)
    }

    /// The settings that cannot work together.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.heartbeat_ms == 0 {
            return Err(ConfigError::Invalid("heartbeat_ms must be above 0".into()));
        }
        cloudlet_trust::tls::check_plain_http(self.listen, self.tls.is_some(), self.plain_http)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.lease_ms <= self.heartbeat_ms {
            return Err(ConfigError::Invalid(format!(
                "lease_ms ({}) must be longer than heartbeat_ms ({}): every entry would expire between heartbeats",
                self.lease_ms, self.heartbeat_ms
            )));
        }
        if !self.etcd.is_empty() && self.lease_ms < 2_000 {
            return Err(ConfigError::Invalid(
                "with etcd, lease_ms must be at least 2000 (etcd leases count whole seconds)"
                    .into(),
            ));
        }
        for c in &self.cloudlets {
            if c.token.len() < 16 {
                return Err(ConfigError::Invalid(format!(
                    "the credential of cloudlet {} is shorter than 16 characters",
                    c.name
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_file_keeps_defaults_and_typos_are_refused() {
        let c: DirectoryConfig = toml::from_str("lease_ms = 9000\nheartbeat_ms = 3000\n").unwrap();
        assert_eq!(c.lease_ms, 9000);
        assert!(c.anonymous_search);
        assert!(toml::from_str::<DirectoryConfig>("lease = 9").is_err());
    }

    #[test]
    fn a_lease_shorter_than_a_heartbeat_is_refused() {
        let c = DirectoryConfig {
            lease_ms: 4000,
            ..DirectoryConfig::default()
        };
        assert!(c.check().is_err());
        assert!(DirectoryConfig::default().check().is_ok());
    }
}
