//! What a sidecar that died mid-checkpoint leaves in QEMU, and its removal: the guest
//! still stopped by a cut (the cut marks itself in the store before `stop`), and dirty
//! bitmaps `cutline-N` whose checkpoint N never got a manifest. Run at attach and before
//! every arming, so that one crash can never wedge later checkpoints.

use qmp_client::Qmp;
use serde_json::json;

use crate::checkpoint::{BITMAP_PREFIX, CheckpointError, cont_after_migration};
use crate::store::Store;

/// What was cleaned up.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Cleaned {
    /// (node, bitmap) removed.
    pub bitmaps: Vec<(String, String)>,
    /// The guest was resumed after a cut that died with its sidecar.
    pub resumed: bool,
    /// The highest checkpoint id a `cutline-N` bitmap names (kept or removed).
    pub highest_bitmap: u64,
}

/// Writes the cut marker of `name` (QEMU's pid) before the guest is stopped.
pub fn mark_cut(store: &Store, name: &str, pid: Option<i32>) -> Result<(), crate::store::StoreError> {
    let path = store.cut_marker(name);
    crate::store::write_durably(&path, pid.map(|p| p.to_string()).unwrap_or_default().as_bytes())
}

/// Removes the cut marker: the guest runs again (or was never stopped).
pub fn unmark_cut(store: &Store, name: &str) {
    let _ = std::fs::remove_file(store.cut_marker(name));
}

/// Resumes a guest left stopped by a dead cut, and removes bitmaps without a manifest.
pub async fn clean(qmp: &Qmp, store: &Store, name: &str) -> Result<Cleaned, CheckpointError> {
    let mut out = Cleaned::default();
    let marker = store.cut_marker(name);
    if let Ok(text) = std::fs::read_to_string(&marker) {
        let marked: Option<i32> = text.trim().parse().ok();
        // The marker is ours only for the QEMU the cut stopped (not a relaunched one).
        if marked.is_none() || marked == qmp.peer_pid() {
            let status =
                qmp.execute_raw("query-status", json!({})).await.map_err(crate::checkpoint::qemu("query-status"))?;
            let st = status["status"].as_str().unwrap_or("");
            if matches!(st, "paused" | "postmigrate" | "finish-migrate") {
                tracing::warn!(
                    vm = name,
                    status = st,
                    "the guest was left stopped by a cut whose sidecar died: resuming it"
                );
                crate::checkpoint::clear_leftovers(qmp).await?;
                cont_after_migration(qmp).await?;
                out.resumed = true;
            }
        }
        unmark_cut(store, name);
    }
    let ids = store.ids(name)?;
    let nodes = qmp
        .execute_raw("query-named-block-nodes", json!({"flat": true}))
        .await
        .map_err(crate::checkpoint::qemu("query-named-block-nodes"))?;
    for n in nodes.as_array().into_iter().flatten() {
        let node = n["node-name"].as_str().unwrap_or_default();
        let bitmaps = n["dirty-bitmaps"].as_array().cloned().unwrap_or_default();
        for b in bitmaps {
            let Some(bname) = b["name"].as_str() else { continue };
            let Some(id) = bname.strip_prefix(BITMAP_PREFIX).and_then(|s| s.parse::<u64>().ok()) else { continue };
            out.highest_bitmap = out.highest_bitmap.max(id);
            if ids.contains(&id) {
                continue;
            }
            tracing::warn!(vm = name, node, bitmap = bname, "removing a bitmap whose checkpoint has no manifest");
            match qmp.execute_raw("block-dirty-bitmap-remove", json!({"node": node, "name": bname})).await {
                Ok(_) => out.bitmaps.push((node.to_owned(), bname.to_owned())),
                Err(e) => tracing::warn!(vm = name, bitmap = bname, "cannot remove: {e}"),
            }
        }
    }
    Ok(out)
}
