//! Test fixture: tags records `b` (see `../tag-a/src/tag.rs`, shared with
//! `tag-a`).
#[path = "../../tag-a/src/tag.rs"]
pub mod tag;
