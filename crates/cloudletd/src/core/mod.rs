//! The cloudlet's core: the VM registry and capacity ([`cloudlet`]), which
//! VM state may follow which ([`lifecycle`]), the persisted records
//! ([`store`]) and what a restarted daemon does with them (`recovery`);
//! the end of an early start's memory stream, recorded (`streaming`);
//! the membership of the directory ([`membership`]: its state only); the
//! history of handoffs out, kept for the dashboards ([`handoffs`]); who
//! calls and what a tenant sees and may hold ([`tenants`]).
//! It knows QEMU (through `cloudlet_qemu`) but neither HTTP nor handoffs.

pub mod cloudlet;
pub mod handoffs;
pub mod lifecycle;
pub mod membership;
mod recovery;
pub mod store;
mod streaming;
pub mod tenants;

pub use recovery::{kill_pid, qemu_alive};
