//! Small file operations both sides need.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Make `len` bytes at `offset` read as zeroes: a hole where the file
/// system can punch one, zeroes written where it cannot. The file keeps
/// its size.
pub fn punch_or_zero(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let punched = nix::fcntl::fallocate(
        file,
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    );
    if punched.is_ok() {
        return Ok(());
    }
    let zeroes = vec![0u8; len.min(1 << 20) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeroes.len() as u64);
        file.write_all_at(&zeroes[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punched_ranges_read_as_zeroes_and_keep_the_size() {
        let file = tempfile_in_tmp();
        file.write_all_at(&[7u8; 16384], 0).unwrap();
        punch_or_zero(&file, 4096, 8192).unwrap();
        let mut buf = vec![0u8; 16384];
        file.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 7));
        assert!(buf[4096..12288].iter().all(|&b| b == 0));
        assert!(buf[12288..].iter().all(|&b| b == 7));
        assert_eq!(file.metadata().unwrap().len(), 16384);
    }

    fn tempfile_in_tmp() -> File {
        let path = std::env::temp_dir().join(format!("fsutil-test-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }
}
