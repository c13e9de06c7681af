//! Test fixture: tags records `a` (see `tag.rs`, shared with `tag-b`).
#[path = "tag.rs"]
pub mod tag;
