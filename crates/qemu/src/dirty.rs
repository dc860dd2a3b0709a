//! What the guest changed: its memory dirty rate, disk dirty bitmaps, and
//! the export of the disk blocks a bitmap marks.
//!
//! - memory: `calc-dirty-rate` hashes a sample of pages now and after
//!   `calc-time` seconds; `query-dirty-rate` says how fast they changed
//!   ([`QmpClient::measured_dirty_rate`] in bytes per second);
//! - disk: a dirty bitmap on a block node records every write from when it
//!   is added ([`QmpClient::add_dirty_bitmap`]); `query-block` counts the
//!   bytes it marks ([`QmpClient::dirty_bitmap_count`]);
//! - which blocks: QEMU copies the marked clusters into an empty scratch
//!   qcow2 (`blockdev-backup`, `sync: incremental`), whose allocation map
//!   is then the answer ([`QmpClient::export_dirty_extents`]).
//!
//! Types follow QEMU 7.2's `qapi/migration.json` (dirty rate) and
//! `qapi/block-core.json` (block nodes, bitmaps, jobs), restricted to what
//! cloudlet reads; replies parse leniently as in [`crate::migration`].

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use crate::image::{self, ImageError};
use crate::qmp::{QmpClient, QmpError};

/// `DirtyRateStatus`: where a `calc-dirty-rate` measurement is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyRateStatus {
    #[default]
    Unstarted,
    Measuring,
    Measured,
    #[serde(other)]
    Unknown,
}

/// `DirtyRateMeasureMode`: how QEMU finds the dirty pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyRateMeasureMode {
    /// Hash sampled pages twice (the only mode TCG supports).
    PageSampling,
    DirtyRing,
    DirtyBitmap,
    #[serde(other)]
    Unknown,
}

/// `DirtyRateVcpu`: one vCPU's rate (dirty-ring mode), MiB/s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DirtyRateVcpu {
    pub id: i64,
    pub dirty_rate: i64,
}

/// `DirtyRateInfo`: the reply of `query-dirty-rate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct DirtyRateInfo {
    /// MiB per second; present once measured.
    pub dirty_rate: Option<i64>,
    pub status: DirtyRateStatus,
    /// When the measurement started, seconds of QEMU's boot clock.
    pub start_time: i64,
    /// Seconds the measurement lasts.
    pub calc_time: i64,
    /// Pages sampled per GiB (page-sampling mode).
    pub sample_pages: u64,
    pub mode: Option<DirtyRateMeasureMode>,
    pub vcpu_dirty_rate: Option<Vec<DirtyRateVcpu>>,
}

impl DirtyRateInfo {
    /// The measured rate in bytes per second, `None` until measured.
    pub fn bytes_per_sec(&self) -> Option<f64> {
        if self.status != DirtyRateStatus::Measured {
            return None;
        }
        Some(self.dirty_rate?.max(0) as f64 * 1_048_576.0)
    }
}

/// `BlockDirtyInfo`: one dirty bitmap of a block node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct BlockDirtyInfo {
    pub name: Option<String>,
    /// Bytes marked dirty (whole granules).
    pub count: u64,
    /// Bytes per bit.
    pub granularity: u64,
    pub recording: bool,
    /// In use by a job (a backup reading it).
    pub busy: bool,
    pub persistent: bool,
    pub inconsistent: Option<bool>,
}

/// `ImageInfo`, the members cloudlet reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct ImageInfo {
    pub filename: String,
    pub format: String,
    /// The size the guest sees.
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    pub actual_size: Option<u64>,
    pub cluster_size: Option<u64>,
    pub backing_filename: Option<String>,
}

/// `BlockDeviceInfo`: a block node (an entry of `query-named-block-nodes`,
/// or the medium of a `query-block` device). QEMU spells some members with
/// underscores.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct BlockDeviceInfo {
    /// The filename QEMU shows (a `json:` pseudo-filename for an NBD node).
    pub file: String,
    pub node_name: Option<String>,
    pub ro: bool,
    /// The driver (`qcow2`, `raw`, `file`, `nbd`, ...).
    pub drv: String,
    #[serde(rename = "backing_file")]
    pub backing_file: Option<String>,
    pub image: Option<ImageInfo>,
    pub dirty_bitmaps: Vec<BlockDirtyInfo>,
}

/// `BlockInfo`: a block device of `query-block`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct BlockInfo {
    /// The legacy drive name; empty for a `-blockdev` disk.
    pub device: String,
    /// The guest device's QOM path.
    pub qdev: Option<String>,
    /// The medium, if any.
    pub inserted: Option<BlockDeviceInfo>,
}

