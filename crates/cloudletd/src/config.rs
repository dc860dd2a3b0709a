//! `CloudletConfig`: what an operator gives a cloudlet (a TOML file; every
//! field has an embedded default, so `cloudletd` runs with no file at all).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cloudlet_api::{Flavor, Location, Resources};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudletConfig {
    /// This cloudlet's name (default: the host name).
    pub name: String,
    pub location: Location,
    /// Where the REST API listens.
    pub listen: SocketAddr,
    /// Host name or address clients use to reach VM ports.
    pub public_host: String,
    /// Base VMs and the state store (default: `$CLOUDLET_HOME`).
    pub home: PathBuf,
    /// Where running VMs' RAM files live (a tmpfs is fastest).
    pub vm_dir: PathBuf,
    /// What this cloudlet may hand out.
    pub capacity: Resources,
    pub flavors: Vec<Flavor>,
    pub default_flavor: String,
    /// The operator's bearer tokens: every call, every VM.
    pub tokens: Vec<String>,
    /// Tenants: each holds credentials of its own and sees, moves and
    /// deletes only its own VMs (another tenant's VM is not found), within
    /// its quota. A VM created with an operator token belongs to no tenant.
    pub tenants: Vec<Tenant>,
    /// Host ports handed to VM port forwards: `[first, last]`.
    pub host_ports: [u16; 2],
    /// The host address VM port forwards listen on: where the apps'
    /// clients come from. Default: `public_host` when it is an IP address
    /// (the endpoint clients are given), else every address (`0.0.0.0`,
    /// said in the log at start). A forward on every address is reachable
    /// from every network of the host.
    pub vm_port_bind: Option<std::net::IpAddr>,
    /// Other cloudlets VMs may be handed off to, with the token each accepts.
    pub peers: Vec<Peer>,
    /// This cloudlet's own API address as devices and peers reach it (in
    /// records and in the directory; default: `http://public_host:port`
    /// of `listen`).
    pub advertise_url: Option<String>,
    /// The cloud tier's directory: its instances' URLs (none: this
    /// cloudlet does not join one). The cloudlet registers, heartbeats
    /// what it holds and has free, learns its handoff peers there and
    /// deregisters on shutdown (`crate::directory`).
    pub directory: Vec<String>,
    /// This cloudlet's credential at the directory (default: a random one
    /// made once and kept in `home/directory-credential`).
    pub directory_token: Option<String>,
    /// Networks this cloudlet serves (CIDRs): devices in them are ranked
    /// to it first.
    pub networks: Vec<String>,
    /// Base VMs (names or ids) it does not hold but can get: the
    /// directory ranks it as holding them.
    pub obtainable_bases: Vec<String>,
    /// Before a handoff commits, compare digests of the whole moved memory
    /// (per page and per MiB, `cloudlet_handoff::memcheck`): the destination
    /// resumes only an identical copy (the VM otherwise stays where it
    /// was). ~30-100 ms per GiB inside the downtime. As a destination, also
    /// refuse a move that comes without the source's digest. On by default:
    /// QEMU 7.2 under TCG was seen to lose dirty pages in some moves.
    pub verify_memory: bool,
    /// With `verify_memory`: when a few MiB of the moved memory differ, the
    /// source sends its pages that differ and the destination writes them
    /// into the paused VM's RAM (then compares again) instead of failing
    /// the move. On by default.
    pub handoff_repair_memory: bool,
    /// Tests only: as a destination, alter this many pages of the moved
    /// memory after QEMU loaded it (what a lost page looks like), so that a
    /// test can see the verification catch it. 0 (off) by default.
    pub handoff_test_corrupt_pages: u32,
    /// Tests only: speak this handoff protocol version instead of
    /// [`cloudlet_api::HANDOFF_PROTOCOL`] (a peer of another release).
    pub handoff_test_protocol: Option<u32>,
    /// Tests only: as a destination, exit the process right after the
    /// commit is stored, before the VM resumes and the source has its
    /// answer (a crash at the worst moment). Off by default.
    pub handoff_test_exit_after_commit: bool,
    /// Only with `verify_memory`: cap QEMU's rate during a handoff so that
    /// its own switchover decision reflects the link (see
    /// `handoff::CAP_MARGIN`). Sub-0.5 s downtime over 25 Mbit/s, where
    /// QEMU's own decision, made from a rate that counts pages equal to the
    /// base, left seconds. More passes, and QEMU 7.2 (TCG) then lost pages
    /// in some moves: caught by the verification and repaired
    /// (`handoff_repair_memory`; otherwise the handoff fails and the VM
    /// stays). On by default.
    pub handoff_rate_cap: bool,
    /// Early start: resume a synthesized VM as soon as its device state and
    /// disk have arrived and stream its memory in behind it (QEMU postcopy;
    /// needs `vm_dir` on a tmpfs). On by default.
    pub early_start: bool,
    /// Keys whose overlay signatures this cloudlet accepts: the lines of
    /// `cloudlet overlay keygen`'s `.pub` files (`cloudlet-ed25519 SIGNER
    /// HEX`); several, for rotation. Given any, an overlay signed by
    /// another key is refused. A signed overlay must verify and be
    /// unexpired whatever this holds. Judged from the header and manifest,
    /// before any segment is fetched.
    pub trusted_keys: Vec<cloudlet_overlay::signature::TrustedKey>,
    /// Refuse unsigned overlays (needs `trusted_keys`).
    pub require_signed_overlays: bool,
    /// Serve the API over TLS only (`cert`, `key` from `cloudlet pki
    /// issue`, `ca` the fleet's): the handoff endpoints then take only
    /// callers with a certificate of the fleet CA (mutual TLS between
    /// cloudlets), and this cloudlet calls its peers with its own
    /// certificate, trusting only the fleet CA.
    pub tls: Option<cloudlet_trust::tls::TlsConfig>,
    /// Serve plain HTTP on an address other than loopback (no `tls`):
    /// credentials and overlays then cross the network in the clear. Off by
    /// default: such a listener refuses to start without it. A listener on
    /// loopback (the default, `127.0.0.1:7450`) serves plain HTTP anyway.
    pub plain_http: bool,
    /// QEMU confined (`cloudlet_qemu::confine`): `[confine]`.
    pub confine: ConfineConfig,
}

