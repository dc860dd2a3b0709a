//! Wire models of the cloud tier's directory (`cloudlet directory serve`,
//! `/v1`): cloudlets register and heartbeat, devices search for the best
//! cloudlet for their app, dashboards watch the changes.
//!
//! Compatibility rule as for the daemon's API: within `/v1`, fields are only
//! added, never removed or renamed, and new fields have defaults.
//!
//! A registration is stored as JSON ([`Registration`], with
//! [`REGISTRATION_FORMAT`]) in the directory's store (redb or etcd): the
//! format is versioned so that a directory of the next release reads what
//! this one wrote.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::{Flavor, Location, Resources};

/// Version of the stored registration record.
///
/// - 1: the first format (this one).
pub const REGISTRATION_FORMAT: u32 = 1;

/// A base VM a cloudlet holds, as the directory knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HeldBase {
    pub name: String,
    /// Content id (BLAKE3) that overlays name their base by.
    pub id: String,
}

/// What a cloudlet tells the directory about itself: on registration and
/// on every heartbeat (`PUT /v1/cloudlets/{name}`, the same body each time,
/// so a directory that lost its state is whole again after one heartbeat).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Registration {
    /// [`REGISTRATION_FORMAT`] of the writer.
    #[serde(default = "registration_format")]
    pub format: u32,
    /// The cloudlet's name: unique in the directory, bound to its credential.
    pub name: String,
    /// The cloudlet's REST API, as devices and peers reach it.
    pub api_url: String,
    /// Host name or address clients use to reach VM ports.
    pub public_host: String,
    pub location: Location,
    /// Networks it serves (CIDRs, e.g. `10.1.0.0/16`): a device whose
    /// address is in one of them is "in network" (ranked first).
    #[serde(default)]
    pub networks: Vec<String>,
    /// Base VMs held.
    #[serde(default)]
    pub base_vms: Vec<HeldBase>,
    /// Base VM ids or names it does not hold but can get (e.g. from a base
    /// store of its operator); ranked as holding them.
    #[serde(default)]
    pub obtainable_bases: Vec<String>,
    /// Overlays it has cached: the URLs (and ids) of overlays its VMs were
    /// synthesized from.
    #[serde(default)]
    pub overlays_cached: Vec<String>,
    #[serde(default)]
    pub flavors: Vec<Flavor>,
    pub capacity: Resources,
    /// What is not handed out yet.
    pub free: Resources,
    /// Host load: the 1-minute load average divided by the cores (1.0: busy).
    #[serde(default)]
    pub load: f64,
    /// `tcg` or `kvm`.
    #[serde(default)]
    pub accel: String,
    /// The cloudlet's release (`cloudletd` version).
    #[serde(default)]
    pub release: String,
    /// The handoff protocol it speaks ([`crate::HANDOFF_PROTOCOL`]).
    #[serde(default)]
    pub handoff_protocol: u32,
    /// False while it drains (maintenance): it takes no new VMs and no
    /// moves in; searches leave it out.
    #[serde(default = "accepting_default")]
    pub accepting: bool,
    /// The bearer token it accepts from peers for handoffs. Shown only to
    /// other registered cloudlets (`GET /v1/peers`), never in searches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_token: Option<String>,
    /// Its latest handoffs out, the newest first (at most
    /// [`RECENT_MOVES`]): which VM went where (the fleet view).
    #[serde(default)]
    pub recent_moves: Vec<FleetMove>,
}

/// How many handoffs out a registration tells.
pub const RECENT_MOVES: usize = 10;

/// A handoff out of a cloudlet, as its registration tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FleetMove {
    pub vm_id: String,
    pub vm_name: String,
    /// The destination's API URL.
    pub to: String,
    /// When it began, ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// The VM runs there (false: the move failed, it stayed).
    pub moved: bool,
    #[serde(default)]
    pub downtime_ms: Option<u64>,
}

/// One live cloudlet in `GET /v1/fleet`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FleetEntry {
    /// As devices see it (no peer token).
    pub registration: Registration,
    /// How long its lease still runs (it leaves the fleet at 0 unless it
    /// heartbeats); none where the store keeps the leases (etcd).
    pub lease_left_ms: Option<u64>,
}

/// `GET /v1/fleet`: every live cloudlet, by name, for the fleet view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Fleet {
    pub cloudlets: Vec<FleetEntry>,
    pub lease_ms: u64,
    pub heartbeat_ms: u64,
}

fn accepting_default() -> bool {
    true
}

fn connected_default() -> bool {
    true
}

fn registration_format() -> u32 {
    REGISTRATION_FORMAT
}

