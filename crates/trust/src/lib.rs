//! Trust: what keeps a cloudlet's credentials its own.
//!
//! [`secrets`]: files that hold credentials (configs with tokens, token
//! files, the daemon's own token) are readable by their owner only, and a
//! credential reaches a program through such a file or its environment,
//! never its command line (which every user of the host sees in `ps`).

pub mod secrets;
