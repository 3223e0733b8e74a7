//! The test guest image: the host's cloud kernel plus an initramfs of busybox, the
//! virtio (and SCSI/ATA) modules, an /init script and the static `cutline-workload`.
//!
//! Built into a cache directory and reused while its inputs (kernel, modules, busybox,
//! workload binary, init script) hash the same; rebuilt when any of them changes.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Modules the guest loads, with their dependencies resolved from `modules.dep`.
/// Those built into the kernel or absent from it are skipped.
pub const GUEST_MODULES: &[&str] =
    &["virtio_pci", "virtio_net", "virtio_blk", "virtio_scsi", "sd_mod", "ata_piix", "ahci", "e1000"];

/// Errors of building the test guest image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No guest kernel was found.
    #[error("no guest kernel: set CUTLINE_GUEST_KERNEL or install linux-image-cloud-amd64 (ci/install.sh)")]
    NoKernel,
    /// The kernel's modules directory is missing.
    #[error("no modules for kernel {version} under {dir}")]
    NoModules {
        /// Kernel version.
        version: String,
        /// Where they were looked for.
        dir: PathBuf,
    },
    /// busybox is missing or not static.
    #[error("{path} is not a static busybox: install busybox-static (ci/install.sh)")]
    NoBusybox {
        /// The path checked.
        path: PathBuf,
    },
    /// Building the workload binary failed.
    #[error("building the guest workload failed: {0}")]
    Workload(String),
    /// Reading or writing a file failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io { what, path: path.to_owned(), source }
}

/// A built guest image.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel (`-kernel`).
    pub kernel: PathBuf,
    /// The initramfs (`-initrd`).
    pub initrd: PathBuf,
    /// Hash of every input: the cache key.
    pub key: String,
    /// True when this call built it, false when it was reused from the cache.
    pub built: bool,
    /// Size of the initramfs in bytes.
    pub initrd_bytes: u64,
}

/// Where the image inputs come from and where it is cached.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// The cache directory (default `$CUTLINE_CACHE` or `~/.cache/cutline`, then `guest/`).
    pub cache_dir: PathBuf,
    /// The kernel image.
    pub kernel: Option<PathBuf>,
    /// The static busybox.
    pub busybox: PathBuf,
    /// The cargo workspace that holds `cutline-workload`.
    pub workspace: PathBuf,
}

impl Default for ImageSpec {
    fn default() -> Self {
        ImageSpec {
            cache_dir: default_cache_dir().join("guest"),
            kernel: std::env::var_os("CUTLINE_GUEST_KERNEL").map(PathBuf::from),
            busybox: std::env::var_os("CUTLINE_BUSYBOX").map_or_else(|| PathBuf::from("/bin/busybox"), PathBuf::from),
            workspace: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."),
        }
    }
}

/// `$CUTLINE_CACHE`, else `$XDG_CACHE_HOME/cutline`, else `~/.cache/cutline`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CUTLINE_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("cutline");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache").join("cutline")
}

/// Newest `/boot/vmlinuz-*` (cloud flavour preferred).
fn find_kernel() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .collect();
    found.sort_by_key(|p| (p.to_string_lossy().contains("cloud"), p.clone()));
    found.pop()
}

/// Resolves `wanted` modules and their dependencies into load order, from `modules.dep`.
pub fn module_load_order(modules_dep: &str, wanted: &[&str]) -> Vec<String> {
    let deps: BTreeMap<String, Vec<String>> = modules_dep
        .lines()
        .filter_map(|l| {
            let (m, d) = l.split_once(':')?;
            Some((m.trim().to_owned(), d.split_whitespace().map(str::to_owned).collect()))
        })
        .collect();
    let by_name: BTreeMap<String, String> = deps
        .keys()
        .filter_map(|p| {
            let file = p.rsplit('/').next()?;
            let name = file.split(".ko").next()?.replace('-', "_");
            Some((name, p.clone()))
        })
        .collect();
    fn visit(p: &str, deps: &BTreeMap<String, Vec<String>>, seen: &mut HashSet<String>, out: &mut Vec<String>) {
        if !seen.insert(p.to_owned()) {
            return;
        }
        // modules.dep lists every (transitive) dependency; the last must load first.
        for d in deps.get(p).into_iter().flatten().rev() {
            visit(d, deps, seen, out);
        }
        out.push(p.to_owned());
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for w in wanted {
        if let Some(p) = by_name.get(&w.replace('-', "_")) {
            visit(p, &deps, &mut seen, &mut out);
        }
    }
    out
}

/// The guest's /init: mounts, loads modules, configures eth0 as 10.0.0.(id+1)/24,
/// then execs the workload.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules.order); do insmod "/lib/modules/$m" 2>/dev/null; done
id=0
for t in $(cat /proc/cmdline); do
  case "$t" in cutline.id=*) id="${t#cutline.id=}" ;; esac
