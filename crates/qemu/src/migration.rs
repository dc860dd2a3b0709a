//! Typed QMP migration commands: status, statistics, parameters,
//! capabilities, start, continue, cancel.
//!
//! The types follow QEMU 7.2's `qapi/migration.json` (checked against the
//! `query-qmp-schema` of the QEMU we pin), restricted to what cloudlet reads
//! or sets. Replies are parsed leniently: a member QEMU leaves out (an idle
//! VM's `query-migrate` is `{}`) takes its default, an unknown member is
//! ignored, and a status a later QEMU may add parses as
//! [`MigrationStatus::Unknown`] instead of failing the caller's poll loop.
//!
//! Every call is a method on [`QmpClient`]; the untyped
//! [`QmpClient::execute`] stays for what has no type here yet. This module
//! sits above [`crate::qmp`], the transport, which names no migration type.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::qmp::{QmpClient, QmpError, QmpEvent};

/// `MigrationStatus`: where a migration is, as `query-migrate` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration has started (an idle `query-migrate` has no status).
    #[default]
    None,
    Setup,
    Cancelling,
    Cancelled,
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecover,
    Completed,
    Failed,
    Colo,
    /// Paused before the switchover (capability `pause-before-switchover`):
    /// the VM is stopped and QEMU waits for `migrate-continue`.
    PreSwitchover,
    /// Sending the device state, the VM stopped.
    Device,
    WaitUnplug,
    /// A status this build does not know (a QEMU newer than 7.2).
    #[serde(other)]
    Unknown,
}

impl MigrationStatus {
    /// QEMU's name of the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Active => "active",
            Self::PostcopyActive => "postcopy-active",
            Self::PostcopyPaused => "postcopy-paused",
            Self::PostcopyRecover => "postcopy-recover",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Colo => "colo",
            Self::PreSwitchover => "pre-switchover",
            Self::Device => "device",
            Self::WaitUnplug => "wait-unplug",
            Self::Unknown => "unknown",
        }
    }

    /// The migration has ended: completed, failed or cancelled.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// The migration ended without completing.
    pub fn is_failure(self) -> bool {
        matches!(self, Self::Failed | Self::Cancelled)
    }

    /// A migration runs (or winds down): neither idle nor finished.
    pub fn is_running(self) -> bool {
        !matches!(self, Self::None | Self::Unknown) && !self.is_finished()
    }

    /// The guest runs on the destination while pages still move.
    pub fn is_postcopy(self) -> bool {
        matches!(
            self,
            Self::PostcopyActive | Self::PostcopyPaused | Self::PostcopyRecover
        )
    }
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `MigrationStats` of the RAM (`query-migrate`'s `ram`). Byte counts
/// unless named otherwise.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct RamStats {
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    /// Pages found zero (sent as a flag, no payload).
    pub duplicate: u64,
    pub skipped: u64,
    /// Pages sent whole.
    pub normal: u64,
    pub normal_bytes: u64,
    /// Pages dirtied per second, measured at the last bitmap sync.
    pub dirty_pages_rate: u64,
    /// QEMU's send rate, megabits per second.
    pub mbps: f64,
    /// Bitmap syncs so far: 1 after the first pass starts.
    pub dirty_sync_count: u64,
    pub postcopy_requests: u64,
    /// Target page size (0 when QEMU left it out).
    pub page_size: u64,
    pub multifd_bytes: u64,
    pub pages_per_second: u64,
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
    pub postcopy_bytes: u64,
}

impl RamStats {
    /// The page size, 4096 when QEMU did not say.
    pub fn page_bytes(&self) -> u64 {
        if self.page_size == 0 {
            4096
        } else {
            self.page_size
        }
    }

    /// The guest's dirty rate in bytes per second.
    pub fn dirty_bytes_rate(&self) -> u64 {
        self.dirty_pages_rate.saturating_mul(self.page_bytes())
    }
}

