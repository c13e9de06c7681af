//! Test fixture: a plain command. Built for wasm32-wasip2 it is a valid
//! component exporting `wasi:cli/run`, not a weir plugin.

fn main() {
    println!("I am not a weir plugin");
}
