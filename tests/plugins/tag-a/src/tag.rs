//! Test fixture shared by `tag-a` and `tag-b` (the tag is the last letter of
//! the crate's name): every record comes out as one value,
//! `TAG PARTITION CALL OFFSET`, where CALL is `PARTITION:OFFSET` of the first
//! record of the plugin call that processed it. A test groups outputs by call to
//! check that no call mixed versions, and reads the offsets to check that
//! every input came out exactly once.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, Ordering};

use serde::Deserialize;
use weir_guest::{Output, RecordView, Result, Transform};

const TAG: &str = match env!("CARGO_PKG_NAME").as_bytes() {
    [.., b'a'] => "a",
    _ => "b",
};

/// Set by each call into the plugin; the first record of the call clears it.
static NEW_CALL: AtomicBool = AtomicBool::new(true);
static CALL_PARTITION: AtomicI32 = AtomicI32::new(-1);
static CALL_OFFSET: AtomicI64 = AtomicI64::new(-1);

/// No settings; any given (meant for a version it is swapped with) are
/// ignored.
#[derive(Deserialize)]
pub struct Tag {}

impl Transform for Tag {
    fn process(&mut self, record: RecordView<'_>, out: &mut Output) -> Result<()> {
        if NEW_CALL.swap(false, Ordering::Relaxed) {
            CALL_PARTITION.store(record.partition(), Ordering::Relaxed);
            CALL_OFFSET.store(record.offset(), Ordering::Relaxed);
        }
        let value = format!(
            "{TAG} {} {}:{} {}",
            record.partition(),
            CALL_PARTITION.load(Ordering::Relaxed),
            CALL_OFFSET.load(Ordering::Relaxed),
            record.offset()
        );
        let _ = out.emit(value.as_bytes());
        Ok(())
    }
}

// `export_transform!`, with a mark at the start of every call.
#[cfg(target_arch = "wasm32")]
const _: () = {
    struct TagExport;

    impl weir_guest::__private::Guest for TagExport {
        fn describe() -> weir_guest::__private::PluginInfo {
            weir_guest::__private::PluginInfo {
                name: env!("CARGO_PKG_NAME").into(),
                version: env!("CARGO_PKG_VERSION").into(),
            }
        }

        fn init(config: String) -> core::result::Result<(), String> {
            weir_guest::__private::init_exported::<Tag>(&config)
        }

        fn process(batch: Vec<u8>) -> Vec<u8> {
            NEW_CALL.store(true, Ordering::Relaxed);
            weir_guest::__private::process_exported::<Tag>(&batch)
        }
    }

    weir_guest::bindings::__export_weir_transformer!(TagExport with_types_in weir_guest::bindings);
};
