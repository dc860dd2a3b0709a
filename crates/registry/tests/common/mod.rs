//! Small real overlays for the tests: the same helpers the crate's unit
//! tests use.
#![allow(dead_code, unused_imports)]

#[path = "../../src/testutil.rs"]
mod testutil;

pub(crate) use testutil::{make_overlay, make_overlay_sized};
