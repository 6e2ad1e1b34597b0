//! Runs of zeros written the ordinary way, shared by the stages that may also store them more
//! cheaply ([`crate::archive::TarSink`], [`crate::compress::Compressor::write_zeros`]).

use std::io::{self, Write};

/// Writes `n` zero bytes into `w`.
pub fn write_zeros<W: Write + ?Sized>(w: &mut W, mut n: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    while n > 0 {
        let chunk = usize::try_from(n).unwrap_or(usize::MAX).min(ZEROS.len());
        w.write_all(&ZEROS[..chunk])?;
        n -= chunk as u64;
    }
    Ok(())
}