/// A name of a VM or a tenant: 1-63 letters, digits, '-' or '_'.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A tenant of the cloudlet (`[[tenants]]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    /// Its name, as VMs record it (1-63 letters, digits, '-' or '_').
    pub name: String,
    /// Its bearer tokens (several, for rotation).
    pub tokens: Vec<String>,
    /// What its VMs may hold together on this cloudlet.
    #[serde(default)]
    pub quota: Quota,
}

/// A tenant's limits on one cloudlet (each unset: only the cloudlet's
/// capacity limits it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub vms: Option<u32>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
}

/// Each VM's QEMU under a uid of its own, in a cgroup of its own with the
/// flavor's limits, under QEMU's seccomp sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfineConfig {
    /// On or off (unset: on). Only a daemon running as root can give
    /// QEMU another uid: a non-root one runs it unconfined, said in the log
    /// at start. QEMU 7.2 asks the kernel for a userfaultfd without
    /// `UFFD_USER_MODE_ONLY`, which an unprivileged process gets only where
    /// `vm.unprivileged_userfaultfd` is 1 (`make deps` sets it, in
    /// /etc/sysctl.d/60-cloudlet.conf): where it is 0 (Debian's default) a
    /// confined QEMU takes no early start (postcopy) and a synthesis waits
    /// for the whole memory, said in the log at start and by `cloudlet
    /// doctor`.
    pub enabled: Option<bool>,
    /// The uids (and gids) VMs' QEMUs run under: `[first, last]`. No passwd
    /// entries needed; keep the range free of other users.
    pub uids: [u32; 2],
    /// Where uid claims are kept (shared by the cloudlets of a host).
    pub claims_dir: PathBuf,
    /// Memory allowed beyond the flavor's, for QEMU itself.
    pub memory_overhead_mib: u64,
}

impl Default for ConfineConfig {
    fn default() -> Self {
        ConfineConfig {
            enabled: None,
            uids: [200_000, 200_999],
            claims_dir: PathBuf::from(cloudlet_qemu::confine::DEFAULT_CLAIMS_DIR),
            memory_overhead_mib: cloudlet_qemu::confine::DEFAULT_MEMORY_OVERHEAD_MIB,
        }
    }
}

