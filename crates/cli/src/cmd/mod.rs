pub mod base;
pub mod overlay;
pub mod registry;
pub mod remote;
