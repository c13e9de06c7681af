//! Test fixture: the same world as weir's, but at version 1.0.0, so the
//! host must refuse it by version.

wit_bindgen::generate!({ path: "wit", world: "transformer" });

use exports::weir::plugin::transform::{Guest, PluginInfo};

struct FromTheFuture;

impl Guest for FromTheFuture {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "future-version".into(),
            version: "1.0.0".into(),
        }
    }

    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn process(batch: Vec<u8>) -> Vec<u8> {
        batch
    }
}

export!(FromTheFuture);
