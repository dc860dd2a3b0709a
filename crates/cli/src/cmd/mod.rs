pub mod base;
pub mod directory;
pub mod discover;
pub mod doctor;
pub mod follow;
pub mod overlay;
pub mod registry;
pub mod remote;
