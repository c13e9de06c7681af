//! Weir's end-to-end tests: one binary, a module per concern. Plugins are
//! built for wasm32-wasip2 by `support` (once per test process; cargo makes
//! repeats no-ops), never taken prebuilt.

#![allow(clippy::unwrap_used, reason = "a test that cannot unwrap has failed")]

mod admin;
mod broker;
mod cli;
mod density;
mod engine;
mod files;
mod kafka;
mod parquet;
mod pipeline;
mod postgres;
mod sandbox;
mod support;
mod swap;
mod trial;
mod window;
