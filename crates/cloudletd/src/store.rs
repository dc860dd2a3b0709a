//! The daemon's state store: one record per VM in an embedded database
//! (redb), each write one ACID transaction, so a crash never loses or tears
//! a record.

use std::path::{Path, PathBuf};

use cloudlet_api::{AppInfo, VmInfo};
use cloudlet_qemu::VmSpec;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");

/// Version of [`VmRecord`]'s encoding.
pub const RECORD_FORMAT: u32 = 1;

/// What the daemon keeps about one VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub format: u32,
    pub info: VmInfo,
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
    #[serde(default)]
    pub committed_handoff: Option<String>,
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
        Ok(Store { db })
    }

    pub fn put(&self, rec: &VmRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(rec).map_err(db)?;
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(VMS).map_err(db_err)?;
            t.insert(rec.info.id.as_str(), bytes.as_slice())
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(VMS).map_err(db_err)?;
            t.remove(id).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    pub fn list(&self) -> Result<Vec<VmRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(VMS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            let rec: VmRecord =
                serde_json::from_slice(v.value()).map_err(|e| StoreError::Decode {
                    id: k.value().to_string(),
                    detail: e.to_string(),
                })?;
            out.push(rec);
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
    use cloudlet_api::{Progress, VmState};

    fn rec(id: &str) -> VmRecord {
        VmRecord {
            format: RECORD_FORMAT,
            info: VmInfo {
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
            },
            spec: None,
            pid: Some(1),
            dir: "/x".into(),
            app: AppInfo::default(),
            vcpus: 1,
            memory_mib: 512,
            committed_handoff: None,
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
        assert_eq!(l[0].info.id, "b");
    }
}
