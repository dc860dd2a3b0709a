//! TLS for a benchmark's services, so that a run can compare plain HTTP
//! with the product's default, HTTPS everywhere under a fleet CA (issue 15).
//!
//! A run that has any `--tls on` makes one [`Fleet`] in its work directory
//! before any client: its CA (`cloudlet_trust::pki::init`) is trusted by
//! every client this process makes (`cloudlet_trust::tls::trust_fleet_ca`,
//! process-wide, hence one CA for the whole run), and each service gets a
//! certificate for the address it is reached on ([`Fleet::service`]). A
//! [`ServiceTls`] then says how to start that service and how to call it:
//! the scheme, a cloudletd config's lines, a `registry serve`'s flags.

use std::ffi::OsString;
use std::fmt::Display;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use cloudlet_trust::pki;
use cloudlet_trust::tls::TlsConfig;

/// How long a benchmark's certificates are valid.
const DAYS: u32 = 2;

/// Plain HTTP (`off`) or HTTPS with mutual TLS between cloudlets (`on`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum TlsMode {
    Off,
    On,
}

impl TlsMode {
    /// `"TLS off"` / `"TLS on"`, for tables.
    pub fn label(self) -> &'static str {
        match self {
            TlsMode::Off => "TLS off",
            TlsMode::On => "TLS on",
        }
    }

    /// `"off"` / `"on"`, for file names.
    pub fn word(self) -> &'static str {
        match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
        }
    }

    /// The TLS of service `name` reached on `host` in this mode: plain, or
    /// a certificate of `fleet` (which a run with `on` must have).
    pub fn service(
        self,
        fleet: Option<&Fleet>,
        name: &str,
        host: IpAddr,
    ) -> anyhow::Result<ServiceTls> {
        match self {
            TlsMode::Off => Ok(ServiceTls::plain()),
            TlsMode::On => fleet
                .context("TLS on without a fleet CA (Fleet::for_modes makes it)")?
                .service(name, host),
        }
    }
}

/// The modes of `--tls`, each once, in the order given.
pub fn distinct_modes(modes: &[TlsMode]) -> Vec<TlsMode> {
    let mut out: Vec<TlsMode> = Vec::new();
    for m in modes {
        if !out.contains(m) {
            out.push(*m);
        }
    }
    out
}

/// The title of a table comparing `modes` (the first is the baseline).
pub fn comparison_title(modes: &[TlsMode]) -> String {
    let base = modes.first().map_or("the first mode", |m| m.label());
    format!("TLS on vs off, medians over the runs that completed (n); diff = how much longer than {base}")
}

/// Column heads of a comparison table: `WHAT MODE` for each mode, each
/// `width` wide, then with `diff` a `diff MODE` for each mode after the
/// first (9 wide).
pub fn mode_columns(what: &str, modes: &[TlsMode], width: usize, diff: bool) -> String {
    let mut head = String::new();
    for m in modes {
        head += &format!(" {:>width$}", format!("{what} {}", m.word()));
    }
    if diff {
        for m in modes.iter().skip(1) {
            head += &format!(" {:>9}", format!("diff {}", m.word()));
        }
    }
    head
}

/// A fleet CA made for one benchmark run, trusted by this process.
pub struct Fleet {
    ca_dir: PathBuf,
    certs: PathBuf,
}

impl Fleet {
    /// A fleet in `dir` (`dir/ca`, certificates in `dir/certs`) when
    /// `modes` has `on`; its CA trusted by every client made from now on.
    pub fn for_modes(modes: &[TlsMode], dir: &Path) -> anyhow::Result<Option<Fleet>> {
        if !modes.contains(&TlsMode::On) {
            return Ok(None);
        }
        let fleet = Fleet {
            ca_dir: dir.join("ca"),
            certs: dir.join("certs"),
        };
        let ca = pki::init(&fleet.ca_dir, "bench", DAYS)
            .with_context(|| format!("making the fleet CA in {}", fleet.ca_dir.display()))?;
        cloudlet_trust::tls::trust_fleet_ca(&ca)?;
        Ok(Some(fleet))
    }

    /// The CA's certificate.
    pub fn ca(&self) -> PathBuf {
        pki::ca_paths(&self.ca_dir).0
    }

