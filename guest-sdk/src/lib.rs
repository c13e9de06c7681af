#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

// Lets the generated bindings name this crate the same way from inside and
// from plugin crates (`weir_guest::...`).
extern crate self as weir_guest;

pub mod abi;
mod error;
pub mod json;
pub mod testing;

pub use abi::{Headers, RecordView};
pub use error::{Error, Result};

#[cfg(feature = "bindings")]
mod guest;
#[cfg(feature = "bindings")]
pub use guest::{Emit, Output, Transform, configure, counter, log, process_batch};

/// The generated `weir:plugin` bindings. Plugins do not need them directly;
/// they are public for [`export_transform!`].
#[cfg(feature = "bindings")]
#[doc(hidden)]
#[allow(missing_docs, reason = "generated code")]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "transformer",
        default_bindings_module: "weir_guest::bindings",
        runtime_path: "weir_guest::__private::wit_bindgen::rt",
        pub_export_macro: true,
        export_macro_name: "__export_weir_transformer",
    });
}

#[cfg(feature = "bindings")]
#[doc(hidden)]
pub mod __private {
    pub use crate::bindings::exports::weir::plugin::transform::{Guest, PluginInfo};
    pub use crate::guest::{init_exported, process_exported};
    pub use wit_bindgen;
}

/// Exports a [`Transform`] as the plugin's component.
///
/// ```rust,ignore
/// export_transform!(MyPlugin);
/// ```
///
/// `MyPlugin` must implement [`Transform`] (and so `serde::Deserialize`).
/// The plugin's name and version are the crate's, from `Cargo.toml`.
#[cfg(feature = "bindings")]
#[macro_export]
macro_rules! export_transform {
    ($plugin:ty) => {
        // Only the component exports anything: a native build (for `cargo
        // test`) would put WIT export names, which native linkers reject,
        // into the cdylib's symbol table.
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct WeirTransformExport;

            impl $crate::__private::Guest for WeirTransformExport {
                fn describe() -> $crate::__private::PluginInfo {
                    $crate::__private::PluginInfo {
                        name: ::core::env!("CARGO_PKG_NAME").into(),
                        version: ::core::env!("CARGO_PKG_VERSION").into(),
                    }
                }

                fn init(config: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                    $crate::__private::init_exported::<$plugin>(&config)
                }

                fn process(batch: ::std::vec::Vec<u8>) -> ::std::vec::Vec<u8> {
                    $crate::__private::process_exported::<$plugin>(&batch)
                }
            }

            $crate::bindings::__export_weir_transformer!(WeirTransformExport with_types_in $crate::bindings);
        };
    };
}
