//! The transport core of live VM handoff between cloudlets.
//!
//! QEMU on the source cloudlet migrates into a socket owned by the daemon;
//! the daemon runs the stream through an [`Encoder`], ships the frames to the
//! destination daemon, whose [`Decoder`] rebuilds the exact byte stream for
//! its QEMU's `-incoming`. Everything here is pure and synchronous: no
//! sockets, no QEMU control; the daemon drives it.
//!
//! - [`stream`]: an incremental parser of QEMU's precopy stream that finds RAM
//!   page records and passes everything else through, byte-exact.
//! - [`wire`]: the versioned cloudlet-to-cloudlet wire format.
//! - [`Encoder`] / [`Decoder`]: base-aware dedup (pages equal to the base VM's
//!   memory or to pages already sent become references), XOR delta against
//!   the base, batched compression with a per-frame codec.
//! - [`AdaptivePolicy`]: picks the codec, level and delta mode that maximize
//!   the rate at which VM state crosses the link.
//! - [`memcheck`]: digests of the moved guest memory, compared before the
//!   destination resumes it, and the repair of pages that differ.
//! - [`converge::Convergence`]: how much of the time the guest may run so that
//!   precopy converges over a link slower than the guest dirties memory.

pub mod converge;
pub mod memcheck;
pub mod session;
pub mod stream;
pub mod synth;
pub mod wire;

mod codec;
mod decode;
mod encode;
mod policy;

pub use codec::{BaseMemory, Mode};
pub use decode::{DecodeStats, DecodeStreamError, Decoder, DecoderConfig};
pub use encode::{EncodeStats, EncodeStreamError, EncodeSummary, Encoder, EncoderConfig};
pub use policy::{AdaptivePolicy, ModeMeasure, PolicyConfig};
pub use stream::{ParseSummary, RamBlock, StreamEvent, StreamParser, PAGE_SIZE};
pub use wire::Codec;
