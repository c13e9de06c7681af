//! Test fixture: behaves like identity until a record's value names a
//! misdeed (`panic`, `spin`, `hog`, `fail`) or a probe of ambient
//! capabilities (`env`, `read`, `connect`), then commits it. Lets the
//! tests prove that each limit stops a plugin with its own error.

use serde::Deserialize;
use weir_guest::{Error, Output, RecordView, Result, Transform, export_transform};

/// Settings: how much memory `hog` grabs.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Misbehave {
    #[serde(default = "default_hog_mib")]
    hog_mib: usize,
}

fn default_hog_mib() -> usize {
    256
}

impl Transform for Misbehave {
    fn process(&mut self, record: RecordView<'_>, out: &mut Output) -> Result<()> {
        match record.value() {
            b"panic" => panic!("record at offset {} asked for a panic", record.offset()),
            b"spin" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            b"hog" => {
                let hog = vec![1u8; self.hog_mib << 20];
                std::hint::black_box(&hog);
                out.forward(&record);
            }
            b"env" => {
                let seen = format!(
                    "{} variables, cwd {:?}",
                    std::env::vars().count(),
                    std::env::current_dir().ok()
                );
                drop(out.emit(seen.as_bytes()));
            }
            b"read" => {
                let seen = match std::fs::read_to_string("/etc/hostname") {
                    Ok(text) => format!("read {} bytes", text.len()),
                    Err(err) => format!("denied: {err}"),
                };
                drop(out.emit(seen.as_bytes()));
            }
            b"connect" => {
                let seen = match std::net::TcpStream::connect("127.0.0.1:5432") {
                    Ok(_) => "connected".to_owned(),
                    Err(err) => format!("denied: {err}"),
                };
                drop(out.emit(seen.as_bytes()));
            }
            b"fail" => {
                return Err(Error::new(format!(
                    "record at offset {} is marked fail",
                    record.offset()
                )));
            }
            _ => out.forward(&record),
        }
        Ok(())
    }
}

export_transform!(Misbehave);