/// What [`QmpClient::export_dirty_extents`] exports, and where.
#[derive(Debug, Clone)]
pub struct DirtyExportConfig {
    /// The block node the bitmap is on (our disks: `disk0`).
    pub node: String,
    /// The bitmap's name.
    pub bitmap: String,
    /// The scratch qcow2 to create (overwritten, removed afterwards).
    pub scratch: PathBuf,
    /// How long the copy may take.
    pub timeout: Duration,
    /// The uid a confined QEMU runs under: the scratch image is made its
    /// (QEMU opens it for writing).
    pub owner: Option<u32>,
}

/// The node (and job) name of the scratch image while it is attached.
pub const EXPORT_NODE: &str = "cloudlet-dirty-export";

/// Why the dirty blocks could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportDirtyExtentsError {
    #[error("No block node {0:?}")]
    NoNode(String),
    #[error("Cannot create the scratch image {path}: {source}")]
    Scratch { path: PathBuf, source: ImageError },
    #[error("Cannot read the allocation map of {path}: {source}")]
    Map { path: PathBuf, source: ImageError },
    #[error("QMP {step} failed: {source}")]
    Qmp {
        step: &'static str,
        source: QmpError,
    },
    #[error("Backup job {job} failed: {error}")]
    JobFailed { job: String, error: String },
    #[error("Backup job {job} did not finish within {timeout:?}")]
    JobTimeout { job: String, timeout: Duration },
    #[error("QMP connection closed during the backup job")]
    Closed,
    #[error("Background task failed: {0}")]
    Task(String),
}

impl QmpClient {
    /// `calc-dirty-rate`: start measuring how fast the guest dirties its
    /// memory over `calc_secs` seconds, sampling `sample_pages` pages per
    /// GiB (QEMU's default, 512, when `None`). Read the result with
    /// [`QmpClient::query_dirty_rate`].
    pub async fn calc_dirty_rate(
        &self,
        calc_secs: u32,
        sample_pages: Option<u32>,
    ) -> Result<(), QmpError> {
        let mut args = json!({ "calc-time": calc_secs });
        if let Some(n) = sample_pages {
            args["sample-pages"] = json!(n);
        }
        self.execute("calc-dirty-rate", Some(args)).await.map(drop)
    }

    /// `query-dirty-rate`.
    pub async fn query_dirty_rate(&self) -> Result<DirtyRateInfo, QmpError> {
        self.execute_as("query-dirty-rate", None).await
    }

    /// The last measured dirty rate in bytes per second; `None` while the
    /// measurement runs or none was started.
    pub async fn measured_dirty_rate(&self) -> Result<Option<f64>, QmpError> {
        Ok(self.query_dirty_rate().await?.bytes_per_sec())
    }

    /// `block-dirty-bitmap-add`: record every write to `node` from now on in
    /// bitmap `name` (not persistent, QEMU's default granularity).
    pub async fn add_dirty_bitmap(&self, node: &str, name: &str) -> Result<(), QmpError> {
        self.execute(
            "block-dirty-bitmap-add",
            Some(json!({ "node": node, "name": name })),
        )
        .await
        .map(drop)
    }

    /// `block-dirty-bitmap-remove`.
    pub async fn remove_dirty_bitmap(&self, node: &str, name: &str) -> Result<(), QmpError> {
        self.execute(
            "block-dirty-bitmap-remove",
            Some(json!({ "node": node, "name": name })),
        )
        .await
        .map(drop)
    }

    /// `query-block`: the guest's block devices and their media.
    pub async fn query_block(&self) -> Result<Vec<BlockInfo>, QmpError> {
        self.execute_as("query-block", None).await
    }

    /// Bytes that bitmap `name` of node `node` marks dirty (`query-block`);
    /// `None` when the node has no such bitmap.
    pub async fn dirty_bitmap_count(
        &self,
        node: &str,
        name: &str,
    ) -> Result<Option<u64>, QmpError> {
        Ok(bitmap_count(&self.query_block().await?, node, name))
    }

    /// `query-named-block-nodes` (`flat`: each node once, without its
    /// backing chain nested).
    pub async fn query_named_block_nodes(&self) -> Result<Vec<BlockDeviceInfo>, QmpError> {
        self.execute_as("query-named-block-nodes", Some(json!({ "flat": true })))
            .await
    }

    /// The block node named `name`, if QEMU has one.
    pub async fn find_block_node(&self, name: &str) -> Result<Option<BlockDeviceInfo>, QmpError> {
        Ok(self
            .query_named_block_nodes()
            .await?
            .into_iter()
            .find(|n| n.node_name.as_deref() == Some(name)))
    }

