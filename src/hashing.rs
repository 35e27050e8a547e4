//! Content hashes (blake3) of artifacts and stage keys.
//!
//! Every hash is written as 64 hex digits. Encodings are prefixed with a
//! version tag so a future change of encoding can never collide with today's.

use std::collections::BTreeMap;

pub use xlpipe_stage_api::content::hash_path;
use xlpipe_stage_api::content::update_str;

/// The cache key of a stage instance: what it is, which code, which settings,
/// and exactly which input contents.
pub fn stage_key(
    kind: &str,
    version: u32,
    params: &serde_json::Value,
    inputs: &BTreeMap<String, Vec<String>>,
) -> String {
    keyed(b"xlpipe-stage-key-v1\0", kind, version, params, inputs)
}

/// The family of instances that share stored prefixes: the same kind, code
/// and inputs, and the same params but the budget (`shared_params`, see
/// `xlpipe_stage_api::PrefixReuse`). Tagged apart from stage keys, so a
/// family never names a key.
pub fn prefix_family(
    kind: &str,
    version: u32,
    shared_params: &serde_json::Value,
    inputs: &BTreeMap<String, Vec<String>>,
) -> String {
    keyed(
        b"xlpipe-prefix-family-v1\0",
        kind,
        version,
        shared_params,
        inputs,
    )
}

fn keyed(
    tag: &[u8],
    kind: &str,
    version: u32,
    params: &serde_json::Value,
    inputs: &BTreeMap<String, Vec<String>>,
) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(tag);
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
}