done
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
  ip addr add "10.0.0.$((id + 1))/24" dev eth0
  ip link set eth0 up
fi
echo "cutline-guest: init done, id $id"
exec /bin/cutline-workload
"#;

/// Builds the static workload binary and returns its path.
fn build_workload(workspace: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, ImageError> {
    progress("building cutline-workload (static)");
    let target_dir = workspace.join("target").join("guest");
    let triple = "x86_64-unknown-linux-gnu";
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_TARGET_DIR")
        .args(["build", "--quiet", "--release", "-p", "cutline-workload", "--target", triple, "--target-dir"])
        .arg(&target_dir)
        .output()
        .map_err(|e| ImageError::Workload(format!("cannot run cargo: {e}")))?;
    if !out.status.success() {
        return Err(ImageError::Workload(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    Ok(target_dir.join(triple).join("release").join("cutline-workload"))
}

struct Input {
    name: String,
    mode: u32,
    data: Vec<u8>,
}

impl GuestImage {
    /// Builds the image or reuses the cached one, reporting steps through `progress`.
    /// Concurrent callers (parallel tests) serialize on a lock file in the cache.
    pub fn get(spec: &ImageSpec, progress: &mut dyn FnMut(&str)) -> Result<GuestImage, ImageError> {
        let kernel = spec.kernel.clone().or_else(find_kernel).ok_or(ImageError::NoKernel)?;
        let version = kernel
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .unwrap_or_default()
            .to_owned();
        let mod_dir = PathBuf::from("/lib/modules").join(&version);
        let dep_path = mod_dir.join("modules.dep");
        let modules_dep = std::fs::read_to_string(&dep_path)
            .map_err(|_| ImageError::NoModules { version: version.clone(), dir: mod_dir.clone() })?;
        let busybox = std::fs::read(&spec.busybox).map_err(|_| ImageError::NoBusybox { path: spec.busybox.clone() })?;
        if !is_static_elf(&busybox) {
            return Err(ImageError::NoBusybox { path: spec.busybox.clone() });
        }
        std::fs::create_dir_all(&spec.cache_dir).map_err(io("cannot create", &spec.cache_dir))?;
        let lock_path = spec.cache_dir.join(".lock");
        let lock_file = std::fs::File::create(&lock_path).map_err(io("cannot create", &lock_path))?;
        let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| ImageError::Io { what: "cannot lock", path: lock_path.clone(), source: e.into() })?;

        let workload_path = build_workload(&spec.workspace, progress)?;
        let workload = std::fs::read(&workload_path).map_err(io("cannot read", &workload_path))?;

        let order = module_load_order(&modules_dep, GUEST_MODULES);
        let mut inputs = vec![
            Input { name: "init".into(), mode: 0o100755, data: INIT.as_bytes().to_vec() },
            Input { name: "bin/busybox".into(), mode: 0o100755, data: busybox },
            Input { name: "bin/cutline-workload".into(), mode: 0o100755, data: workload },
        ];
        let mut names = Vec::new();
        for rel in &order {
            let path = mod_dir.join(rel);
            let data = std::fs::read(&path).map_err(io("cannot read module", &path))?;
            let file = rel.rsplit('/').next().unwrap_or(rel).to_owned();
            names.push(file.clone());
            inputs.push(Input { name: format!("lib/modules/{file}"), mode: 0o100644, data });
        }
        inputs.push(Input {
            name: "etc/modules.order".into(),
            mode: 0o100644,
            data: (names.join("\n") + "\n").into_bytes(),
        });

        let mut h = Sha256::new();
        for i in &inputs {
            h.update(i.name.as_bytes());
            h.update(i.mode.to_le_bytes());
            h.update((i.data.len() as u64).to_le_bytes());
            h.update(&i.data);
        }
        let kernel_bytes = std::fs::read(&kernel).map_err(io("cannot read kernel", &kernel))?;
        h.update(&kernel_bytes);
        let key = sidecar::store::blocks::hex(&h.finalize()[..8]);

        let dir = spec.cache_dir.join(&key);
        let initrd = dir.join("initramfs.cpio");
        let kernel_copy = dir.join("vmlinuz");
        if initrd.exists() && kernel_copy.exists() {
            let initrd_bytes = std::fs::metadata(&initrd).map(|m| m.len()).unwrap_or(0);
            progress(&format!("reusing cached guest image {key}"));
            return Ok(GuestImage { kernel: kernel_copy, initrd, key, built: false, initrd_bytes });
        }
        progress(&format!("packing initramfs: busybox, workload, {} modules", names.len()));
        let tmp = spec.cache_dir.join(format!(".{key}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io("cannot create", &tmp))?;
        write_cpio(&tmp.join("initramfs.cpio"), &inputs)?;
        write_synced(&tmp.join("vmlinuz"), &kernel_bytes)?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).map_err(io("cannot rename into place", &dir))?;
        sync_dir(&spec.cache_dir)?;
        let initrd_bytes = std::fs::metadata(&initrd).map(|m| m.len()).unwrap_or(0);
        progress(&format!("built guest image {key} ({} KiB initramfs)", initrd_bytes / 1024));
        Ok(GuestImage { kernel: kernel_copy, initrd, key, built: true, initrd_bytes })
    }
}

/// True for a 64-bit ELF executable without a program interpreter (PT_INTERP).
fn is_static_elf(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u64_at = |o: usize| elf.get(o..o + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    (0..phnum).all(|i| {
        let at = phoff as usize + i * phentsize;
        elf.get(at..at + 4).is_some_and(|t| t != 3u32.to_le_bytes())
    })
}

fn write_cpio(path: &Path, inputs: &[Input]) -> Result<(), ImageError> {
    let file = std::fs::File::create(path).map_err(io("cannot create", path))?;
    let mut w = std::io::BufWriter::new(file);
    let mut ino = 1;
    let mut dirs: Vec<String> = vec![
        "bin".into(),
        "dev".into(),
        "etc".into(),
        "lib".into(),
        "lib/modules".into(),
        "proc".into(),
        "sys".into(),
        "tmp".into(),
    ];
    dirs.sort();
    let err = io("cannot write", path);
    let result = (|| -> std::io::Result<()> {
        for d in &dirs {
            let e = cpio::newc::Builder::new(d).ino(ino).mode(0o040755).nlink(2).write(&mut w, 0);
            e.finish()?;
            ino += 1;
        }
        for i in inputs {
            let size = u32::try_from(i.data.len()).map_err(|_| std::io::Error::other("file too large for cpio"))?;
            let mut e = cpio::newc::Builder::new(&i.name).ino(ino).mode(i.mode).nlink(1).write(&mut w, size);
            e.write_all(&i.data)?;
            e.finish()?;
            ino += 1;
        }
        cpio::newc::trailer(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
    })();
    result.map_err(err)
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let mut f = std::fs::File::create(path).map_err(io("cannot create", path))?;
    f.write_all(data).map_err(io("cannot write", path))?;
    f.sync_all().map_err(io("cannot sync", path))
}

fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io("cannot sync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_elf_detection() {
        assert!(!is_static_elf(b"#!/bin/sh"));
        if let Ok(sh) = std::fs::read("/bin/sh") {
            assert!(!is_static_elf(&sh), "/bin/sh is dynamically linked on Debian");
        }
    }

    #[test]
    fn dependencies_load_first() {
        let dep = "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n\
kernel/net/core/failover.ko:\n\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
kernel/drivers/virtio/virtio_ring.ko:\n";
        let order = module_load_order(dep, &["virtio_net", "not_there"]);
        let pos = |m: &str| order.iter().position(|p| p.ends_with(m)).expect(m);
        assert_eq!(order.len(), 5);
        assert!(pos("virtio_ring.ko") < pos("virtio.ko"));
        assert!(pos("/failover.ko") < pos("/net_failover.ko"));
        assert!(pos("net_failover.ko") < pos("virtio_net.ko"));
        assert!(pos("virtio.ko") < pos("virtio_net.ko"));
    }
}
