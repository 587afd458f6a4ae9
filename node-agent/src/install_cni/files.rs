//! File operations of the installer: atomic replace (temp file in the same directory, fsync,
//! rename, fsync of the directory) keeping the replaced file's mode and owner, and the plugin
//! binary's copy.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode and owner a written file gets.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// This process's user and group with `mode`.
    pub fn current(mode: u32) -> Owner {
        Owner {
            mode,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    }

    pub fn of(path: &Path) -> io::Result<Owner> {
        let m = fs::metadata(path)?;
        Ok(Owner {
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
        })
    }
}

/// The temporary name used next to `path`. It is hidden and its extension is not one libcni
/// reads, so a runtime scanning the directory never picks it up.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.ambient-tmp"))
}

/// Replaces `path` with `data` atomically: readers see the old or the new content, never a
/// partial one. `owner` defaults to the replaced file's (0644 and this process's user for a
/// new file).
pub fn atomic_write(path: &Path, data: &[u8], owner: Option<Owner>) -> io::Result<()> {
    let owner = match owner {
        Some(o) => o,
        None => Owner::of(path).unwrap_or_else(|_| Owner::current(0o644)),
    };
    let tmp = temp_path(path);
    let result = (|| {
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(owner.mode)
            .open(&tmp)?;
        f.write_all(data)?;
        // The umask may have narrowed the mode; set it exactly, then the owner.
        f.set_permissions(fs::Permissions::from_mode(owner.mode))?;
        let m = f.metadata()?;
        if m.uid() != owner.uid || m.gid() != owner.gid {
            std::os::unix::fs::fchown(&f, Some(owner.uid), Some(owner.gid))?;
        }
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes `path` (already gone is fine) and makes the removal durable.
pub fn remove(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => {
            sync_dir(path)?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Whether `a` and `b` have the same content (false when `b` is missing).
pub fn same_content(a: &Path, b: &Path) -> io::Result<bool> {
    let (ma, mb) = match (fs::metadata(a), fs::metadata(b)) {
        (Ok(ma), Ok(mb)) => (ma, mb),
        (Err(e), _) => return Err(e),
        (_, Err(e)) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        (_, Err(e)) => return Err(e),
    };
    if !mb.is_file() || ma.len() != mb.len() {
        return Ok(false);
    }
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Copies the plugin binary to `dest` (mode 0755) atomically; false when it was already there
/// with the same content and mode, in which case nothing is written.
pub fn install_binary(src: &Path, dest: &Path) -> io::Result<bool> {
    if same_content(src, dest)? && Owner::of(dest)?.mode == 0o755 {
        return Ok(false);
    }
    let data = fs::read(src)?;
    atomic_write(dest, &data, Some(Owner::current(0o755)))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_keeps_mode_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("10-x.conflist");
        fs::write(&p, "old").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        atomic_write(&p, b"new", None).unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "new");
        assert_eq!(Owner::of(&p).unwrap().mode, 0o600);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn binary_copied_once() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let dst = d.path().join("ambient-cni");
        fs::write(&src, vec![7u8; 200_000]).unwrap();
        assert!(install_binary(&src, &dst).unwrap());
        assert!(!install_binary(&src, &dst).unwrap());
        assert_eq!(Owner::of(&dst).unwrap().mode, 0o755);
        fs::write(&src, vec![8u8; 200_000]).unwrap();
        assert!(install_binary(&src, &dst).unwrap());
        assert!(same_content(&src, &dst).unwrap());
    }
}
