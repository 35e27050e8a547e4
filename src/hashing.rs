//! Content hashes (blake3) of artifacts and stage keys.
//!
//! Every hash is written as 64 hex digits. Encodings are prefixed with a
//! version tag so a future change of encoding can never collide with today's.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

/// Hash of a file's bytes, or of a folder tree (names, kinds and file hashes,
/// in sorted order). Symbolic links are refused: an artifact must be
/// self-contained.
pub fn hash_path(path: &Path) -> io::Result<String> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_file() {
        let mut hasher = blake3::Hasher::new();
        hasher.update_mmap(path)?;
        Ok(hasher.finalize().to_hex().to_string())
    } else if meta.is_dir() {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"xlpipe-tree-v1\0");
        hash_tree(path, "", &mut hasher)?;
        Ok(hasher.finalize().to_hex().to_string())
    } else {
        Err(io::Error::other(format!(
            "{} is neither a file nor a folder (symbolic links are not allowed in artifacts)",
            path.display()
        )))
    }
}

fn hash_tree(dir: &Path, prefix: &str, hasher: &mut blake3::Hasher) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let name = name
            .to_str()
            .ok_or_else(|| io::Error::other(format!("non-UTF-8 file name in {}", dir.display())))?;
        let relative = format!("{prefix}{name}");
        let path = entry.path();
        let meta = fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            hasher.update(b"D");
            update_str(hasher, &relative);
            hash_tree(&path, &format!("{relative}/"), hasher)?;
        } else {
            let file_hash = hash_path(&path)?;
            hasher.update(b"F");
            update_str(hasher, &relative);
            hasher.update(file_hash.as_bytes());
        }
    }
    Ok(())
}

fn update_str(hasher: &mut blake3::Hasher, s: &str) {
    hasher.update(&(s.len() as u64).to_le_bytes());
    hasher.update(s.as_bytes());
}

/// The cache key of a stage instance: what it is, which code, which settings,
/// and exactly which input contents.
pub fn stage_key(
    kind: &str,
    version: u32,
    params: &serde_json::Value,
    inputs: &BTreeMap<String, Vec<String>>,
) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"xlpipe-stage-key-v1\0");
    update_str(&mut hasher, kind);
    hasher.update(&version.to_le_bytes());
    update_json(&mut hasher, params);
    hasher.update(&(inputs.len() as u64).to_le_bytes());
    for (slot, hashes) in inputs {
        update_str(&mut hasher, slot);
        hasher.update(&(hashes.len() as u64).to_le_bytes());
        for hash in hashes {
            update_str(&mut hasher, hash);
        }
    }
    hasher.finalize().to_hex().to_string()
}

/// A canonical, self-delimiting encoding of JSON: object keys sorted
/// regardless of how the map type orders them, numbers by their shortest text.
fn update_json(hasher: &mut blake3::Hasher, value: &serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Null => {
            hasher.update(b"n");
        }
        Value::Bool(b) => {
            hasher.update(if *b { b"t" } else { b"f" });
        }
        Value::Number(n) => {
            hasher.update(b"#");
            update_str(hasher, &n.to_string());
        }
        Value::String(s) => {
            hasher.update(b"s");
            update_str(hasher, s);
        }
        Value::Array(items) => {
            hasher.update(b"[");
            hasher.update(&(items.len() as u64).to_le_bytes());
            for item in items {
                update_json(hasher, item);
            }
        }
        Value::Object(map) => {
            hasher.update(b"{");
            hasher.update(&(map.len() as u64).to_le_bytes());
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            for key in keys {
                update_str(hasher, key);
                update_json(hasher, &map[key]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_ignores_key_order_but_not_values() {
        let inputs = BTreeMap::new();
        let a = stage_key("k", 1, &json!({"a": 1, "b": [1, 2]}), &inputs);
        let b = stage_key("k", 1, &json!({"b": [1, 2], "a": 1}), &inputs);
        let c = stage_key("k", 1, &json!({"b": [2, 1], "a": 1}), &inputs);
        let d = stage_key("k", 2, &json!({"a": 1, "b": [1, 2]}), &inputs);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn tree_hash_sees_names_and_contents() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("t");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::write(root.join("sub/x"), "1").unwrap();
        let h1 = hash_path(&root).unwrap();
        fs::write(root.join("sub/x"), "2").unwrap();
        let h2 = hash_path(&root).unwrap();
        fs::rename(root.join("sub/x"), root.join("sub/y")).unwrap();
        let h3 = hash_path(&root).unwrap();
        assert!(h1 != h2 && h2 != h3 && h1 != h3);
    }
}