/// `MigrationInfo`: the reply of `query-migrate`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct MigrationInfo {
    pub status: MigrationStatus,
    /// Absent before the migration's setup ends.
    pub ram: Option<RamStats>,
    /// Milliseconds since the start (so far, or in all once finished).
    pub total_time: Option<u64>,
    /// QEMU's estimate of the downtime, milliseconds (while active).
    pub expected_downtime: Option<u64>,
    /// The downtime, milliseconds (once completed).
    pub downtime: Option<u64>,
    pub setup_time: Option<u64>,
    pub cpu_throttle_percentage: Option<u64>,
    /// Why the migration failed.
    pub error_desc: Option<String>,
    /// Why a migration cannot start now (blockers), when there are any.
    pub blocked_reasons: Option<Vec<String>>,
}

impl MigrationInfo {
    /// `Some(Ok)` completed, `Some(Err)` failed or cancelled (with QEMU's
    /// reason), `None` idle or still going; as [`migration_outcome`],
    /// typed.
    pub fn outcome(&self) -> Option<Result<(), QmpError>> {
        match self.status {
            MigrationStatus::Completed => Some(Ok(())),
            s if s.is_failure() => Some(Err(QmpError::MigrationFailed {
                status: s.as_str().into(),
                desc: self
                    .error_desc
                    .clone()
                    .unwrap_or_else(|| "no detail".into()),
            })),
            _ => None,
        }
    }

    /// The RAM statistics, zeros while QEMU has none.
    pub fn ram_or_default(&self) -> RamStats {
        self.ram.clone().unwrap_or_default()
    }
}

/// `MultiFDCompression`: how multifd channels compress pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MultifdCompression {
    None,
    Zlib,
    Zstd,
    #[serde(other)]
    Unknown,
}

/// `MigrateSetParameters`, the members cloudlet sets; `None` leaves a
/// parameter as it is. Also what [`QmpClient::query_migration_parameters`]
/// reads back (QEMU then fills every member).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct MigrationParameters {
    /// Bytes per second QEMU may send (precopy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// The downtime QEMU aims at when it decides to stop the VM, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// Channels of a `multifd` migration (both sides must agree).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_compression: Option<MultifdCompression>,
}

/// `MigrationCapability`: the switches of `migrate-set-capabilities` in
/// QEMU 7.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationCapability {
    Xbzrle,
    RdmaPinAll,
    AutoConverge,
    ZeroBlocks,
    Compress,
    /// MIGRATION events on every status change.
    Events,
    PostcopyRam,
    #[serde(rename = "x-colo")]
    XColo,
    ReleaseRam,
    Block,
    ReturnPath,
    PauseBeforeSwitchover,
    Multifd,
    DirtyBitmaps,
    PostcopyBlocktime,
    LateBlockActivate,
    /// RAM in a shared file is not sent (the destination maps the file).
    #[serde(rename = "x-ignore-shared")]
    XIgnoreShared,
    ValidateUuid,
    BackgroundSnapshot,
    ZeroCopySend,
    PostcopyPreempt,
    #[serde(other)]
    Unknown,
}

/// `MigrationCapabilityStatus`: one capability and whether it is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCapabilityState {
    pub capability: MigrationCapability,
    pub state: bool,
}

impl QmpClient {
    /// Run `command` and parse its reply as `T`.
    pub(crate) async fn execute_as<T: serde::de::DeserializeOwned>(
        &self,
        command: &str,
        args: Option<Value>,
    ) -> Result<T, QmpError> {
        let v = self.execute(command, args).await?;
        parse_reply(command, v)
    }