    /// A certificate for service `name` reached on `host` (issued again,
    /// in place, if it exists).
    pub fn service(&self, name: &str, host: IpAddr) -> anyhow::Result<ServiceTls> {
        let issued = pki::issue(&self.ca_dir, name, &[host.to_string()], &self.certs, DAYS)
            .with_context(|| format!("issuing the certificate of {name}"))?;
        Ok(ServiceTls(Some(TlsConfig {
            cert: issued.cert,
            key: issued.key,
            ca: self.ca(),
        })))
    }
}

/// How one service serves: plain HTTP or TLS with these files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceTls(Option<TlsConfig>);

impl ServiceTls {
    pub fn plain() -> ServiceTls {
        ServiceTls(None)
    }

    pub fn config(&self) -> Option<&TlsConfig> {
        self.0.as_ref()
    }

    pub fn scheme(&self) -> &'static str {
        match self.0 {
            Some(_) => "https",
            None => "http",
        }
    }

    /// `SCHEME://addr`.
    pub fn url(&self, addr: impl Display) -> String {
        format!("{}://{addr}", self.scheme())
    }

    /// The lines of a cloudletd config that serve at `addr`: its
    /// `advertise_url`, then `plain_http = true` or the `[tls]` table.
    /// Put them last: the table takes every key after it.
    pub fn daemon_toml(&self, addr: impl Display) -> String {
        let advertise = format!("advertise_url = \"{}\"\n", self.url(addr));
        match &self.0 {
            None => format!("{advertise}plain_http = true\n"),
            Some(t) => format!(
                "{advertise}[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
                t.cert.display(),
                t.key.display(),
                t.ca.display()
            ),
        }
    }

    /// The flags of `cloudlet registry serve` (or `directory serve`):
    /// `--plain-http`, or `--tls-cert F --tls-key F --tls-ca F`.
    pub fn serve_args(&self) -> Vec<OsString> {
        match &self.0 {
            None => vec!["--plain-http".into()],
            Some(t) => vec![
                "--tls-cert".into(),
                t.cert.clone().into(),
                "--tls-key".into(),
                t.key.clone().into(),
                "--tls-ca".into(),
                t.ca.clone().into(),
            ],
        }
    }

    /// The flags that make a `cloudlet` client command trust the fleet
    /// (`--ca F`); none for plain HTTP.
    pub fn client_args(&self) -> Vec<OsString> {
        match &self.0 {
            None => Vec::new(),
            Some(t) => vec!["--ca".into(), t.ca.clone().into()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_is_plain_and_on_serves_a_certificate_of_the_fleet() {
        let dir = tempfile::tempdir().unwrap();
        let host: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(Fleet::for_modes(&[TlsMode::Off], dir.path())
            .unwrap()
            .is_none());
        let plain = TlsMode::Off.service(None, "svc", host).unwrap();
        assert_eq!(plain.url("10.0.0.1:80"), "http://10.0.0.1:80");
        assert_eq!(
            plain.daemon_toml("10.0.0.1:80"),
            "advertise_url = \"http://10.0.0.1:80\"\nplain_http = true\n"
        );
        assert_eq!(plain.serve_args(), vec![OsString::from("--plain-http")]);
        assert!(plain.client_args().is_empty());
        assert!(TlsMode::On.service(None, "svc", host).is_err());

        let fleet = Fleet::for_modes(&[TlsMode::Off, TlsMode::On], dir.path())
            .unwrap()
            .unwrap();
        let on = TlsMode::On.service(Some(&fleet), "svc", host).unwrap();
        let t = on.config().unwrap().clone();
        assert!(t.cert.is_file() && t.key.is_file() && t.ca.is_file());
        assert_eq!(t.ca, fleet.ca());
        let toml = on.daemon_toml("10.0.0.1:80");
        assert!(toml.starts_with("advertise_url = \"https://10.0.0.1:80\"\n[tls]\n"));
        assert!(!toml.contains("plain_http"), "{toml}");
        assert_eq!(on.serve_args().len(), 6);
        assert_eq!(on.client_args()[0], OsString::from("--ca"));
        // The certificate is TLS's to load, key and all.
        cloudlet_trust::tls::server_config(&t).unwrap();
        // Issued again in place (a benchmark restarts its services).
        assert_eq!(fleet.service("svc", host).unwrap(), on);
    }

    #[test]
    fn modes_are_kept_in_order_once_each() {
        use TlsMode::*;
        assert_eq!(distinct_modes(&[On, Off, On]), vec![On, Off]);
    }
}
