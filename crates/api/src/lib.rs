//! Wire models of the cloudlet REST API (`/v1`), shared by `cloudletd`, the
//! client library and the CLI (like Neon's `pageserver_api`).
//!
//! Compatibility rule: within `/v1`, fields are only added, never removed or
//! renamed, and new fields have defaults, so old clients keep working.

pub mod directory;
pub mod events;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a cloudlet is, for discovery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct Location {
    /// Free text, e.g. "Pittsburgh, Forbes Ave".
    pub label: String,
    pub latitude: f64,
    pub longitude: f64,
}

impl Location {
    /// Great-circle distance to `other`, km (haversine, mean Earth radius).
    pub fn distance_km(&self, other: &Location) -> f64 {
        distance_km(
            (self.latitude, self.longitude),
            (other.latitude, other.longitude),
        )
    }
}

/// Great-circle distance between two `(latitude, longitude)` points, km.
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (lat1, lon1) = (a.0.to_radians(), a.1.to_radians());
    let (lat2, lon2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((lat2 - lat1) / 2.0).sin().powi(2)
        + lat1.cos() * lat2.cos() * ((lon2 - lon1) / 2.0).sin().powi(2);
    2.0 * 6371.0088 * h.sqrt().min(1.0).asin()
}

/// An amount of compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub vms: u32,
}

/// `GET /v1/cloudlet`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CloudletInfo {
    pub name: String,
    pub location: Location,
    pub version: String,
    /// What this cloudlet may hand out in total.
    pub capacity: Resources,
    /// What is not yet handed out.
    pub free: Resources,
    pub base_vms: Vec<BaseVmInfo>,
    pub flavors: Vec<Flavor>,
    /// `tcg` or `kvm`.
    pub accel: String,
    /// The handoff protocol this cloudlet speaks ([`HANDOFF_PROTOCOL`]).
    #[serde(default)]
    pub handoff_protocol: u32,
    /// Its membership of the cloud tier's directory (none: no directory
    /// configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<directory::Membership>,
    /// How busy the host is (none where it cannot be read).
    #[serde(default)]
    pub load: Option<HostLoad>,
}

/// A base VM this cloudlet holds (`GET /v1/base-vms`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BaseVmInfo {
    pub name: String,
    /// Content id (BLAKE3); overlays name their base by it.
    pub id: String,
    pub memory_mib: u64,
    pub disk_size: u64,
    pub accel: String,
    pub recipe: String,
    /// A ready copy of its disk waits for the next early-start synthesis.
    #[serde(default)]
    pub spare_disk: bool,
}

/// How busy the host is (`/proc/loadavg`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostLoad {
    /// Runnable threads, averaged over 1, 5 and 15 minutes.
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    /// The host's CPUs (a load above it means waiting for a CPU).
    pub cpus: u32,
}

/// Resource limits a VM runs with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Flavor {
    pub name: String,
    pub vcpus: u32,
    /// Must be at least the base VM's memory.
    pub memory_mib: u64,
}

/// `POST /v1/vms` with a JSON body: synthesize a VM from an overlay URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreateVmRequest {
    /// `http(s)://` address of the overlay (a registry or the device).
    #[schema(
        format = "uri",
        pattern = "^https?://",
        example = "http://registry.example:8700/v1/overlays/kvstore"
    )]
    pub overlay: String,
    /// A name for the VM (default: derived from its id): letters, digits,
    /// `-` and `_`, unique among the live VMs of its tenant on this cloudlet (another
    /// tenant may use it too; the operator then says the VM by its id).
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9_-]{1,63}$", example = "kvstore-1")]
    pub name: Option<String>,
    /// Flavor name (default: the cloudlet's default flavor); one of the
    /// flavors `GET /v1/cloudlet` lists.
    #[serde(default)]
    #[schema(min_length = 1, example = "small")]
    pub flavor: Option<String>,
}

/// Lifecycle of a VM on a cloudlet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Overlay being fetched, applied and restored.
    Synthesizing,
    Running,
    /// Leaving for another cloudlet: still runs here until the move commits.
    HandingOff,
    /// Arriving from another cloudlet: loaded here, not running yet.
    Receiving,
    /// Moved to another cloudlet; kept as a record.
    Moved,
    /// Synthesis failed; nothing runs.
    Failed,
    /// QEMU died unexpectedly.
    Dead,
    Deleting,
}

/// A guest port published on the cloudlet's host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortMapping {
    pub guest: u16,
    pub host: u16,
    /// `host:port` a client connects to.
    pub endpoint: String,
}