    /// `query-migrate`: the status and statistics of the current (or last)
    /// migration.
    pub async fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        self.execute_as("query-migrate", None).await
    }

    /// `query-migrate-parameters`.
    pub async fn query_migration_parameters(&self) -> Result<MigrationParameters, QmpError> {
        self.execute_as("query-migrate-parameters", None).await
    }

    /// `migrate-set-parameters` with the members that are `Some`.
    pub async fn set_migration_parameters(
        &self,
        params: &MigrationParameters,
    ) -> Result<(), QmpError> {
        let args = serde_json::to_value(params).map_err(|e| QmpError::Reply {
            command: "migrate-set-parameters".into(),
            detail: e.to_string(),
        })?;
        self.execute("migrate-set-parameters", Some(args))
            .await
            .map(drop)
    }

    /// `query-migrate-capabilities`.
    pub async fn query_migration_capabilities(
        &self,
    ) -> Result<Vec<MigrationCapabilityState>, QmpError> {
        self.execute_as("query-migrate-capabilities", None).await
    }

    /// `migrate-set-capabilities`, typed (the `&str` twin is
    /// [`QmpClient::set_migration_capabilities`]).
    pub async fn set_migration_capability_states(
        &self,
        caps: &[MigrationCapabilityState],
    ) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": caps })),
        )
        .await
        .map(drop)
    }

    /// `migrate`: start an outgoing migration to `uri` (`unix:PATH`,
    /// `tcp:HOST:PORT`, `exec:CMD`, ...). Returns once it has started; follow
    /// it with [`QmpClient::query_migrate`].
    pub async fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// `migrate-incoming`: listen on `uri` for the stream (a QEMU started
    /// with `-incoming defer`).
    pub async fn migrate_incoming(&self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// `migrate-continue`: let a migration paused in `state` go on (with
    /// `pause-before-switchover`: [`MigrationStatus::PreSwitchover`]).
    pub async fn continue_migration(&self, state: MigrationStatus) -> Result<(), QmpError> {
        self.execute("migrate-continue", Some(json!({ "state": state })))
            .await
            .map(drop)
    }

    /// `stop`: pause the vCPUs.
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(drop)
    }

    /// `cont`: run the vCPUs.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    /// `migrate_cancel`: stop an outgoing migration, if one runs (a no-op
    /// otherwise).
    pub async fn cancel_migration(&self) -> Result<(), QmpError> {
        self.execute("migrate_cancel", None).await.map(drop)
    }

    /// Set migration capabilities by name.
    pub async fn set_migration_capabilities(&self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, s)| json!({"capability": c, "state": s}))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
        .await
        .map(|_| ())
    }

    /// Poll `query-migrate` until the migration leaves the active states;
    /// return the final reply. Fails on `failed`/`cancelled` or timeout.
    pub async fn wait_migration(&self, timeout: Duration) -> Result<Value, QmpError> {
        let start = tokio::time::Instant::now();
        loop {
            let v = self.execute("query-migrate", None).await?;
            if let Some(done) = migration_outcome(&v) {
                return done.map(|()| v);
            }
            if start.elapsed() > timeout {
                return Err(QmpError::Timeout {
                    command: "migrate".into(),
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Poll `query-migrate` every `poll` until the migration finishes;
    /// the final reply, or [`QmpError::MigrationFailed`] or a timeout.
    pub async fn wait_migration_info(
        &self,
        timeout: Duration,
        poll: Duration,
    ) -> Result<MigrationInfo, QmpError> {
        self.wait_migration_until(timeout, poll, None).await
    }

    /// As [`QmpClient::wait_migration_info`], but QEMU's MIGRATION events
    /// (capability `events`) wake it at once; the status is still read
    /// with `query-migrate` (an event lost or never sent costs at most a
    /// 100 ms poll).
    pub async fn wait_migration_woken(
        &self,
        events: &mut tokio::sync::broadcast::Receiver<QmpEvent>,
        timeout: Duration,
    ) -> Result<MigrationInfo, QmpError> {
        self.wait_migration_until(timeout, Duration::from_millis(100), Some(events))
            .await
    }

    async fn wait_migration_until(
        &self,
        timeout: Duration,
        poll: Duration,
        mut events: Option<&mut tokio::sync::broadcast::Receiver<QmpEvent>>,
    ) -> Result<MigrationInfo, QmpError> {
        use tokio::sync::broadcast::error::RecvError;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let info = self.query_migrate().await?;
            if let Some(done) = info.outcome() {
                return done.map(|()| info);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QmpError::Timeout {
                    command: "migrate".into(),
                    timeout,
                });
            }
            let wake = (tokio::time::Instant::now() + poll).min(deadline);
            let Some(events) = events.as_deref_mut() else {
                tokio::time::sleep_until(wake).await;
                continue;
            };
            loop {
                match tokio::time::timeout_at(wake, events.recv()).await {
                    Err(_) => break,
                    Ok(Err(RecvError::Closed)) => {
                        tokio::time::sleep_until(wake).await;
                        break;
                    }
                    Ok(Ok(ev)) if ev.event == "MIGRATION" => break,
                    Ok(_) => {}
                }
            }
        }
    }
}

/// What an untyped `query-migrate` reply says: `Some(Ok)` completed,
/// `Some(Err)` failed or cancelled (with QEMU's reason), `None` still
/// going.
pub fn migration_outcome(v: &Value) -> Option<Result<(), QmpError>> {
    let status = v.get("status").and_then(Value::as_str).unwrap_or("none");
    match status {
        "completed" => Some(Ok(())),
        "failed" | "cancelled" => Some(Err(QmpError::MigrationFailed {
            status: status.into(),
            desc: v
                .get("error-desc")
                .and_then(Value::as_str)
                .unwrap_or("no detail")
                .into(),
        })),
        _ => None,
    }
}

/// A QMP reply as `T`, or [`QmpError::Reply`] naming the command.
pub(crate) fn parse_reply<T: serde::de::DeserializeOwned>(
    command: &str,
    v: Value,
) -> Result<T, QmpError> {
    serde_json::from_value(v.clone()).map_err(|e| QmpError::Reply {
        command: command.into(),
        detail: format!("{e}: {v}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_vm_has_no_migration() {
        let info: MigrationInfo = parse_reply("query-migrate", json!({})).unwrap();
        assert_eq!(info.status, MigrationStatus::None);
        assert!(info.ram.is_none());
        assert!(info.outcome().is_none());
        assert!(!info.status.is_running());
    }

    #[test]
    fn parses_an_active_migration() {
        // As QEMU 7.2 answers during precopy.
        let v = json!({
            "expected-downtime": 300, "status": "active", "setup-time": 3,
            "total-time": 1513,
            "ram": {"total": 270270464, "postcopy-requests": 0, "dirty-sync-count": 2,
                "multifd-bytes": 0, "pages-per-second": 31214, "downtime-bytes": 0,
                "page-size": 4096, "remaining": 95211520, "postcopy-bytes": 0,
                "mbps": 1023.57, "transferred": 179812370, "dirty-sync-missed-zero-copy": 0,
                "precopy-bytes": 179812370, "duplicate": 1420, "dirty-pages-rate": 120,
                "skipped": 0, "normal-bytes": 178933760, "normal": 43685}
        });
        let info: MigrationInfo = parse_reply("query-migrate", v).unwrap();
        assert_eq!(info.status, MigrationStatus::Active);
        assert!(info.status.is_running());
        let ram = info.ram.clone().unwrap();
        assert_eq!(ram.remaining, 95_211_520);
        assert_eq!(ram.dirty_sync_count, 2);
        assert_eq!(ram.dirty_bytes_rate(), 120 * 4096);
        assert!((ram.mbps - 1023.57).abs() < 1e-9);
        assert_eq!(info.expected_downtime, Some(300));
        assert!(info.outcome().is_none());
    }

    #[test]
    fn every_qemu_7_2_status_parses() {
        let all = [
            "none",
            "setup",
            "cancelling",
            "cancelled",
            "active",
            "postcopy-active",
            "postcopy-paused",
            "postcopy-recover",
            "completed",
            "failed",
            "colo",
            "pre-switchover",
            "device",
            "wait-unplug",
        ];
        for name in all {
            let s: MigrationStatus = serde_json::from_value(json!(name)).unwrap();
            assert_ne!(s, MigrationStatus::Unknown, "{name}");
            assert_eq!(s.as_str(), name);
            assert_eq!(serde_json::to_value(s).unwrap(), json!(name));
        }
        let later: MigrationStatus = serde_json::from_value(json!("future-state")).unwrap();
        assert_eq!(later, MigrationStatus::Unknown);
        assert!(MigrationStatus::PostcopyPaused.is_postcopy());
        assert!(MigrationStatus::PreSwitchover.is_running());
        assert!(MigrationStatus::Cancelled.is_finished());
    }

    #[test]
    fn a_failed_migration_carries_its_reason() {
        let v = json!({"status": "failed", "error-desc": "Unable to write to socket: Broken pipe"});
        let info: MigrationInfo = parse_reply("query-migrate", v).unwrap();
        let err = info.outcome().unwrap().unwrap_err();
        assert!(
            matches!(&err, QmpError::MigrationFailed { status, desc } if status == "failed" && desc.contains("Broken pipe")),
            "{err}"
        );
        let done: MigrationInfo = parse_reply(
            "query-migrate",
            json!({"status": "completed", "downtime": 12}),
        )
        .unwrap();
        assert!(matches!(done.outcome(), Some(Ok(()))));
        assert_eq!(done.downtime, Some(12));
        // The untyped twin gives the same error.
        let raw = migration_outcome(&json!({"status": "cancelled"})).unwrap();
        assert!(
            matches!(&raw, Err(QmpError::MigrationFailed { status, desc }) if status == "cancelled" && desc == "no detail"),
            "{raw:?}"
        );
        assert!(migration_outcome(&json!({"status": "active"})).is_none());
    }

    #[test]
    fn a_reply_of_the_wrong_shape_is_an_error() {
        let r: Result<MigrationInfo, _> = parse_reply("query-migrate", json!({"status": 3}));
        assert!(matches!(r, Err(QmpError::Reply { command, .. }) if command == "query-migrate"));
    }

    #[test]
    fn parameters_send_only_what_is_set() {
        let p = MigrationParameters {
            max_bandwidth: Some(1 << 30),
            downtime_limit: Some(50),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"max-bandwidth": 1073741824u64, "downtime-limit": 50})
        );
        let p = MigrationParameters {
            multifd_channels: Some(4),
            multifd_compression: Some(MultifdCompression::Zstd),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"multifd-channels": 4, "multifd-compression": "zstd"})
        );
        assert_eq!(
            serde_json::to_value(MigrationParameters::default()).unwrap(),
            json!({})
        );
    }

    #[test]
    fn parses_queried_parameters() {
        // An excerpt of QEMU 7.2's `query-migrate-parameters`.
        let v = json!({"cpu-throttle-tailslow": false, "xbzrle-cache-size": 67108864,
            "multifd-channels": 2, "downtime-limit": 300, "tls-authz": "",
            "multifd-compression": "none", "max-bandwidth": 134217728,
            "max-postcopy-bandwidth": 0});
        let p: MigrationParameters = parse_reply("query-migrate-parameters", v).unwrap();
        assert_eq!(
            p,
            MigrationParameters {
                max_bandwidth: Some(134_217_728),
                downtime_limit: Some(300),
                multifd_channels: Some(2),
                multifd_compression: Some(MultifdCompression::None),
            }
        );
    }

    #[test]
    fn capabilities_use_qemu_names() {
        let caps = [
            MigrationCapabilityState {
                capability: MigrationCapability::XIgnoreShared,
                state: true,
            },
            MigrationCapabilityState {
                capability: MigrationCapability::PauseBeforeSwitchover,
                state: false,
            },
            MigrationCapabilityState {
                capability: MigrationCapability::XColo,
                state: false,
            },
        ];
        assert_eq!(
            serde_json::to_value(caps).unwrap(),
            json!([{"capability": "x-ignore-shared", "state": true},
                {"capability": "pause-before-switchover", "state": false},
                {"capability": "x-colo", "state": false}])
        );
        let v = json!([{"state": false, "capability": "xbzrle"},
            {"state": true, "capability": "events"},
            {"state": false, "capability": "zero-copy-send"},
            {"state": false, "capability": "something-new"}]);
        let got: Vec<MigrationCapabilityState> =
            parse_reply("query-migrate-capabilities", v).unwrap();
        assert_eq!(got[1].capability, MigrationCapability::Events);
        assert!(got[1].state);
        assert_eq!(got[2].capability, MigrationCapability::ZeroCopySend);
        assert_eq!(got[3].capability, MigrationCapability::Unknown);
    }
}
