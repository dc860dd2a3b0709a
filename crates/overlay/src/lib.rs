//! VM overlays: the disk and memory state of an app's launch VM that differ
//! from its base VM, deduplicated, delta-encoded and compressed.
//!
//! - [`create_overlay`] builds an overlay from base and launch images.
//! - [`Validation`] says whether a file is a valid overlay (the one answer
//!   that inspect, verify, the registry and the daemon share).
//! - [`inspect`] validates and explains an overlay without its base;
//!   [`verify`] checks it against a base.
//! - [`apply_overlay`] rebuilds the launch images; [`Applier`] does the same
//!   segment by segment, as they arrive.
//! - [`signature`]: signed overlays (who made one, until when), judged by a
//!   [`signature::SignaturePolicy`] before any segment is fetched.
//! - [`LaunchPlan`] says which segments a VM needs before it can start
//!   early, and which segment each memory page waits on.
//!
//! The file format (version [`FORMAT_VERSION`]) is documented in [`format`].
//! Pure Rust: no QEMU, no network.

mod apply;
pub mod codec;
mod create;
pub mod early;
pub mod format;
mod fsutil;
pub mod fuzzing;
mod inspect;
pub mod signature;
pub mod validate;

pub use apply::{
    apply_overlay, apply_overlay_from_reader, read_manifest, Applier, ApplyConfig, ApplyOutput,
    ApplyOverlayError,
};
pub use codec::Codec;
pub use create::{
    create_overlay, create_overlay_to_writer, CreateConfig, CreateOverlayError, OverlayStats,
    DEFAULT_SEGMENT_SIZE,
};
pub use early::{EarlyStartError, LaunchPlan};
pub use format::{FormatError, Hash, Header, Image, Manifest, FORMAT_VERSION};
pub use inspect::{
    chunk_stats, info, inspect, verify, BaseImages, ChunkStats, InspectOverlayError, KindStats,
    OverlayInfo, SignatureInfo, VerifyOverlayError,
};
pub use validate::{
    check_metadata, AppMetadata, InvalidOverlay, Level, ValidOverlay, ValidateOverlayError,
    Validation,
};