impl ConfineConfig {
    /// Whether VMs are confined: asked for (or by default) and possible.
    pub fn active(&self) -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        self.enabled.unwrap_or(true) && root
    }

    /// What a VM of `flavor` is confined by, when confinement is active.
    pub fn for_flavor(&self, flavor: &Flavor) -> Option<cloudlet_qemu::confine::Confinement> {
        self.active().then(|| cloudlet_qemu::confine::Confinement {
            uid: None,
            uids: self.uids,
            claims: self.claims_dir.clone(),
            memory_mib: flavor.memory_mib,
            overhead_mib: self.memory_overhead_mib,
            vcpus: flavor.vcpus,
        })
    }

    /// What is in effect, for the start log.
    pub fn describe(&self) -> String {
        if self.active() {
            let cg = match cloudlet_qemu::confine::Cgroups::host() {
                Some(cloudlet_qemu::confine::Cgroups::V2 { .. }) => "cgroup v2",
                Some(cloudlet_qemu::confine::Cgroups::V1 { .. }) => "cgroup v1",
                None => "NO cgroup with memory and cpu under /sys/fs/cgroup: no limits",
            };
            let early = if unprivileged_userfaultfd() {
                "early start"
            } else {
                "NO early start (vm.unprivileged_userfaultfd = 0: run `sysctl -w vm.unprivileged_userfaultfd=1`, or make deps)"
            };
            format!(
                "on: a uid of [{}, {}] per VM, {cg}, seccomp sandbox, {early}",
                self.uids[0], self.uids[1]
            )
        } else if self.enabled == Some(true) {
            "off: the daemon is not root and cannot give QEMU another uid".into()
        } else if self.enabled.is_none() {
            "off: the daemon is not root".into()
        } else {
            "off ([confine] enabled = false)".into()
        }
    }
}

/// Whether processes without privileges may use userfaultfd (postcopy):
/// `vm.unprivileged_userfaultfd` is 1.
pub fn unprivileged_userfaultfd() -> bool {
    std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").is_ok_and(|s| s.trim() == "1")
}

/// Another cloudlet.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub url: String,
    pub token: String,
}

impl Default for CloudletConfig {
    fn default() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "cloudlet".into());
        let mem_mib = host_memory_mib();
        CloudletConfig {
            name: host,
            location: Location::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7450)),
            public_host: "127.0.0.1".into(),
            home: cloudlet_base::default_home(),
            vm_dir: cloudlet_base::default_vm_dir(),
            capacity: Resources {
                vcpus: 2 * std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
                memory_mib: mem_mib * 3 / 4,
                vms: 16,
            },
            flavors: vec![
                Flavor {
                    name: "small".into(),
                    vcpus: 1,
                    memory_mib: 512,
                },
                Flavor {
                    name: "large".into(),
                    vcpus: 2,
                    memory_mib: 1024,
                },
            ],
            default_flavor: "small".into(),
            tokens: vec![],
            tenants: vec![],
            host_ports: [20000, 29999],
            vm_port_bind: None,
            peers: vec![],
            advertise_url: None,
            directory: vec![],
            directory_token: None,
            networks: vec![],
            obtainable_bases: vec![],
            verify_memory: true,
            handoff_repair_memory: true,
            handoff_test_corrupt_pages: 0,
            handoff_test_protocol: None,
            handoff_test_exit_after_commit: false,
            handoff_rate_cap: true,
            early_start: true,
            trusted_keys: vec![],
            require_signed_overlays: false,
            tls: None,
            plain_http: false,
            confine: ConfineConfig::default(),
        }
    }
}

fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(4096, |kb| kb / 1024)
}

