pub mod base;
pub mod doctor;
pub mod overlay;
pub mod registry;
pub mod remote;
