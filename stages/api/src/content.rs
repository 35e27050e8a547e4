//! Content hashes (blake3) of files and folder trees: the identity of every
//! artifact in the cache, and of local files that stages read.

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

/// sha256 of a file, as published next to downloads.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    io::copy(&mut fs::File::open(path)?, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Length-prefixed, so concatenations cannot collide.
pub fn update_str(hasher: &mut blake3::Hasher, s: &str) {
    hasher.update(&(s.len() as u64).to_le_bytes());
    hasher.update(s.as_bytes());
}

/// Copy a folder tree.
pub fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// `from`'s tree at `to` with its files hard-linked, or copied where a link
/// cannot be made (another file system). For building an artifact from
/// cached ones without spending space: cached files are read-only, so a
/// shared file cannot be changed through either name.
pub fn link_tree(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            link_tree(&source, &target)?;
        } else if fs::hard_link(&source, &target).is_err() {
            fs::copy(&source, &target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
