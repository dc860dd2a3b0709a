//! The daemon's state store: one record per VM in an embedded database
//! (redb), each write one ACID transaction, so a crash never loses or tears
//! a record.

use std::path::{Path, PathBuf};

use cloudlet_api::events::CloudletEvent;
use cloudlet_api::{AppInfo, PortMapping, Progress, StageTiming, VmInfo, VmState};
use cloudlet_qemu::VmSpec;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");

/// Version of [`VmRecord`]'s encoding (JSON in the `vms` table), checked
/// on every read.
///
/// - 1: the REST model `VmInfo` nested as `info`, beside the spec, pid,
///   directory, app and reserved resources (sessions 1-4).
/// - 2: a record of its own, flat ([`VmRecord`]); the REST model is made
///   from it ([`VmRecord::info`]). Format 1 records are read and upgraded.
///   Fields added within format 2 have defaults (`session_hash`, session
///   9, and `tenant`, session 14: none for a record written before, i.e.
///   the operator's).
pub const RECORD_FORMAT: u32 = 2;

/// What the daemon keeps about one VM: its persisted state (format
/// [`RECORD_FORMAT`]). Its state changes only through
/// [`VmRecord::set_state`] (`crate::lifecycle`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub format: u32,
    pub id: String,
    pub name: String,
    pub(crate) state: VmState,
    /// Rises on every move between cloudlets.
    pub generation: u64,
    pub base_id: String,
    pub overlay: String,
    pub flavor: String,
    pub ports: Vec<PortMapping>,
    pub created_unix: u64,
    /// The last progress recorded (a synthesis's or a handoff's).
    pub progress: Progress,
    pub timings: Vec<StageTiming>,
    pub error: Option<String>,
    /// For a VM that moved away: the cloudlet it moved to.
    pub moved_to: Option<String>,
    /// The QEMU command line's source of truth, once the VM has one.
    pub spec: Option<VmSpec>,
    pub pid: Option<u32>,
    /// Directory holding the VM's disk and device state.
    pub dir: PathBuf,
    pub app: AppInfo,
    /// Resources reserved by the VM's flavor.
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The handoff that brought the VM here, once this cloudlet committed
    /// it (stored before the VM resumes): a commit repeated after a restart
    /// is answered from it, never taken for an unknown handoff.
    pub committed_handoff: Option<String>,
    /// BLAKE3 (hex) of the VM's session credential (a device's session
    /// moves and deletes the VM with it); carried on every move.
    #[serde(default)]
    pub session_hash: Option<String>,
    /// The tenant that owns the VM (none: the operator's); carried on every
    /// move.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// What a new record is made of ([`VmRecord::new`]).
pub struct NewVmRecord<'a> {
    pub id: String,
    pub name: String,
    /// `Synthesizing` or `Receiving`.
    pub state: VmState,
    pub generation: u64,
    pub base_id: String,
    pub overlay: String,
    pub flavor: &'a cloudlet_api::Flavor,
    pub dir: PathBuf,
    pub app: AppInfo,
}

impl VmRecord {
    /// A record of a VM about to be made here: no ports, QEMU or history yet.
    pub fn new(n: NewVmRecord<'_>) -> VmRecord {
        VmRecord {
            format: RECORD_FORMAT,
            id: n.id,
            name: n.name,
            state: n.state,
            generation: n.generation,
            base_id: n.base_id,
            overlay: n.overlay,
            flavor: n.flavor.name.clone(),
            ports: vec![],
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            progress: Progress::default(),
            timings: vec![],
            error: None,
            moved_to: None,
            spec: None,
            pid: None,
            dir: n.dir,
            app: n.app,
            vcpus: n.flavor.vcpus,
            memory_mib: n.flavor.memory_mib,
            committed_handoff: None,
            session_hash: None,
            tenant: None,
        }
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    /// The REST model of this VM.
    pub fn info(&self) -> VmInfo {
        VmInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            state: self.state,
            generation: self.generation,
            base_id: self.base_id.clone(),
            overlay: self.overlay.clone(),
            flavor: self.flavor.clone(),
            ports: self.ports.clone(),
            created_unix: self.created_unix,
            progress: self.progress.clone(),
            timings: self.timings.clone(),
            error: self.error.clone(),
            moved_to: self.moved_to.clone(),
            session_token: None,
            tenant: self.tenant.clone(),
        }
    }

