use std::time::{Duration, Instant};
use std::sync::Arc;
use weir::engine::{EngineOptions, Limits, PluginEngine};
use weir::record::{Record, SourcePosition};
fn main() {
    let engine = PluginEngine::new(EngineOptions { cache_dir: Some("/tmp/wc".into()) }).unwrap();
    let plugin = weir::config::PluginConfig { name: None, wasm: None, crate_dir: None, config: Default::default() };
    let slot = weir::plugin::PluginSlot::start(&engine, "/work/main/target/wasm32-wasip2/release/identity.wasm".as_ref(), &plugin, &Limits { memory_bytes: 256<<20, batch_deadline: Duration::from_secs(30)}).unwrap();
    let mut chain = weir::pipeline::Chain::new(vec![slot]);
    let topic: Arc<str> = "bench".into();
    let recs: Vec<Record> = (0..1024).map(|i| { let mut r = Record::new(vec![b'x'; 100], SourcePosition { topic: topic.clone(), partition: 0, offset: i }); r.key = Some(bytes::Bytes::from_static(b"user-12")); r }).collect();
    let t = Instant::now();
    let mut n = 0;
    for _ in 0..30 {
    let inputs: Vec<Vec<Record>> = (0..300).map(|_| recs.clone()).collect();
    for input in inputs { n += chain.process(input).unwrap().records.len(); }
    }
    println!("{:.1} ns/rec", t.elapsed().as_nanos() as f64 / n as f64);
}