/// A cloudlet's view of its membership (in its `GET /v1/cloudlet`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Membership {
    /// The directory instances it heartbeats to.
    pub urls: Vec<String>,
    /// Its last heartbeat landed and its lease has not run out since.
    pub registered: bool,
    /// How long ago the last heartbeat landed, ms.
    pub last_heartbeat_ms_ago: Option<u64>,
    pub heartbeat_ms: u64,
    pub lease_ms: u64,
    /// Why the last heartbeat failed, while it is failing.
    pub last_error: Option<String>,
    /// The peers it learned from the directory (names), for handoffs.
    pub peers: Vec<String>,
}

/// The directory's answer to a registration or heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Lease {
    pub name: String,
    /// The entry leaves every answer this long after this heartbeat unless
    /// another one comes.
    pub lease_ms: u64,
    /// How often the directory asks to be told (the lease spans two
    /// heartbeats and a margin).
    pub heartbeat_ms: u64,
    /// True when this call created the entry (first registration, or the
    /// first after the entry expired).
    pub created: bool,
}

/// `GET /v1/cloudlets` query.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchQuery {
    /// The device's latitude (with `lon`): geographic distance ranks.
    #[serde(default)]
    pub lat: Option<f64>,
    #[serde(default)]
    pub lon: Option<f64>,
    /// Only cloudlets that hold this base VM (name or id) or can get it.
    #[serde(default)]
    pub base: Option<String>,
    /// Prefer cloudlets that already cached this overlay (URL or id).
    #[serde(default)]
    pub overlay: Option<String>,
    /// Only cloudlets that offer this flavor and have room for one more VM
    /// of it (default: room for one more VM of any flavor).
    #[serde(default)]
    pub flavor: Option<String>,
    /// How many candidates (default 5, at most 100).
    #[serde(default)]
    pub n: Option<usize>,
    /// The device's address, where the directory cannot see it (behind a
    /// proxy): default, the address the call came from.
    #[serde(default)]
    pub addr: Option<String>,
}

/// One cloudlet in a search answer, with why it is where it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Candidate {
    /// 1 for the best.
    pub rank: usize,
    pub name: String,
    pub api_url: String,
    pub public_host: String,
    pub location: Location,
    /// The served network the device's address is in, if any.
    pub network: Option<String>,
    /// Great-circle distance to the device, km (when the query gave a
    /// location).
    pub distance_km: Option<f64>,
    /// The distance band it was ranked in (`< 10 km`, ...): candidates in
    /// one band are ranked by cache, room and load.
    pub distance_band: Option<String>,
    pub overlay_cached: bool,
    /// How many more VMs of the asked flavor fit.
    pub fits: u32,
    pub free: Resources,
    pub load: f64,
    pub accel: String,
    pub release: String,
    pub handoff_protocol: u32,
    /// The ranking, key by key, for a person.
    pub reasons: Vec<String>,
}

/// A cloudlet a search left out, and why (the nearest ones first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Excluded {
    pub name: String,
    pub api_url: String,
    pub distance_km: Option<f64>,
    pub network: Option<String>,
    pub why: String,
}

/// `GET /v1/cloudlets` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SearchAnswer {
    /// The device address the ranking used.
    pub client_addr: Option<String>,
    /// Best first.
    pub candidates: Vec<Candidate>,
    /// Up to `n` cloudlets that did not fit, the nearest first.
    pub excluded: Vec<Excluded>,
    /// How many live cloudlets the directory holds.
    pub registered: usize,
    /// What the ranking does, in one line.
    pub ranking: String,
}

/// `GET /v1/peers` (cloudlets only): every live registration, with the
/// peer tokens, for handoffs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PeerList {
    pub peers: Vec<Registration>,
}

/// What changed in the directory (`GET /v1/watch`, server-sent events, one
/// JSON event per `data:` line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WatchEvent {
    /// `registered`, `updated`, `deregistered`, `expired`.
    pub kind: WatchKind,
    pub name: String,
    /// The directory's revision after the change (etcd's revision with the
    /// etcd store): a client that reconnects passes the last one it saw as
    /// `since` and misses nothing still in the directory's window.
    pub revision: u64,
    /// The entry as it is now (none when it left). Peer token omitted.
    #[serde(default)]
    pub entry: Option<Registration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WatchKind {
    Registered,
    Updated,
    Deregistered,
    Expired,
    /// Sent first, with the current revision and no entry: the client is
    /// up to date as of it (it then gets a `registered` event per live
    /// entry, unless it passed `since`).
    Snapshot,
}

/// `GET /v1/watch` query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WatchQuery {
    /// Resume after this revision (events the directory still keeps).
    #[serde(default)]
    pub since: Option<u64>,
}

/// `GET /v1/health` of the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DirectoryHealth {
    /// `embedded` or `etcd`.
    pub store: String,
    /// The store answers and, with etcd, the watch that keeps this
    /// instance's view current is running (false while etcd is out of
    /// reach: answers may then be stale).
    #[serde(default = "connected_default")]
    pub store_connected: bool,
    pub registered: usize,
    pub revision: u64,
    pub heartbeat_ms: u64,
    pub lease_ms: u64,
    pub version: String,
}