/// Where a synthesis or a handoff stands (the stages:
/// [`events::ProgressEvent`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct Progress {
    /// Synthesis: `queued`, `fetching`, `applying`, `restoring`, `ready`,
    /// `failed`; handoff: `preparing`, `disk`, `memory`, `switchover`,
    /// `committing`.
    pub stage: String,
    pub bytes_fetched: u64,
    pub bytes_total: u64,
    pub segments_applied: u32,
    pub segments_total: u32,
    /// Handoff: bits per second on the link, recently.
    #[serde(default)]
    pub rate_bps: u64,
    /// Handoff: how fast the guest dirties its memory, bytes per second
    /// (QEMU's measure, during the `memory` stage).
    #[serde(default)]
    pub dirty_rate_bps: u64,
    /// Handoff: QEMU's precopy iteration.
    #[serde(default)]
    pub iteration: u64,
    /// Handoff: QEMU's estimate of RAM still to send, bytes.
    #[serde(default)]
    pub remaining_bytes: u64,
}

/// How long one stage took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StageTiming {
    pub stage: String,
    pub ms: u64,
}

/// A VM (`GET /v1/vms/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmInfo {
    pub id: String,
    pub name: String,
    pub state: VmState,
    /// Rises on every move between cloudlets.
    pub generation: u64,
    pub base_id: String,
    pub overlay: String,
    pub flavor: String,
    pub ports: Vec<PortMapping>,
    pub created_unix: u64,
    pub progress: Progress,
    pub timings: Vec<StageTiming>,
    #[serde(default)]
    pub error: Option<String>,
    /// For a VM that moved away: the cloudlet it moved to.
    #[serde(default)]
    pub moved_to: Option<String>,
    /// Only in the answer to `POST /v1/vms`: the VM's own credential (a
    /// device's session moves and deletes this VM with it, on whichever
    /// cloudlet the VM runs; it follows the VM on every move). Not kept by
    /// the cloudlet (only its digest): keep it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_token: Option<String>,
    /// The tenant that owns the VM (none: the operator's). Each tenant
    /// sees only its own VMs; the operator sees every VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// `GET /v1/events` (server-sent events, one JSON `VmEvent` per `data:`
/// line): every change of a VM's state on this cloudlet, as it is stored.
/// A move out is `handing_off` then `moved` (with `moved_to`; the new
/// endpoints are in the destination's `running` event and the handoff's
/// answer) or, when it failed, `handing_off` then `running` again; a move
/// in is `receiving` then `running`; a deletion has no `state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmEvent {
    pub vm_id: String,
    pub name: String,
    /// The state before (none: the VM is new here).
    pub from: Option<VmState>,
    /// The state now (none: deleted).
    pub state: Option<VmState>,
    pub generation: u64,
    pub ports: Vec<PortMapping>,
    #[serde(default)]
    pub moved_to: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    /// When it was stored, ms since the Unix epoch.
    pub unix_ms: u64,
    /// What the change means for a move (ETSI MEC 021's
    /// MOVEOUT_TRIGGERED / COMPLETED / FAILED), none for other changes.
    #[serde(default)]
    pub mobility: Option<Mobility>,
    /// The tenant that owns the VM (none: the operator's): a tenant's
    /// watch sees only its own VMs' events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// A move as a VM's events tell it (see [`Mobility::of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mobility {
    /// The source began to hand the VM over (it still serves here).
    Triggered,
    /// The source handed it over: `moved_to` says where.
    Completed,
    /// The move failed: the VM serves here again (`error` says why).
    Failed,
    /// The destination runs the VM it received (its new `ports`).
    Arrived,
}

impl Mobility {
    /// The move a state change is part of.
    pub fn of(from: Option<VmState>, to: Option<VmState>) -> Option<Mobility> {
        use VmState as S;
        match (from?, to?) {
            (S::Running, S::HandingOff) => Some(Mobility::Triggered),
            (S::HandingOff, S::Moved) => Some(Mobility::Completed),
            (S::HandingOff, S::Running) => Some(Mobility::Failed),
            (S::Receiving, S::Running) => Some(Mobility::Arrived),
            _ => None,
        }
    }
}

/// `POST /v1/vms/{id}/handoff`: move a running VM to another cloudlet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HandoffRequest {
    /// API address of the destination cloudlet, or its name in the
    /// directory this cloudlet joined.
    #[schema(min_length = 1, example = "http://edge-2.example:8600")]
    pub destination: String,
    /// Bearer token the destination accepts (default: the one configured
    /// for that peer, else the one the directory gave).
    #[serde(default)]
    pub token: Option<String>,
}