    /// Does `token` open this VM's session?
    pub fn session_opens(&self, token: &str) -> bool {
        self.session_hash
            .as_deref()
            .is_some_and(|h| h == session_hash(token))
    }

    /// Read a stored record of any format this build knows.
    fn decode(id: &str, bytes: &[u8]) -> Result<VmRecord, StoreError> {
        let bad = |detail: String| StoreError::Decode {
            id: id.to_string(),
            detail,
        };
        #[derive(Deserialize)]
        struct Format {
            format: u32,
        }
        let Format { format } = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        match format {
            RECORD_FORMAT => serde_json::from_slice(bytes).map_err(|e| bad(e.to_string())),
            1 => serde_json::from_slice::<VmRecordV1>(bytes)
                .map(VmRecordV1::upgrade)
                .map_err(|e| bad(format!("format 1: {e}"))),
            n => Err(bad(format!(
                "format {n} is newer than this cloudletd reads ({RECORD_FORMAT}): run the newer release"
            ))),
        }
    }
}

/// Format 1 (see [`RECORD_FORMAT`]).
#[derive(Deserialize)]
struct VmRecordV1 {
    info: VmInfo,
    spec: Option<VmSpec>,
    pid: Option<u32>,
    dir: PathBuf,
    app: AppInfo,
    vcpus: u32,
    memory_mib: u64,
    #[serde(default)]
    committed_handoff: Option<String>,
}

impl VmRecordV1 {
    fn upgrade(self) -> VmRecord {
        let i = self.info;
        VmRecord {
            format: RECORD_FORMAT,
            id: i.id,
            name: i.name,
            state: i.state,
            generation: i.generation,
            base_id: i.base_id,
            overlay: i.overlay,
            flavor: i.flavor,
            ports: i.ports,
            created_unix: i.created_unix,
            progress: i.progress,
            timings: i.timings,
            error: i.error,
            moved_to: i.moved_to,
            spec: self.spec,
            pid: self.pid,
            dir: self.dir,
            app: self.app,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            committed_handoff: self.committed_handoff,
            session_hash: None,
            tenant: None,
        }
    }
}

/// The digest a session credential is kept as.
pub fn session_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Cannot open the state store {path}: {detail}")]
    Open { path: PathBuf, detail: String },
    #[error("State store: {0}")]
    Db(String),
    #[error("Record {id} is unreadable: {detail}")]
    Decode { id: String, detail: String },
}

fn db<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

