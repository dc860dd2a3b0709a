//! The life of a VM on this cloudlet: which state may follow which, and
//! what each state allows. Every change of a record's state goes through
//! [`VmRecord::set_state`], which refuses a transition not listed here.
//!
//! ```text
//!                 synthesis                       handoff (source)
//!   Synthesizing ----------> Running ---------------------> HandingOff
//!        |                   |  ^  \                        |  |   |
//!        | failed            |  |   \ QEMU died       failed|  |   | move recorded,
//!        v                   |  |    v                      |  |   | commit sent
//!      Failed     delete     |  +----------------------------+  |   v
//!        |       +-----------+        Dead <-----------------+  |  Moved
//!        v       v                     |       QEMU died        |   |
//!      Deleting <--------------------- + <----------------------+---+ (definite refusal
//!      (record removed)                                               of the commit:
//!                                                                     back to HandingOff)
//!   Receiving --commit stored--> Running        (handoff, destination; an arrival
//!                                                 may replace a Moved, Dead or Failed
//!                                                 record of the same VM at a lower
//!                                                 generation: it comes back)
//!   Running --early start's tail failed--> Failed   (memory still streaming in
//!                                                 when the overlay failed)
//! ```
//!
//! Running -> Failed: an early start whose memory was still streaming in
//! when a segment turned out bad (or its fetch failed) for good; the guest
//! cannot be trusted, its QEMU is killed and its files removed, the record
//! keeps the cause (`core::streaming`).
//!
//! A restart of the daemon fails a synthesis that was cut short, drops an
//! arrival that was not committed, and re-adopts what runs
//! (`Running`/`HandingOff` -> `Running`, or `Dead` when QEMU is gone).

use cloudlet_api::VmState;

use crate::core::store::VmRecord;

/// What a VM's state allows.
pub trait VmLifecycle: Copy {
    /// `self -> to` is a transition of the diagram above.
    fn can_become(self, to: VmState) -> bool;
    /// It counts against the cloudlet's capacity (and its name is taken).
    fn holds_resources(self) -> bool;
    /// It may be handed off to another cloudlet now.
    fn can_hand_off(self) -> bool;
    /// It may be deleted now (not while something is under way).
    fn can_delete(self) -> bool;
    /// An arriving copy of the same VM may replace this record (it moved
    /// away, or nothing of it runs here).
    fn can_be_replaced_by_arrival(self) -> bool;
    /// Its QEMU's exit is unexpected (the VM dies).
    fn can_die(self) -> bool;
}

impl VmLifecycle for VmState {
    fn can_become(self, to: VmState) -> bool {
        use VmState::*;
        matches!(
            (self, to),
            (Synthesizing, Running | Failed)
                | (Running, HandingOff | Deleting | Dead | Failed)
                | (HandingOff, Running | Moved | Dead)
                | (Moved, HandingOff | Deleting)
                | (Receiving, Running)
                | (Failed | Dead, Deleting)
        )
    }

    fn holds_resources(self) -> bool {
        use VmState::*;
        matches!(
            self,
            Synthesizing | Running | HandingOff | Receiving | Deleting
        )
    }

    fn can_hand_off(self) -> bool {
        self == VmState::Running
    }

    fn can_delete(self) -> bool {
        use VmState::*;
        !matches!(self, Synthesizing | HandingOff | Receiving | Deleting)
    }

    fn can_be_replaced_by_arrival(self) -> bool {
        use VmState::*;
        matches!(self, Moved | Dead | Failed)
    }

    fn can_die(self) -> bool {
        matches!(self, VmState::Running | VmState::HandingOff)
    }
}

/// A transition the lifecycle does not allow (a bug where it happens).
#[derive(Debug, Clone, thiserror::Error)]
#[error("VM {id} cannot go from {from:?} to {to:?}")]
pub struct TransitionError {
    pub id: String,
    pub from: VmState,
    pub to: VmState,
}

