//! A small tmpfs mounted for one test (a store that fills up or is read-only), unmounted
//! when dropped. Needs root, like the network namespaces of other tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_mib` at `path` (created if needed), read-only if `read_only`.
    pub fn mount(path: &Path, size_mib: u64, read_only: bool) -> anyhow::Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        let mut opts = format!("size={size_mib}m,mode=0755");
        if read_only {
            opts.push_str(",ro");
        }
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &opts, "cutline-test"]).arg(path).output()?;
        anyhow::ensure!(
            out.status.success(),
            "mount tmpfs at {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Tmpfs { path: path.to_owned() })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