pub struct Store {
    db: Database,
    /// Every change of a VM's state, as stored, and the progress of what
    /// runs (`GET /v1/events`).
    events: tokio::sync::broadcast::Sender<CloudletEvent>,
    /// The state each VM was last stored with, and its tenant (told with
    /// its deletion too).
    last: std::sync::Mutex<std::collections::HashMap<String, (VmState, Option<String>)>>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(VMS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Store {
            db,
            events: tokio::sync::broadcast::channel(1024).0,
            last: Default::default(),
        })
    }

    /// The state changes (and progress) from now on.
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<CloudletEvent> {
        self.events.subscribe()
    }

    /// Where the progress of an operation is told (beside the state
    /// changes, in the order they happen).
    pub fn event_sender(&self) -> tokio::sync::broadcast::Sender<CloudletEvent> {
        self.events.clone()
    }

    /// Tell the watchers when `rec`'s state differs from the stored one
    /// (`None`: deleted).
    fn changed(&self, id: &str, rec: Option<&VmRecord>) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = rec.map(|r| r.state);
        let before = match rec {
            Some(r) => last.insert(id.to_string(), (r.state, r.tenant.clone())),
            None => last.remove(id),
        };
        let tenant = rec.map_or_else(
            || before.as_ref().and_then(|b| b.1.clone()),
            |r| r.tenant.clone(),
        );
        let from = before.map(|b| b.0);
        if from == now {
            return;
        }
        let unix_ms = crate::progress::unix_ms();
        let _ = self.events.send(CloudletEvent::Vm(cloudlet_api::VmEvent {
            vm_id: id.to_string(),
            name: rec.map(|r| r.name.clone()).unwrap_or_default(),
            from,
            state: now,
            generation: rec.map_or(0, |r| r.generation),
            ports: rec.map(|r| r.ports.clone()).unwrap_or_default(),
            moved_to: rec.and_then(|r| r.moved_to.clone()),
            error: rec.and_then(|r| r.error.clone()),
            unix_ms,
            mobility: cloudlet_api::Mobility::of(from, now),
            tenant,
        }));
    }

    pub fn put(&self, rec: &VmRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(rec).map_err(db)?;
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(VMS).map_err(db_err)?;
            t.insert(rec.id.as_str(), bytes.as_slice())
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        self.changed(&rec.id, Some(rec));
        Ok(())
    }

    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(VMS).map_err(db_err)?;
            t.remove(id).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        self.changed(id, None);
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<VmRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(VMS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            out.push(VmRecord::decode(k.value(), v.value())?);
        }
        // What is stored now is no change to tell (after a restart).
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        for r in &out {
            last.insert(r.id.clone(), (r.state, r.tenant.clone()));
        }
        Ok(out)
    }
}

fn db_err<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(e.into().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> VmRecord {
        VmRecord {
            format: RECORD_FORMAT,
            id: id.into(),
            name: id.into(),
            state: VmState::Running,
            generation: 1,
            base_id: "b".into(),
            overlay: "u".into(),
            flavor: "small".into(),
            ports: vec![],
            created_unix: 0,
            progress: Progress::default(),
            timings: vec![],
            error: None,
            moved_to: None,
            spec: None,
            pid: Some(1),
            dir: "/x".into(),
            app: AppInfo::default(),
            vcpus: 1,
            memory_mib: 512,
            committed_handoff: None,
            session_hash: None,
            tenant: None,
        }
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let s = Store::open(&path).unwrap();
            s.put(&rec("a")).unwrap();
            s.put(&rec("b")).unwrap();
            s.delete("a").unwrap();
        }
        let s = Store::open(&path).unwrap();
        let l = s.list().unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].id, "b");
        assert_eq!(l[0].info().state, VmState::Running);
    }

    /// What sessions 1-4 wrote (format 1, the REST model nested).
    const V1: &str = r#"{"format":1,"info":{"id":"a1","name":"kv","state":"moved","generation":2,
        "base_id":"b","overlay":"u","flavor":"small","ports":[],"created_unix":5,
        "progress":{"stage":"ready","bytes_fetched":0,"bytes_total":0,"segments_applied":0,
        "segments_total":0},"timings":[],"moved_to":"http://next"},"spec":null,"pid":7,
        "dir":"/x","app":{"name":"kv","ports":[8080]},"vcpus":1,"memory_mib":512}"#;

    #[test]
    fn a_format_1_record_is_read_and_upgraded() {
        let r = VmRecord::decode("a1", V1.as_bytes()).unwrap();
        assert_eq!(r.format, RECORD_FORMAT);
        assert_eq!(
            (r.state(), r.generation, r.pid),
            (VmState::Moved, 2, Some(7))
        );
        assert_eq!(r.moved_to.as_deref(), Some("http://next"));
        assert_eq!(r.app.ports, vec![8080]);
        // And written back in the current format, it reads the same.
        let again = serde_json::to_vec(&r).unwrap();
        let r2 = VmRecord::decode("a1", &again).unwrap();
        assert_eq!(r2.info(), r.info());
    }

    #[test]
    fn a_record_of_a_newer_format_or_garbage_is_refused_by_name() {
        let newer = V1.replace(r#""format":1"#, r#""format":9"#);
        let e = VmRecord::decode("a1", newer.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("a1") && e.contains("format 9"), "{e}");
        let e = VmRecord::decode("zz", b"{not json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("zz"), "{e}");
    }
}
