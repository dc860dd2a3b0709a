pub mod base;
pub mod registry;
pub mod remote;
pub mod overlay;