/// `POST /v1/drain`: the cloudlet takes no new VMs and no moves in, and
/// hands every VM it runs to its best neighbour (from the directory, then
/// the static peers). `DELETE /v1/drain` ends the maintenance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DrainReport {
    /// One line per VM that was running here.
    pub vms: Vec<DrainedVm>,
    /// True when every VM moved (none is left running here).
    pub drained: bool,
}

/// What a drain did with one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DrainedVm {
    pub id: String,
    pub name: String,
    /// The cloudlet (name or URL) it moved to.
    pub moved_to: Option<String>,
    pub downtime_ms: Option<u64>,
    /// Each neighbour tried before, and why it did not take the VM; or
    /// why none was tried.
    pub refusals: Vec<String>,
}

/// What a handoff did, answered when the VM runs at the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HandoffReport {
    /// The VM as the destination now runs it.
    pub vm: VmInfo,
    pub total_ms: u64,
    /// Source QEMU's STOP event, microseconds since the Unix epoch.
    pub source_stop_us: i64,
    /// Destination QEMU's RESUME event, microseconds since the Unix epoch.
    pub destination_resume_us: i64,
    /// Bytes sent to the destination (session body).
    pub wire_bytes: u64,
    /// Bytes of VM state they stood for (migration stream + disk chunks).
    pub raw_bytes: u64,
    pub disk_bytes: u64,
    pub phases: Vec<StageTiming>,
    /// The API URL of the cloudlet the VM runs on now (the destination as
    /// the source reached it; empty from a source of an earlier release).
    #[serde(default)]
    pub destination_url: String,
    /// The handoff's id: its record in the source's history
    /// (`GET /v1/handoffs/{handoff_id}`), its events, both sides' logs.
    #[serde(default)]
    pub handoff_id: String,
}

impl HandoffReport {
    /// The VM's downtime: from the source's stop to the destination's
    /// resume, in whole ms (rounded).
    pub fn downtime_ms(&self) -> u64 {
        let us = (self.destination_resume_us - self.source_stop_us).max(0) as u64;
        (us + 500) / 1000
    }
}

/// Version of the cloudlet-to-cloudlet handoff protocol: the calls
/// (`prepare`, `stream`, `commit`, `abort`, their bodies and refusals) and
/// the session stream they carry. Two cloudlets move VMs only when their
/// versions are equal: the destination checks the offer's before it does
/// anything else (409 `protocol_mismatch`, no QEMU started).
///
/// - 1: the first versioned protocol (session format 2, XXH3 memory
///   digests, page repair, the commit persisted before the VM resumes and
///   answered again after a restart; offers without a version are refused).
pub const HANDOFF_PROTOCOL: u32 = 1;

/// `POST /v1/handoff/prepare`, source -> destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HandoffOffer {
    /// [`HANDOFF_PROTOCOL`] of the source (0: an unversioned source).
    #[serde(default, deserialize_with = "whole::one")]
    pub protocol: u32,
    pub handoff_id: String,
    pub vm_id: String,
    pub name: String,
    /// The VM's generation at the source; it runs at the destination as
    /// `generation + 1`. A destination refuses an offer whose generation is
    /// not above every generation it has recorded for this VM.
    #[serde(deserialize_with = "whole::one")]
    pub generation: u64,
    pub base_id: String,
    pub flavor: String,
    pub app: AppInfo,
    pub overlay: String,
    pub source: String,
    /// BLAKE3 (hex) of the VM's session credential: the destination takes
    /// the same credential for the VM (none: the VM has no session).
    #[serde(default)]
    pub session_hash: Option<String>,
    /// The tenant that owns the VM (none: the operator's): the destination
    /// records it as that tenant's, within that tenant's quota there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// The destination's answer to an offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HandoffPrepared {
    pub handoff_id: String,
    pub ports: Vec<PortMapping>,
}

/// The destination's answer once the stream is loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HandoffLoaded {
    pub raw_bytes: u64,
    pub disk_bytes: u64,
    /// The digest of the loaded guest memory, `xxh3-128:<hex>` (a root over
    /// per-MiB digests of per-page XXH3-128 digests), when the destination
    /// verifies memory (`verify_memory`). Called `memory_blake3` before
    /// session format 2, and accepted under that name.
    #[serde(default, alias = "memory_blake3")]
    pub memory_digest: Option<String>,
}

/// `GET /v1/handoff/{id}` on the destination: how much of the session
/// stream has arrived (the source compares it with what it sent to know
/// how much is still in flight on the link).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HandoffArrival {
    pub received_bytes: u64,
    pub loaded: bool,
}

/// The destination's answer to commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HandoffCommitted {
    pub vm: VmInfo,
    /// The destination QEMU's RESUME event, microseconds since the Unix
    /// epoch; 0 when not known (a commit answered again after the
    /// destination restarted).
    pub resume_us: i64,
}