impl CloudletConfig {
    /// Where VM port forwards listen ([`CloudletConfig::vm_port_bind`]).
    pub fn port_bind(&self) -> std::net::IpAddr {
        self.vm_port_bind
            .or_else(|| self.public_host.parse().ok())
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    /// Read a TOML file; missing fields take their defaults. A file that
    /// holds credentials (tokens, peer tokens, the directory token) must
    /// be readable by its owner only (`cloudlet_trust::secrets`).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("Cannot read {}: {e}", path.display()))?;
        let c: CloudletConfig = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("Invalid config {}: {e}", path.display()))?;
        if c.holds_credentials() {
            cloudlet_trust::secrets::check_private(path)?;
        }
        c.check_tenants()
            .map_err(|e| anyhow::anyhow!("Invalid config {}: {e}", path.display()))?;
        if c.require_signed_overlays && c.trusted_keys.is_empty() {
            anyhow::bail!(
                "Invalid config {}: require_signed_overlays needs trusted_keys (the .pub lines of `cloudlet overlay keygen`): every overlay would be refused",
                path.display()
            );
        }
        Ok(c)
    }

    /// What this cloudlet accepts of overlays' signatures.
    pub fn signature_policy(&self) -> cloudlet_overlay::signature::SignaturePolicy {
        cloudlet_overlay::signature::SignaturePolicy {
            required: self.require_signed_overlays,
            trusted: self.trusted_keys.clone(),
        }
    }

    /// Tokens of its own, its tenants' or its peers', or a directory
    /// credential.
    pub fn holds_credentials(&self) -> bool {
        !self.tokens.is_empty()
            || !self.tenants.is_empty()
            || !self.peers.is_empty()
            || self.directory_token.is_some()
    }

    /// Tenants have valid, distinct names and tokens of their own: a token
    /// means one caller (an operator's token or another tenant's would make
    /// whose VMs it sees depend on the order of a list).
    pub fn check_tenants(&self) -> Result<(), String> {
        let mut seen: std::collections::HashSet<&str> =
            self.tokens.iter().map(String::as_str).collect();
        let mut names = std::collections::HashSet::new();
        for t in &self.tenants {
            if !valid_name(&t.name) {
                return Err(format!(
                    "tenant name {:?}: use 1-63 letters, digits, '-' or '_'",
                    t.name
                ));
            }
            if !names.insert(t.name.as_str()) {
                return Err(format!("tenant {:?} is given twice", t.name));
            }
            if t.tokens.is_empty() {
                return Err(format!("tenant {:?} has no tokens", t.name));
            }
            for k in &t.tokens {
                if k.len() < 16 {
                    return Err(format!(
                        "a token of tenant {:?} is shorter than 16 characters",
                        t.name
                    ));
                }
                if !seen.insert(k.as_str()) {
                    return Err(format!(
                        "a token of tenant {:?} is also another caller's",
                        t.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// The tenant named `name`.
    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| t.name == name)
    }

    /// Plain HTTP only where nobody else listens in (loopback) or where
    /// the operator said so (`plain_http`).
    pub fn check_transport(
        &self,
        listen: SocketAddr,
    ) -> Result<(), cloudlet_trust::tls::PlainHttpRefused> {
        cloudlet_trust::tls::check_plain_http(listen, self.tls.is_some(), self.plain_http)
    }

    /// This cloudlet's API URL as others reach it: `advertise_url`, else
    /// `http://` + `public_host` (when the API listens on a wildcard
    /// address) or the address it listens on (`bound`: `listen` as bound,
    /// its port known).
    pub fn api_url(&self, bound: SocketAddr) -> String {
        if let Some(u) = &self.advertise_url {
            return u.trim_end_matches('/').to_string();
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        if bound.ip().is_unspecified() {
            format!("{scheme}://{}:{}", self.public_host, bound.port())
        } else {
            format!("{scheme}://{bound}")
        }
    }

    pub fn flavor(&self, name: &str) -> Option<&Flavor> {
        self.flavors.iter().find(|f| f.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_file_keeps_defaults() {
        let c: CloudletConfig = toml::from_str(
            "name = \"edge-1\"\ntokens = [\"t\"]\n[location]\nlabel = \"x\"\nlatitude = 1.0\nlongitude = 2.0\n",
        )
        .unwrap();
        assert_eq!(c.name, "edge-1");
        assert_eq!(c.default_flavor, "small");
        assert!(c.flavor("small").is_some());
    }

    #[test]
    fn vm_ports_listen_where_the_endpoint_says() {
        let mut c = CloudletConfig::default();
        assert_eq!(
            c.port_bind().to_string(),
            "127.0.0.1",
            "the default public host"
        );
        c.public_host = "10.251.0.2".into();
        assert_eq!(c.port_bind().to_string(), "10.251.0.2");
        c.public_host = "edge-1.example".into();
        assert!(c.port_bind().is_unspecified(), "a name: every address");
        c.vm_port_bind = Some("192.0.2.1".parse().unwrap());
        assert_eq!(
            c.port_bind().to_string(),
            "192.0.2.1",
            "the operator's choice"
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(toml::from_str::<CloudletConfig>("nmae = \"typo\"").is_err());
    }
}
