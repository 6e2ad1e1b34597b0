//! The process's memory beyond what Rust manages: the C allocator's one setting that matters for
//! bounded memory, and the code pages start-up (or a job) touched.
//!
//! glibc's malloc serves large blocks with `mmap` only until the first one is freed; then it
//! raises its threshold to that block's size (up to 32 MiB) and serves later ones from its
//! per-thread heaps, where freed blocks stay resident and fragment. The pipeline frees megabytes
//! on other threads than the ones that allocated them (parts on the runtime, compressed units on
//! the writer), so measured peak RSS ran up to twice what was live: 126 MiB against 66 MiB for
//! 16 gzip workers. A fixed threshold keeps every block of 256 KiB or more in its own mapping,
//! returned to the system when freed. Other C libraries are left as they are.

/// Fixes the `mmap` threshold at 256 KiB. Call once, before other threads start.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn bound_large_blocks() {
    const THRESHOLD: libc::c_int = 256 * 1024;
    // SAFETY: mallopt only changes the allocator's parameters; it is called at start-up,
    // before any other thread exists, and its arguments are constants glibc documents.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD) };
    if ok != 1 {
        tracing::debug!("mallopt(M_MMAP_THRESHOLD) refused; large blocks may stay resident");
    }
}

/// Not glibc: nothing to do.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn bound_large_blocks() {}

/// Gives back the code and read-only data pages of this binary and its libraries (private, not
/// writable, never written): start-up runs code the idle daemon never runs again
/// (configuration, the SDK's credential chain, TLS set-up), and those pages stay resident,
/// 12 MiB of the idle daemon's 15.
/// Pages still in use are mapped again from the page cache on their next use (a minor fault, no
/// disk read). Mappings with any page written since it was mapped (relocated data: private dirty,
/// anonymous or swapped pages) are left alone.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn release_code_pages() {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    let mut released = 0usize;
    for (range, dirty) in code_mappings(&smaps) {
        if dirty {
            continue;
        }
        let (start, end) = range;
        // SAFETY: [start, end) is a whole private, non-writable mapping of a file (this binary
        // or a library), none of whose pages was written (checked above): MADV_DONTNEED
        // only drops its page-table entries, and the next access maps the same file contents
        // again. No Rust object lives in it.
        let ok =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        if ok == 0 {
            released += end - start;
        }
    }
    drop_cached_binary();
    tracing::debug!(bytes = released, "start-up code pages released");
}

/// Drops this binary's pages from the page cache where no process maps them. Unmapped, they
/// would stay cached, and on each fault the kernel maps the cached neighbours of the page it
/// needs too (fault-around, up to 64 KiB): the idle poll, little code spread over the whole
/// binary, got half the binary mapped back that way (1,600 of its 3,700 code pages, nearly all
/// in whole 64 KiB blocks). Uncached, a fault maps what it reads. The pages come back from disk
/// on their next use; other lifeboat processes keep the pages they map.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn drop_cached_binary() {
    use std::os::fd::AsRawFd;
    let Ok(exe) = std::fs::File::open("/proc/self/exe") else {
        return;
    };
    // SAFETY: an advice on a file descriptor this function owns; it changes no memory of ours.
    let e = unsafe { libc::posix_fadvise(exe.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if e != 0 {
        tracing::debug!(errno = e, "the binary's cached pages were not dropped");
    }
}

/// Not Linux: nothing to do.
#[cfg(not(target_os = "linux"))]
pub fn release_code_pages() {}

/// `((start, end), has pages written since mapped)` of each private, non-writable mapping of a
/// file (`r-xp`, `r--p`, an absolute path: not `[vdso]` and the like) in `smaps`.
fn code_mappings(smaps: &str) -> Vec<((usize, usize), bool)> {
    let mut out: Vec<((usize, usize), bool)> = Vec::new();
    let mut current: Option<usize> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            // A mapping's header: range, perms, offset, device, inode, path.
            let perms = fields.next().unwrap_or_default();
            let file = fields.nth(3).is_some_and(|p| p.starts_with('/'));
            current = (matches!(perms, "r-xp" | "r--p") && file).then(|| {
                out.push(((start, end), false));
                out.len() - 1
            });
        } else if matches!(first, "Private_Dirty:" | "Anonymous:" | "Swap:")
            && let Some(i) = current
        {
            // A page written since it was mapped (a copy, resident or swapped) is not the file's.
            out[i].1 |= fields.next().is_none_or(|kb| kb != "0");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_keeps_working_after_its_pages_are_released() {
        bound_large_blocks();
        let before: Vec<String> = (0..1000).map(|i| format!("{i:x}")).collect();
        release_code_pages();
        // Code, read-only data and relocated tables of the test binary and libc all in use again.
        let after: Vec<String> = (0..1000).map(|i| format!("{i:x}")).collect();
        assert_eq!(before, after);
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let packed = zstd::encode_all(&data[..], 3).unwrap();
        assert_eq!(zstd::decode_all(&packed[..]).unwrap(), data);
        let map: std::collections::HashMap<u32, String> =
            (0..100).map(|i| (i, i.to_string())).collect();
        assert_eq!(map[&42], "42");
    }

    #[test]
    fn only_unwritten_read_only_file_mappings_are_found() {
        let smaps = "\
55d0a0000000-55d0a0100000 r--p 00000000 08:01 42 /usr/bin/lifeboat
Private_Dirty:         0 kB
55d0a0100000-55d0a0900000 r-xp 00100000 08:01 42 /usr/bin/lifeboat
Rss:                4096 kB
Private_Dirty:         0 kB
55d0a0900000-55d0a0a00000 r-xp 00900000 08:01 42 /usr/bin/lifeboat
Private_Dirty:         0 kB
Anonymous:             8 kB
7f0000000000-7f0000100000 r-xp 00000000 08:01 7 /usr/lib/libc.so.6
Private_Dirty:         0 kB
7f0000100000-7f0000200000 rw-p 00100000 08:01 7 /usr/lib/libc.so.6
Private_Dirty:         0 kB
7f0000200000-7f0000201000 r--p 00200000 08:01 7 /usr/lib/libc.so.6
Swap:                  4 kB
7fff00000000-7fff00002000 r-xp 00000000 00:00 0 [vdso]
";
        let found = code_mappings(smaps);
        assert_eq!(
            found,
            [
                ((0x55d0a0000000, 0x55d0a0100000), false),
                ((0x55d0a0100000, 0x55d0a0900000), false),
                ((0x55d0a0900000, 0x55d0a0a00000), true),
                ((0x7f0000000000, 0x7f0000100000), false),
                ((0x7f0000200000, 0x7f0000201000), true),
            ]
        );
    }
}