/// Body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// What went wrong, for a person.
    pub error: String,
    /// Stable machine-readable kind, e.g. `not_found`, `over_capacity`.
    pub kind: String,
    /// With kind `memory_differs` (a destination refusing a handoff's
    /// commit): where its copy of the memory differs from the source's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_differs: Option<MemoryDifference>,
}

/// Where a moved VM's memory differs from the source's: per 1 MiB chunk,
/// the destination's digest of each of its pages (64-bit XXH3, hex), so
/// that the source sends only the pages whose digest is not its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct MemoryDifference {
    pub chunks: Vec<DifferingChunk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DifferingChunk {
    /// Index of the 1 MiB chunk in the guest's RAM.
    pub chunk: u64,
    /// The destination's digest of each page of the chunk, in order.
    pub page_digests: Vec<String>,
}

/// App metadata carried inside an overlay: what the launch VM serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct AppInfo {
    pub name: String,
    /// Guest TCP ports the app listens on.
    #[serde(deserialize_with = "whole::many")]
    pub ports: Vec<u16>,
    /// HTTP path that answers when the app is ready (on the first port).
    #[serde(default)]
    pub health_path: Option<String>,
    /// The command the app was started with (for the record).
    #[serde(default)]
    pub command: Option<String>,
    /// The app's version, as its developer names it (a signature covers it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// The OpenAPI security scheme of every cloudlet service (`bearer`: an
/// `Authorization: Bearer <token>` header), for `#[openapi(modifiers(..))]`.
pub struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let c = openapi.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{Mobility, VmState as S};

    #[test]
    fn a_move_reads_from_the_state_changes() {
        assert_eq!(
            Mobility::of(Some(S::Running), Some(S::HandingOff)),
            Some(Mobility::Triggered)
        );
        assert_eq!(
            Mobility::of(Some(S::HandingOff), Some(S::Moved)),
            Some(Mobility::Completed)
        );
        assert_eq!(
            Mobility::of(Some(S::HandingOff), Some(S::Running)),
            Some(Mobility::Failed)
        );
        assert_eq!(
            Mobility::of(Some(S::Receiving), Some(S::Running)),
            Some(Mobility::Arrived)
        );
        assert_eq!(Mobility::of(Some(S::Synthesizing), Some(S::Running)), None);
        assert_eq!(Mobility::of(None, Some(S::Receiving)), None);
        assert_eq!(Mobility::of(Some(S::Running), None), None);
    }
}

/// Integers as JSON Schema counts them, which is how the OpenAPI document
/// says them: `849` and `849.0` alike (serde's own integers refuse the
/// second); anything fractional, negative or out of range is refused.
mod whole {
    use serde::de::{Deserialize, Deserializer, Error};

    fn of<T: TryFrom<u64>, E: Error>(n: serde_json::Number) -> Result<T, E> {
        let v = match n.as_u64() {
            Some(v) => v,
            None => match n.as_f64() {
                Some(f) if f >= 0.0 && f.fract() == 0.0 && f < u64::MAX as f64 => f as u64,
                _ => return Err(E::custom(format!("{n} is not a whole number >= 0"))),
            },
        };
        T::try_from(v).map_err(|_| E::custom(format!("{n} is out of range")))
    }

    pub fn one<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
        of(serde_json::Number::deserialize(d)?)
    }

    pub fn many<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<Vec<T>, D::Error> {
        Vec::<serde_json::Number>::deserialize(d)?
            .into_iter()
            .map(of)
            .collect()
    }
}

#[cfg(test)]
mod whole_tests {
    use super::AppInfo;

    fn ports(json: &str) -> Result<Vec<u16>, String> {
        serde_json::from_str::<AppInfo>(&format!(r#"{{"name": "a", "ports": {json}}}"#))
            .map(|a| a.ports)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn whole_numbers_are_integers_however_written() {
        assert_eq!(ports("[8080, 8081.0]").unwrap(), vec![8080, 8081]);
        for bad in ["[80.5]", "[-1]", "[70000]", "[\"80\"]"] {
            assert!(ports(bad).is_err(), "{bad}");
        }
    }
}

/// The headers of a file of the dashboards (the daemon's `/ui`, the
/// directory's `/ui`): its type; never cached stale; scripts and styles
/// from the server itself only (the pages' bars and colors are style
/// attributes); never framed, never sniffed.
pub fn dashboard_headers(content_type: &'static str) -> http::HeaderMap {
    use http::header::{self, HeaderValue};
    let mut h = http::HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h
}
