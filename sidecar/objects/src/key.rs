//! Object keys: `/`-separated components of letters, digits, `.`, `_` and `-`, neither
//! `.` nor `..`. A key becomes a file path in the local backend, so nothing else passes.

use crate::ObjectsError;

/// Longest key accepted.
pub const MAX_KEY: usize = 512;

/// Checks that `key` can name an object.
pub fn check_key(key: &str) -> Result<(), ObjectsError> {
    let bad = |why| Err(ObjectsError::BadKey { key: key.to_owned(), why });
    if key.is_empty() {
        return bad("empty");
    }
    if key.len() > MAX_KEY {
        return bad("too long");
    }
    for part in key.split('/') {
        if part.is_empty() {
            return bad("an empty component (a leading, trailing or doubled '/')");
        }
        if part == "." || part == ".." {
            return bad("a '.' or '..' component");
        }
        if part.starts_with('.') {
            return bad("a component starting with '.' (reserved for work files)");
        }
        if !part.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
            return bad("a character other than letters, digits, '.', '_', '-' and '/'");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_could_leave_the_store_are_refused() {
        for k in ["packs/ab/abc", "records/0000000001-3", "a", "vms/vm-0/0000000001.json"] {
            assert!(check_key(k).is_ok(), "{k}");
        }
        for k in ["", "/a", "a/", "a//b", "../a", "a/../b", "a/./b", ".tmp/x", "a b", "a\0b", "ü"] {
            assert!(check_key(k).is_err(), "{k:?}");
        }
        assert!(check_key(&"a".repeat(MAX_KEY + 1)).is_err());
    }
}
