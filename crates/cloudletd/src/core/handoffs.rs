//! The handoffs out of this cloudlet (`GET /v1/handoffs`): one
//! [`HandoffRecord`] each, moved or failed, with its phases and its course
//! over time, for the dashboard's history and the plots.
//!
//! Kept in `HOME/handoffs.jsonl`, one JSON record a line, appended when a
//! handoff ends (format: [`HandoffRecord`], its `version` is
//! [`HANDOFF_HISTORY_VERSION`]); a line this release cannot read (torn by
//! a crash, or of a later version) is skipped with a warning. The newest
//! [`KEEP`] are kept; the file is rewritten to them when it holds twice as
//! many.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cloudlet_api::events::{HandoffRecord, HANDOFF_HISTORY_VERSION};

/// How many handoffs the history keeps.
pub const KEEP: usize = 100;

/// The history's file in a cloudlet's home.
pub const FILE: &str = "handoffs.jsonl";

#[derive(Debug)]
pub struct HandoffHistory {
    path: PathBuf,
    /// Oldest first; and how many lines the file holds.
    recent: Mutex<(VecDeque<HandoffRecord>, usize)>,
}

impl HandoffHistory {
    /// The history kept in `home`, read back.
    pub fn open(home: &Path) -> HandoffHistory {
        let path = home.join(FILE);
        let mut recent = VecDeque::new();
        let mut lines = 0;
        if let Ok(text) = std::fs::read_to_string(&path) {
            for (n, line) in text.lines().enumerate() {
                lines += 1;
                match serde_json::from_str::<HandoffRecord>(line) {
                    Ok(r) if r.version == HANDOFF_HISTORY_VERSION => recent.push_back(r),
                    Ok(r) => {
                        tracing::warn!(path = %path.display(), line = n + 1, version = r.version, "handoff history: a record of another version, skipped")
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), line = n + 1, "handoff history: an unreadable record, skipped: {e}")
                    }
                }
                if recent.len() > KEEP {
                    recent.pop_front();
                }
            }
        }
        HandoffHistory {
            path,
            recent: Mutex::new((recent, lines)),
        }
    }

    /// A handoff that ended.
    pub fn record(&self, rec: HandoffRecord) {
        let mut g = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let (recent, lines) = &mut *g;
        let line = serde_json::to_string(&rec).unwrap_or_default();
        recent.push_back(rec);
        if recent.len() > KEEP {
            recent.pop_front();
        }
        let written = if *lines + 1 >= 2 * KEEP {
            self.rewrite(recent).map(|()| *lines = recent.len())
        } else {
            self.append(&line).map(|()| *lines += 1)
        };
        if let Err(e) = written {
            tracing::warn!(path = %self.path.display(), "handoff history not written: {e}");
        }
    }

    /// The newest first, at most `limit`.
    pub fn list(&self, limit: usize) -> Vec<HandoffRecord> {
        let g = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        g.0.iter().rev().take(limit).cloned().collect()
    }

    pub fn get(&self, handoff_id: &str) -> Option<HandoffRecord> {
        let g = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        g.0.iter().find(|r| r.handoff_id == handoff_id).cloned()
    }

    fn append(&self, line: &str) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        f.write_all(format!("{line}\n").as_bytes())
    }

    /// The file holds `recent` alone (written aside, then renamed).
    fn rewrite(&self, recent: &VecDeque<HandoffRecord>) -> std::io::Result<()> {
        let tmp = self.path.with_extension("jsonl.tmp");
        let mut text = String::new();
        for r in recent {
            text.push_str(&serde_json::to_string(r).unwrap_or_default());
            text.push('\n');
        }
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudlet_api::events::HandoffOutcome;

    fn rec(n: usize) -> HandoffRecord {
        HandoffRecord {
            version: HANDOFF_HISTORY_VERSION,
            handoff_id: format!("h{n}"),
            vm_id: "v".into(),
            name: "kv".into(),
            destination: "http://b".into(),
            started_unix_ms: n as u64,
            total_ms: 10,
            outcome: HandoffOutcome::Moved,
            error: None,
            downtime_ms: Some(5),
            wire_bytes: 1,
            raw_bytes: 2,
            disk_bytes: 0,
            phases: vec![],
            switchover_ms: None,
            samples: vec![],
            tenant: None,
        }
    }

    #[test]
    fn the_history_survives_a_restart_skips_torn_lines_and_keeps_the_newest() {
        let home = tempfile::tempdir().unwrap();
        let h = HandoffHistory::open(home.path());
        h.record(rec(1));
        h.record(rec(2));
        // A crash tore the last line.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(home.path().join(FILE))
            .unwrap();
        f.write_all(b"{\"version\":1,\"hand").unwrap();
        drop(f);
        let h = HandoffHistory::open(home.path());
        let ids: Vec<_> = h.list(10).into_iter().map(|r| r.handoff_id).collect();
        assert_eq!(ids, ["h2", "h1"]);
        assert_eq!(h.get("h1").unwrap().started_unix_ms, 1);
        for n in 3..=(2 * KEEP + 5) {
            h.record(rec(n));
        }
        let h = HandoffHistory::open(home.path());
        let all = h.list(usize::MAX);
        assert_eq!(all.len(), KEEP);
        assert_eq!(all[0].handoff_id, format!("h{}", 2 * KEEP + 5));
        let lines = std::fs::read_to_string(home.path().join(FILE))
            .unwrap()
            .lines()
            .count();
        assert!(lines < 2 * KEEP, "rewritten: {lines} lines");
    }
}
