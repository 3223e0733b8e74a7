//! Builds (or reuses) the cutline test guest image and prints where it is.
//!
//! `cutline-guest-image [--cache DIR] [--json]`

use std::path::PathBuf;

use clap::Parser;
use cutline_tests::image::{GuestImage, ImageSpec, default_cache_dir};

/// Build or reuse the test guest image (kernel + initramfs with busybox and the workload).
#[derive(Parser)]
struct Args {
    /// Cache directory (default: $CUTLINE_CACHE or ~/.cache/cutline).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Print one JSON object instead of progress lines.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let spec =
        ImageSpec { cache_dir: args.cache.unwrap_or_else(default_cache_dir).join("guest"), ..ImageSpec::default() };
    let json = args.json;
    let started = std::time::Instant::now();
    let image = GuestImage::get(&spec, &mut |msg| {
        if json {
            eprintln!("{}", serde_json::json!({"progress": msg}));
        } else {
            eprintln!("guest image: {msg}");
        }
    })?;
    let ms = started.elapsed().as_millis();
    if json {
        println!(
            "{}",
            serde_json::json!({"kernel": image.kernel, "initrd": image.initrd, "key": image.key,
                "built": image.built, "initrd_bytes": image.initrd_bytes, "duration_ms": ms})
        );
    } else {
        println!(
            "kernel {}\ninitrd {}\n({} in {ms} ms)",
            image.kernel.display(),
            image.initrd.display(),
            if image.built { "built" } else { "reused" }
        );
    }
    Ok(())
}
