//! Trust: what keeps a cloudlet's credentials its own.
//!
//! [`secrets`]: files that hold credentials (configs with tokens, token
//! files, the daemon's own token) are readable by their owner only, and a
//! credential reaches a program through such a file or its environment,
//! never its command line (which every user of the host sees in `ps`).

//!
//! [`keys`]: overlay developers' Ed25519 signing keys (files, 0600) and
//! their public halves, which daemons and registries trust.

//!
//! [`pki`]: a fleet's own CA and the certificates it issues; [`tls`]: the
//! rustls settings of every listener, and the listener itself.

pub mod keys;
pub mod pki;
pub mod secrets;
pub mod tls;