    /// The byte ranges `[start, end)` of `cfg.node` that bitmap `cfg.bitmap`
    /// marks, found by copying them into a scratch qcow2 of the node's size
    /// (`blockdev-backup`, `sync: incremental`) and reading its allocation
    /// map. The bitmap is cleared when the copy succeeds (QEMU's bitmap
    /// mode `on-success`). Meant for a stopped VM: writes made meanwhile
    /// may or may not be in the answer.
    pub async fn export_dirty_extents(
        &self,
        cfg: &DirtyExportConfig,
    ) -> Result<Vec<(u64, u64)>, ExportDirtyExtentsError> {
        type E = ExportDirtyExtentsError;
        let qmp = |step| move |source| E::Qmp { step, source };
        let size = self
            .find_block_node(&cfg.node)
            .await
            .map_err(qmp("query-named-block-nodes"))?
            .and_then(|n| n.image)
            .map(|i| i.virtual_size)
            .ok_or_else(|| E::NoNode(cfg.node.clone()))?;
        let scratch = cfg.scratch.clone();
        let owner = cfg.owner;
        blocking(move || {
            let _ = std::fs::remove_file(&scratch);
            image::create_qcow2(&scratch, size)
                .and_then(|()| match owner {
                    Some(uid) => std::os::unix::fs::chown(&scratch, Some(uid), Some(uid))
                        .map_err(ImageError::Chown),
                    None => Ok(()),
                })
                .map_err(|source| E::Scratch {
                    path: scratch,
                    source,
                })
        })
        .await?;
        let copied = self.backup_into_scratch(cfg).await;
        let _ = self
            .execute("blockdev-del", Some(json!({ "node-name": EXPORT_NODE })))
            .await;
        let scratch = cfg.scratch.clone();
        let extents = match copied {
            Ok(()) => {
                let s = scratch.clone();
                blocking(move || {
                    image::allocated_extents(&s).map_err(|source| E::Map { path: s, source })
                })
                .await
            }
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&scratch);
        extents
    }

    /// Attach the scratch image and copy the marked clusters into it.
    async fn backup_into_scratch(
        &self,
        cfg: &DirtyExportConfig,
    ) -> Result<(), ExportDirtyExtentsError> {
        type E = ExportDirtyExtentsError;
        let mut events = self.events();
        self.execute(
            "blockdev-add",
            Some(json!({
                "driver": "qcow2",
                "node-name": EXPORT_NODE,
                "file": { "driver": "file", "filename": cfg.scratch },
            })),
        )
        .await
        .map_err(|source| E::Qmp {
            step: "blockdev-add",
            source,
        })?;
        self.execute(
            "blockdev-backup",
            Some(json!({
                "job-id": EXPORT_NODE,
                "device": cfg.node,
                "target": EXPORT_NODE,
                "sync": "incremental",
                "bitmap": cfg.bitmap,
            })),
        )
        .await
        .map_err(|source| E::Qmp {
            step: "blockdev-backup",
            source,
        })?;
        let deadline = tokio::time::Instant::now() + cfg.timeout;
        loop {
            let ev = match tokio::time::timeout_at(deadline, events.recv()).await {
                Err(_) => {
                    return Err(E::JobTimeout {
                        job: EXPORT_NODE.into(),
                        timeout: cfg.timeout,
                    })
                }
                Ok(Err(RecvError::Lagged(_))) => continue,
                Ok(Err(RecvError::Closed)) => return Err(E::Closed),
                Ok(Ok(ev)) => ev,
            };
            if let Some(done) = job_completed(&ev.event, &ev.data, EXPORT_NODE) {
                return done.map_err(|error| E::JobFailed {
                    job: EXPORT_NODE.into(),
                    error,
                });
            }
        }
    }
}

/// The bytes bitmap `name` of `node` marks, from a `query-block` reply.
fn bitmap_count(devices: &[BlockInfo], node: &str, name: &str) -> Option<u64> {
    devices
        .iter()
        .filter_map(|d| d.inserted.as_ref())
        .filter(|m| m.node_name.as_deref() == Some(node))
        .flat_map(|m| &m.dirty_bitmaps)
        .find(|b| b.name.as_deref() == Some(name))
        .map(|b| b.count)
}

