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
mod aggregate;
#[cfg(feature = "bindings")]
mod guest;
#[cfg(feature = "bindings")]
pub use aggregate::{
    Aggregate, EncodedState, accumulate_states, configure_aggregate, create_state, finish_states,
    merge_states,
};
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

/// The generated bindings of the `aggregator` world; its host imports are
/// the transformer's (one `weir:plugin/host`).
#[cfg(feature = "bindings")]
#[doc(hidden)]
#[allow(missing_docs, reason = "generated code")]
pub mod aggregator_bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "aggregator",
        default_bindings_module: "weir_guest::aggregator_bindings",
        runtime_path: "weir_guest::__private::wit_bindgen::rt",
        pub_export_macro: true,
        export_macro_name: "__export_weir_aggregator",
        with: {
            "weir:plugin/host@0.1.0": crate::bindings::weir::plugin::host,
        },
    });
}

#[cfg(feature = "bindings")]
#[doc(hidden)]
pub mod __private {
    pub use crate::aggregate::{init_aggregate_exported, with_aggregate};
    pub use crate::aggregator_bindings::exports::weir::plugin::aggregate::{
        Guest as AggregateGuest, PluginInfo as AggregateInfo, State as AggregateState,
    };
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

/// Exports an [`Aggregate`] as the plugin's component (the `aggregator`
/// world).
///
/// ```rust,ignore
/// export_aggregate!(TopN);
/// ```
///
/// `TopN` must implement [`Aggregate`] (and so `serde::Deserialize`). The
/// plugin's name and version are the crate's, from `Cargo.toml`.
#[cfg(feature = "bindings")]
#[macro_export]
macro_rules! export_aggregate {
    ($aggregate:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::__private::{AggregateGuest, AggregateInfo, AggregateState};
            use ::std::string::String;
            use ::std::vec::Vec;

            struct WeirAggregateExport;

            fn to_wit(state: $crate::EncodedState) -> AggregateState {
                AggregateState { version: state.version, bytes: state.bytes }
            }

            impl AggregateGuest for WeirAggregateExport {
                fn describe() -> AggregateInfo {
                    AggregateInfo {
                        name: ::core::env!("CARGO_PKG_NAME").into(),
                        version: ::core::env!("CARGO_PKG_VERSION").into(),
                    }
                }

                fn init(config: String) -> ::core::result::Result<(), String> {
                    $crate::__private::init_aggregate_exported::<$aggregate>(&config)
                }

                fn create_state() -> AggregateState {
                    match $crate::create_state::<$aggregate>() {
                        Ok(state) => to_wit(state),
                        Err(err) => panic!("cannot encode an empty state: {err}"),
                    }
                }

                fn accumulate(states: Vec<u8>, batch: Vec<u8>, groups: Vec<u32>) -> Vec<u8> {
                    $crate::__private::with_aggregate::<$aggregate, _>(|aggregate| {
                        $crate::accumulate_states(aggregate, &states, &batch, &groups)
                    })
                }

                fn merge(states: Vec<u8>) -> ::core::result::Result<AggregateState, String> {
                    $crate::__private::with_aggregate::<$aggregate, _>(|aggregate| {
                        $crate::merge_states(aggregate, &states).map(to_wit)
                    })
                }

                fn finish(states: Vec<u8>) -> Vec<u8> {
                    $crate::__private::with_aggregate::<$aggregate, _>(|aggregate| {
                        $crate::finish_states(aggregate, &states)
                    })
                }
            }

            $crate::aggregator_bindings::__export_weir_aggregator!(WeirAggregateExport with_types_in $crate::aggregator_bindings);
        };
    };
}