impl VmRecord {
    /// Move the record to state `to`, if the lifecycle allows it (setting
    /// the state it has is allowed and does nothing). The caller persists.
    pub fn set_state(&mut self, to: VmState) -> Result<(), TransitionError> {
        if self.state == to {
            return Ok(());
        }
        if !self.state.can_become(to) {
            return Err(TransitionError {
                id: self.id.clone(),
                from: self.state,
                to,
            });
        }
        tracing::debug!(vm_id = %self.id, from = ?self.state, to = ?to, "VM state");
        self.state = to;
        Ok(())
    }

    /// [`VmRecord::set_state`] where a refusal can only be a bug: it is
    /// logged and the state stays as it was.
    pub fn set_state_or_log(&mut self, to: VmState) {
        if let Err(e) = self.set_state(to) {
            tracing::error!(vm_id = %self.id, "refused: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmState::*;

    const ALL: [VmState; 8] = [
        Synthesizing,
        Running,
        HandingOff,
        Receiving,
        Moved,
        Failed,
        Dead,
        Deleting,
    ];

    #[test]
    fn a_vm_in_flight_is_never_deletable_nor_movable() {
        for s in [Synthesizing, HandingOff, Receiving, Deleting] {
            assert!(!s.can_delete(), "{s:?}");
            assert!(!s.can_hand_off(), "{s:?}");
            assert!(!s.can_become(Deleting), "{s:?}");
        }
        assert!(Running.can_hand_off() && Running.can_delete());
    }

    #[test]
    fn a_running_vm_whose_early_start_failed_is_failed_and_frees_its_share() {
        // Its memory stream failed: recorded failed (not dead: its QEMU is
        // killed on purpose, after), deletable, no longer counted.
        assert!(Running.can_become(Failed));
        assert!(!Failed.holds_resources() && !Failed.can_die());
        assert!(Failed.can_delete() && Failed.can_become(Deleting));
        for s in [HandingOff, Moved, Receiving, Dead, Deleting] {
            assert!(!s.can_become(Failed), "{s:?}");
        }
    }

    #[test]
    fn only_an_arrival_or_a_restart_brings_a_moved_vm_back() {
        // A moved VM never runs here again by a transition of its own,
        // except back to HandingOff when its commit was refused.
        assert!(!Moved.can_become(Running));
        assert!(Moved.can_become(HandingOff));
        assert!(Moved.can_be_replaced_by_arrival());
        for s in [Running, HandingOff, Receiving, Synthesizing, Deleting] {
            assert!(!s.can_be_replaced_by_arrival(), "{s:?}");
        }
    }

    #[test]
    fn nothing_leaves_deleting_and_every_state_can_end() {
        for to in ALL {
            assert!(!Deleting.can_become(to), "{to:?}");
        }
        // Every state but Deleting reaches Deleting (through Dead or Moved
        // at worst).
        for s in ALL {
            let reach = s.can_become(Deleting)
                || ALL
                    .iter()
                    .any(|&m| s.can_become(m) && m.can_become(Deleting));
            assert!(s == Deleting || reach, "{s:?}");
        }
    }

    #[test]
    fn set_state_refuses_what_the_diagram_does_not_show() {
        let mut r: VmRecord = serde_json::from_value(serde_json::json!({
            "format": crate::core::store::RECORD_FORMAT, "id": "v", "name": "v", "state": "receiving",
            "generation": 2, "base_id": "b", "overlay": "o", "flavor": "small", "ports": [],
            "created_unix": 0, "progress": {"stage": "", "bytes_fetched": 0, "bytes_total": 0,
            "segments_applied": 0, "segments_total": 0}, "timings": [], "error": null,
            "moved_to": null, "spec": null, "pid": null, "dir": "/x",
            "app": {"name": "a", "ports": []}, "vcpus": 1, "memory_mib": 1, "committed_handoff": null
        }))
        .unwrap();
        let e = r.set_state(Moved).unwrap_err();
        assert_eq!((e.from, e.to), (Receiving, Moved));
        assert_eq!(r.state(), Receiving);
        r.set_state(Running).unwrap();
        r.set_state(Running).unwrap();
        assert_eq!(r.state(), Running);
    }
}