/// Whether an event ends job `job`: `Some(Ok)` done, `Some(Err)` with
/// QEMU's reason, `None` another event.
fn job_completed(event: &str, data: &Value, job: &str) -> Option<Result<(), String>> {
    if event != "BLOCK_JOB_COMPLETED" || data.get("device").and_then(Value::as_str) != Some(job) {
        return None;
    }
    match data.get("error").and_then(Value::as_str) {
        Some(e) => Some(Err(e.to_string())),
        None => Some(Ok(())),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ExportDirtyExtentsError> + Send + 'static,
) -> Result<T, ExportDirtyExtentsError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ExportDirtyExtentsError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::parse_reply;

    #[test]
    fn parses_the_dirty_rate() {
        let v = json!({"status": "unstarted", "sample-pages": 0, "mode": "page-sampling",
            "start-time": 0, "calc-time": 0});
        let idle: DirtyRateInfo = parse_reply("query-dirty-rate", v).unwrap();
        assert_eq!(idle.status, DirtyRateStatus::Unstarted);
        assert_eq!(idle.bytes_per_sec(), None);
        let v = json!({"status": "measuring", "sample-pages": 4096, "mode": "page-sampling",
            "start-time": 1203, "calc-time": 1});
        let busy: DirtyRateInfo = parse_reply("query-dirty-rate", v).unwrap();
        assert_eq!(busy.bytes_per_sec(), None);
        let v = json!({"status": "measured", "sample-pages": 4096, "dirty-rate": 12,
            "mode": "page-sampling", "start-time": 1203, "calc-time": 1});
        let done: DirtyRateInfo = parse_reply("query-dirty-rate", v).unwrap();
        assert_eq!(done.dirty_rate, Some(12));
        assert_eq!(done.mode, Some(DirtyRateMeasureMode::PageSampling));
        assert_eq!(done.bytes_per_sec(), Some(12.0 * 1_048_576.0));
    }

    fn query_block_sample() -> Value {
        // QEMU 7.2's `query-block` for our `-blockdev` disk with a bitmap,
        // trimmed.
        json!([{
            "io-status": "ok", "device": "", "locked": false, "removable": false,
            "qdev": "/machine/peripheral/vblk0/virtio-backend", "type": "unknown",
            "inserted": {
                "iops_rd": 0, "detect_zeroes": "off", "image": {
                    "virtual-size": 2147483648u64, "filename": "/run/vm/disk.qcow2",
                    "cluster-size": 65536, "format": "qcow2", "actual-size": 2031616,
                    "backing-filename": "/bases/tiny/disk.raw", "dirty-flag": false
                },
                "ro": false, "node-name": "disk0", "backing_file_depth": 1, "drv": "qcow2",
                "encrypted": false, "bps": 0, "backing_file": "/bases/tiny/disk.raw",
                "file": "/run/vm/disk.qcow2", "write_threshold": 0,
                "cache": {"no-flush": false, "direct": false, "writeback": true},
                "dirty-bitmaps": [
                    {"name": "other", "recording": true, "persistent": false,
                        "busy": false, "granularity": 65536, "count": 5},
                    {"name": "handoff", "recording": true, "persistent": false,
                        "busy": false, "granularity": 65536, "count": 196608}
                ]
            }
        }, {"device": "cd0", "locked": false, "removable": true, "type": "unknown"}])
    }

    #[test]
    fn counts_a_bitmap_of_a_node() {
        let devices: Vec<BlockInfo> = parse_reply("query-block", query_block_sample()).unwrap();
        assert_eq!(devices.len(), 2);
        let disk = devices[0].inserted.as_ref().unwrap();
        assert_eq!(disk.image.as_ref().unwrap().virtual_size, 2 << 30);
        assert_eq!(disk.backing_file.as_deref(), Some("/bases/tiny/disk.raw"));
        assert_eq!(bitmap_count(&devices, "disk0", "handoff"), Some(196_608));
        assert_eq!(bitmap_count(&devices, "disk0", "missing"), None);
        assert_eq!(bitmap_count(&devices, "disk1", "handoff"), None);
    }

    #[test]
    fn parses_named_block_nodes() {
        let v = json!([
            {"node-name": "disk0", "drv": "raw", "file": "json:{...}", "ro": false,
                "image": {"virtual-size": 1048576, "filename": "x", "format": "raw"}},
            {"node-name": "disk0-file", "drv": "file", "file": "/run/vm/disk.raw", "ro": false}
        ]);
        let nodes: Vec<BlockDeviceInfo> = parse_reply("query-named-block-nodes", v).unwrap();
        assert_eq!(nodes[1].node_name.as_deref(), Some("disk0-file"));
        assert_eq!(nodes[1].file, "/run/vm/disk.raw");
        assert!(nodes[1].dirty_bitmaps.is_empty());
    }

    #[test]
    fn recognises_the_end_of_a_job() {
        let ok =
            json!({"device": EXPORT_NODE, "len": 10, "offset": 10, "speed": 0, "type": "backup"});
        assert_eq!(
            job_completed("BLOCK_JOB_COMPLETED", &ok, EXPORT_NODE),
            Some(Ok(()))
        );
        let bad = json!({"device": EXPORT_NODE, "error": "No space left on device"});
        assert_eq!(
            job_completed("BLOCK_JOB_COMPLETED", &bad, EXPORT_NODE),
            Some(Err("No space left on device".into()))
        );
        assert_eq!(job_completed("BLOCK_JOB_COMPLETED", &ok, "other"), None);
        assert_eq!(job_completed("JOB_STATUS_CHANGE", &ok, EXPORT_NODE), None);
    }
}
