//! Benchmark harness for the backup pipeline without S3: walks, reads and tars the configured
//! paths and compresses them exactly as `lifeboat backup` does (same memory plan, same codec
//! pool), into a sink that counts the bytes and discards them. `scripts/bench.sh` compares it
//! with `tar cf - DIR | cat > /dev/null` to find the walk/read/tar stage's ceiling.
//!
//! ```text
//! cargo run --release --example pipeline -- CONFIG.toml
//! ```
//! Prints one line: input bytes, stream bytes, seconds, MB/s of input, and the plan.

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use lifeboat::archive::{self, ArchiveOptions, Counters};
use lifeboat::config::Config;
use lifeboat::{budget, compress, job};

/// Counts and drops.
struct Discard(u64);

impl Write for Discard {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    lifeboat::memory::bound_large_blocks();
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: pipeline CONFIG.toml")?;
    let cfg = Config::load(path.as_ref())?;
    let plan = budget::plan(cfg.budget_request(compress::wanted_workers(cfg.backup.workers)))?;
    let clock = Instant::now();
    let compressor = compress::compressor(
        cfg.backup.compression,
        cfg.backup.level,
        plan.pool(),
        Discard(0),
    )?;
    let counters = Counters::default();
    let opts = ArchiveOptions {
        paths: &cfg.backup.paths,
        exclude: &cfg.backup.exclude_set,
        one_file_system: cfg.backup.one_file_system,
    };
    let shared = Arc::new(archive::Shared::new(job::Sink(compressor)));
    let (sink, report) = archive::write_shared(&opts, &shared, &counters, &AtomicBool::new(false))?;
    let out = sink.0.finish()?;
    let secs = clock.elapsed().as_secs_f64();
    println!(
        "read {} stream {} seconds {secs:.3} MB/s {:.1} workers {} block {} files {}",
        report.bytes_read,
        out.0,
        report.bytes_read as f64 / secs / 1e6,
        plan.workers,
        plan.block_size,
        report.file_count(),
    );
    Ok(())
}
