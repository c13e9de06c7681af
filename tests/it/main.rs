//! Weir's end-to-end tests: one binary, a module per concern. Plugins are
//! built for wasm32-wasip2 by `support` (once per test process; cargo makes
//! repeats no-ops), never taken prebuilt.

mod broker;
mod cli;
mod engine;
mod kafka;
mod pipeline;
mod support;
