//! The image every host runs, and where the workspace's binaries are.

use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};

use super::{docker, docker_with};

/// The image every host runs: built from an in-memory root filesystem and imported once.
pub struct HostImage;

/// The top-level directories a merged-usr system links into `/usr`.
pub(super) const USR_LINKS: &[&str] = &["bin", "lib", "lib64", "sbin"];

impl HostImage {
    /// The repository of the image's tags.
    pub const REPOSITORY: &'static str = "cutline-host";

    /// The root filesystem as a tar: empty mount points, the machine's top-level links
    /// into `/usr` (`/bin -> usr/bin` on merged-usr), and minimal `/etc` files. Entries
    /// are in a fixed order with fixed times and owners, so equal content hashes equal.
    pub fn rootfs() -> anyhow::Result<Vec<u8>> {
        let mut tar = tar::Builder::new(Vec::new());
        let mut dir = |path: &str, mode: u32| -> std::io::Result<()> {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(mode);
            h.set_size(0);
            h.set_mtime(0);
            h.set_cksum();
            tar.append_data(&mut h, path, std::io::empty())
        };
        for (path, mode) in [
            ("cutline/", 0o755),
            ("cutline/bin/", 0o755),
            ("cutline/tools/", 0o755),
            ("dev/", 0o755),
            ("etc/", 0o755),
            ("proc/", 0o555),
            ("root/", 0o700),
            ("run/", 0o755),
            ("sys/", 0o555),
            ("tmp/", 0o1777),
            ("usr/", 0o755),
            ("var/", 0o755),
            ("var/tmp/", 0o1777),
            ("vms/", 0o755),
        ] {
            dir(path, mode)?;
        }
        for name in USR_LINKS {
            // Only links: a real top-level directory is mounted from the machine instead.
            let Ok(target) = std::fs::read_link(Path::new("/").join(name)) else { continue };
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_mode(0o777);
            h.set_size(0);
            h.set_mtime(0);
            tar.append_link(&mut h, name, &target)?;
        }
        let files: [(&str, &str); 4] = [
            ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
            ("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost\n"),
            ("etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n"),
            ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
        ];
        for (path, text) in files {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_size(text.len() as u64);
            h.set_mtime(0);
            h.set_cksum();
            tar.append_data(&mut h, path, text.as_bytes())?;
        }
        Ok(tar.into_inner()?)
    }

    /// Makes sure the image is in the local engine and returns its tag,
    /// `cutline-host:<first 12 hex digits of the tar's sha256>`: imported with
    /// `docker import` only when `docker image inspect` does not know the tag, under a
    /// lock so that concurrent test processes import it once.
    pub fn ensure() -> anyhow::Result<String> {
        let tar = Self::rootfs().context("making the host root filesystem")?;
        let digest: String = Sha256::digest(&tar).iter().map(|b| format!("{b:02x}")).collect();
        let tag = format!("{}:{}", Self::REPOSITORY, &digest[..12]);
        let present = || docker(&format!("image {tag}"), &["image", "inspect", "--format", "{{.Id}}", &tag]).is_ok();
        if present() {
            return Ok(tag);
        }
        let lock_dir = crate::image::default_cache_dir();
        std::fs::create_dir_all(&lock_dir).with_context(|| format!("creating {}", lock_dir.display()))?;
        let lock_path = lock_dir.join("host-image.lock");
        let lock = std::fs::File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
        let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("locking {}", lock_path.display()))?;
        if !present() {
            docker_with(&format!("image {tag}"), &["import", "--message", "cutline test host", "-", &tag], Some(&tar))?;
        }
        Ok(tag)
    }
}

/// The directory of this workspace's binaries (`target/<profile>`), found from the
/// running executable without building anything: tests that run a binary in a host
/// build it first with [`crate::workspace_bin`], which puts it there.
pub fn target_bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut dir = exe.parent().with_context(|| format!("no directory above {}", exe.display()))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().with_context(|| format!("no target dir above {}", exe.display()))?;
    }
    Ok(dir.to_owned())
}
