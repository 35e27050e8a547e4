//! The artifact store.
//!
//! ```text
//! cache/
//!   objects/ab/<hash>         outputs, content-addressed (file or folder, read-only files)
//!   seals/ab/<hash>.json      each object's files with their sizes and mtimes when stored
//!   records/ab/<key>.json     one record per stage key: params, input and output hashes, timings
//!   refs/<pipeline>/<id>.json which key each instance of a pipeline had at its last run
//!   prefixes/<family>/<step>.json  a stored training prefix: its object and the key that made it
//!   logs/ab/<key>.log         per-stage log
//!   state/<kind>/             kept across runs: partial downloads, translation memory
//!   locks/<key>.lock          held while a key is being computed
//!   tmp/                      work in progress; never trusted
//!   lock                      shared by runs, exclusive for gc
//! ```
//!
//! Crash safety: a stage writes into `tmp/`; its outputs are hashed and
//! renamed into `objects/`, and only then is its record written (temp file,
//! fsync, rename). A kill at any point leaves at worst an orphan in `tmp/` or
//! `objects/`, never a record that points at something incomplete. Objects are
//! hashed again before a stage reads them.
//!
//! Integrity on a cache hit: re-hashing every output on every hit would cost
//! seconds per gigabyte, so a stored object is sealed instead: the size and
//! modification time of each of its files. A hit whose outputs no longer
//! match their seals (a file rewritten, truncated, removed or added) counts
//! as a miss: the object is moved out of `objects/` and the stage reruns.
//! `xlpipe verify` re-hashes everything, for damage that keeps sizes and
//! times.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::hashing::hash_path;

#[derive(Clone)]
pub struct Cache {
    root: PathBuf,
    /// Opened on a read-only folder or file system: what is cached can be
    /// read, planned, shown, reported and verified; nothing is written.
    read_only: bool,
}

/// What the cache knows about one computed stage key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub key: String,
    pub instance: String,
    pub kind: String,
    pub version: u32,
    pub params: serde_json::Value,
    /// slot -> artifacts read (producer instance and content hash).
    pub inputs: BTreeMap<String, Vec<InputRecord>>,
    /// output name -> object hash.
    pub outputs: BTreeMap<String, String>,
    /// Unix time the stage started, seconds.
    pub started: f64,
    pub seconds: f64,
    pub xlpipe_version: String,
    /// The stored prefix it was handed to continue from (see
    /// `xlpipe_stage_api::PrefixReuse`): `seconds` covers only the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<ResumedFrom>,
}

/// Where a run continued from: a step of another instance's stored prefix.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResumedFrom {
    pub step: usize,
    pub instance: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputRecord {
    pub producer: String,
    pub hash: String,
}

/// A stored prefix of a family's work (see `xlpipe_stage_api::PrefixReuse`):
/// the state after `step` steps, object `object`, stored by the run of
/// `key` (whose record `gc` must keep for the prefix to stay).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrefixEntry {
    pub step: usize,
    pub object: String,
    pub key: String,
    pub instance: String,
}

/// The key an instance of a pipeline had at its last run; lets `plan` say
/// what changed and lets `gc` know what is still in use.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceRef {
    pub instance: String,
    pub key: String,
}

impl Cache {
    pub fn open(root: &Path) -> anyhow::Result<Cache> {
        if root.is_dir() && !writable(root) {
            return Ok(Cache {
                root: root.to_path_buf(),
                read_only: true,
            });
        }
        for dir in ["objects", "records", "refs", "logs", "locks", "tmp"] {
            fs::create_dir_all(root.join(dir))
                .with_context(|| format!("creating cache folder {}", root.join(dir).display()))?;
        }
        Ok(Cache {
            root: root.to_path_buf(),
            read_only: false,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The error of a command that would write to a read-only cache.
    pub fn ensure_writable(&self, what: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.read_only,
            "the cache {} is read-only: {what} cannot write to it (use a writable --cache)",
            self.root.display()
        );
        Ok(())
    }

    /// Shared by every run; gc takes it exclusively, so it never deletes
    /// what a live run may still use.
    ///
    /// A run that finds the cache unused first clears what killed runs left
    /// behind (their work folders in `tmp/`, half-written `.partial-*`
    /// files), which no live run can own then.
    pub fn lock_shared(&self) -> anyhow::Result<File> {
        if self.read_only {
            // Nothing to clear, and no lock file to create: hold the cache
            // folder itself (flock needs no write access) against a gc
            // that a writable mount of it might run.
            let file = File::open(&self.root)?;
            file.lock_shared()?;
            return Ok(file);
        }
        let file = self.open_lock_file(&self.root.join("lock"))?;
        if file.try_lock().is_ok() {
            self.clear_leftovers();
            // flock(2) converts the exclusive lock into a shared one.
            file.lock_shared()?;
            return Ok(file);
        }
        if file.try_lock_shared().is_err() {
            tracing::warn!(
                "waiting for another xlpipe (gc, or a run clearing leftovers) to release the cache"
            );
            file.lock_shared()?;
        }
        Ok(file)
    }

    pub fn lock_exclusive(&self) -> anyhow::Result<File> {
        self.ensure_writable("this command")?;
        let file = self.open_lock_file(&self.root.join("lock"))?;
        file.try_lock().map_err(|_| {
            anyhow::anyhow!(
                "the cache {} is in use by a running pipeline; try again when it has finished",
                self.root.display()
            )
        })?;
        Ok(file)
    }

    /// Held while `key` is computed, so two runs sharing the cache never
    /// compute the same key at once: the second waits, then finds the record.
    ///
    /// The holder removes the lock file when it is done ([`Self::release_key`]),
    /// so a waiter may get the lock of a file no longer in `locks/`: it
    /// then opens the current one and locks again, or two runs (one on the
    /// removed file, one on a new one) could hold "the" lock at once.
    pub fn lock_key(&self, key: &str, instance: &str) -> anyhow::Result<File> {
        let path = self.key_lock_path(key);
        let mut waited = false;
        loop {
            let file = self.open_lock_file(&path)?;
            if file.try_lock().is_err() {
                if !waited {
                    tracing::info!("{instance}: another run is computing it; waiting");
                    waited = true;
                }
                file.lock()?;
            }
            if same_file(&file, &path) {
                return Ok(file);
            }
        }
    }

    fn key_lock_path(&self, key: &str) -> PathBuf {
        self.root.join("locks").join(format!("{key}.lock"))
    }

    /// Done with `key` (its record written, or found): remove its lock file
    /// while still holding it, then let go. A run waiting on it finds the
    /// file gone and locks a fresh one (see [`Self::lock_key`]).
    pub fn release_key(&self, key: &str, lock: File) {
        let path = self.key_lock_path(key);
        if same_file(&lock, &path) {
            let _ = fs::remove_file(&path);
        }
        drop(lock);
    }

    /// Remove work folders under `tmp/` and `.partial-*` files beside
    /// records, seals, refs and prefixes. Only called with the cache held
    /// exclusively. Key locks stay, and so does the work folder of a key
    /// whose lock is held: by a command orphaned by a killed run, or by a
    /// Slurm job adopted after a crash.
    fn clear_leftovers(&self) {
        let mut leftovers = self.unowned_work_folders();
        for dir in ["records", "seals", "refs", "prefixes"] {
            leftovers.extend(sharded_entries(&self.root, dir).into_iter().filter(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(".partial-"))
            }));
        }
        if !leftovers.is_empty() {
            tracing::info!(
                "removing {} leftovers of interrupted runs from {}",
                leftovers.len(),
                self.root.display()
            );
        }
        for path in leftovers {
            if let Err(err) = remove_path(&path) {
                tracing::warn!("could not remove {}: {err}", path.display());
            }
        }
    }

    /// Folders under `tmp/` whose key nobody is computing: a work folder is
    /// named after its key's first 16 characters (`temp_dir`), and a live
    /// computation holds that key's lock.
    pub fn unowned_work_folders(&self) -> Vec<PathBuf> {
        let held: Vec<String> = list_dir(&self.root.join("locks"))
            .into_iter()
            .filter(|lock| key_lock_held(lock))
            .filter_map(|lock| Some(lock.file_name()?.to_str()?.to_string()))
            .collect();
        list_dir(&self.root.join("tmp"))
            .into_iter()
            .filter(|folder| {
                let name = folder.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let prefix = name.split('-').next().unwrap_or(name);
                !held.iter().any(|lock| lock.starts_with(prefix))
            })
            .collect()
    }

    fn open_lock_file(&self, path: &Path) -> anyhow::Result<File> {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock file {}", path.display()))
    }

    fn sharded(&self, dir: &str, name: &str, ext: &str) -> PathBuf {
        self.root
            .join(dir)
            .join(&name[..2])
            .join(format!("{name}{ext}"))
    }

    pub fn object_path(&self, hash: &str) -> PathBuf {
        self.sharded("objects", hash, "")
    }

    pub fn record_path(&self, key: &str) -> PathBuf {
        self.sharded("records", key, ".json")
    }

    pub fn log_path(&self, key: &str) -> PathBuf {
        self.sharded("logs", key, ".log")
    }

    /// The record for `key`, if it exists, parses, and all its outputs are
    /// present. A damaged record counts as absent (and is reported).
    pub fn record(&self, key: &str) -> Option<Record> {
        let path = self.record_path(key);
        let bytes = fs::read(&path).ok()?;
        match serde_json::from_slice::<Record>(&bytes) {
            Ok(record) if record.key == key => {
                let complete = record.outputs.values().all(|hash| self.intact(hash));
                complete.then_some(record)
            }
            _ => {
                tracing::warn!("ignoring damaged cache record {}", path.display());
                None
            }
        }
    }

    pub fn write_record(&self, record: &Record) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(record)?;
        write_atomic(&self.record_path(&record.key), &bytes)
            .with_context(|| format!("recording the result of {}", record.instance))
    }

    pub fn remove_record(&self, key: &str) {
        let _ = fs::remove_file(self.record_path(key));
    }

    /// A fresh folder under `tmp/` for one attempt at `key`.
    pub fn temp_dir(&self, key: &str) -> anyhow::Result<PathBuf> {
        let dir = self.root.join("tmp").join(unique_name(&key[..16]));
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Move a finished output into the object store and return its hash.
    /// An object of that hash already there is kept only if a full re-hash
    /// proves it equal to this fresh output (its seal alone misses damage
    /// that kept sizes and times, and `--force` must not keep such an
    /// object); otherwise it is moved out and this one takes its place.
    pub fn store(&self, path: &Path) -> anyhow::Result<String> {
        let hash = hash_path(path).with_context(|| format!("hashing {}", path.display()))?;
        let dest = self.object_path(&hash);
        if dest.exists() {
            if self.reverify(&hash)? {
                remove_path(path)?;
                return Ok(hash);
            }
            tracing::warn!(
                "cached object {} did not hash to its name: replaced by the fresh output",
                dest.display()
            );
        }
        make_read_only(path)?;
        fs::create_dir_all(dest.parent().expect("sharded path has a parent"))?;
        if let Err(err) = rename_no_replace(path, &dest) {
            // Another run stored the same content first (under another
            // key: equal outputs of different stages); its copy stays.
            if dest.exists() {
                remove_path(path)?;
            } else {
                return Err(err).with_context(|| format!("storing {}", dest.display()));
            }
        }
        self.seal(&hash)?;
        Ok(hash)
    }

    fn seal_path(&self, hash: &str) -> PathBuf {
        self.sharded("seals", hash, ".json")
    }

    /// Record the sizes and modification times of `hash`'s files.
    fn seal(&self, hash: &str) -> anyhow::Result<()> {
        let seal = file_stamps(&self.object_path(hash))
            .with_context(|| format!("sealing object {hash}"))?;
        write_atomic(&self.seal_path(hash), &serde_json::to_vec(&seal)?)
            .with_context(|| format!("sealing object {hash}"))
    }

    /// Whether object `hash` is present and undamaged as far as its seal
    /// tells: same files, sizes and modification times as when stored. An
    /// object without a seal (stored by older code) is re-hashed once and
    /// sealed. A damaged object is moved out of the store, so that what
    /// needs it is rebuilt.
    pub fn intact(&self, hash: &str) -> bool {
        let path = self.object_path(hash);
        if !path.exists() {
            return false;
        }
        let sealed: Option<Vec<FileStamp>> = fs::read(self.seal_path(hash))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let ok = match sealed {
            Some(sealed) => file_stamps(&path).is_ok_and(|now| now == sealed),
            None => {
                let same = self.hashes_to_its_name(hash);
                if same {
                    if let Err(err) = self.seal(hash) {
                        tracing::warn!("{err:#}");
                    }
                }
                same
            }
        };
        if !ok {
            let quarantine = self.quarantine(&path);
            tracing::warn!(
                "cached object {} was changed after it was stored; moved to {} and rebuilt",
                path.display(),
                quarantine.display()
            );
        }
        ok
    }

    /// Move a damaged object out of `objects/` (into `tmp/`, which `gc`
    /// empties) and forget its seal.
    fn quarantine(&self, path: &Path) -> PathBuf {
        let quarantine = self.root.join("tmp").join(unique_name("damaged"));
        let _ = fs::create_dir_all(self.root.join("tmp"));
        let _ = fs::rename(path, &quarantine);
        if let Some(hash) = path.file_name().and_then(|n| n.to_str()) {
            let _ = fs::remove_file(self.seal_path(hash));
        }
        quarantine
    }

    /// Delete `path` (an object, a record, a folder of refs) so that a kill
    /// midway never leaves it half there: a folder is first renamed into
    /// `tmp/` (one atomic step), then deleted from there; what a kill leaves
    /// in `tmp/` is never trusted and is cleared by the next run or `gc`.
    pub fn remove_whole(&self, path: &Path) -> io::Result<()> {
        if !fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
            return remove_path(path);
        }
        let doomed = self.root.join("tmp").join(unique_name("removed"));
        fs::create_dir_all(self.root.join("tmp"))?;
        match fs::rename(path, &doomed) {
            Ok(()) => remove_path(&doomed),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Whether object `hash` re-hashes to its name, touching nothing.
    pub fn hashes_to_its_name(&self, hash: &str) -> bool {
        hash_path(&self.object_path(hash)).is_ok_and(|actual| actual == hash)
    }

    /// Re-hash object `hash` (for `xlpipe verify`): an intact one is sealed
    /// afresh, a damaged or unreadable one moved out of the store (the next
    /// run rebuilds it). Returns whether it was intact.
    pub fn reverify(&self, hash: &str) -> anyhow::Result<bool> {
        if self.hashes_to_its_name(hash) {
            self.seal(hash)?;
            Ok(true)
        } else {
            self.quarantine(&self.object_path(hash));
            Ok(false)
        }
    }

    /// Re-hash an object before a stage reads it. A damaged object is moved
    /// out of the way so the next run rebuilds it instead of trusting it.
    pub fn verify(&self, hash: &str) -> anyhow::Result<PathBuf> {
        let path = self.object_path(hash);
        let actual = hash_path(&path)
            .with_context(|| format!("reading cached object {}", path.display()))?;
        if actual != hash {
            let quarantine = self.quarantine(&path);
            anyhow::bail!(
                "cached object {} is damaged (content hash {actual}); it was moved to {}; \
                 run again to rebuild it",
                path.display(),
                quarantine.display()
            );
        }
        Ok(path)
    }

    /// Per-kind folder that outlives runs (see `StageContext::state_dir`).
    pub fn state_dir(&self, kind: &str) -> anyhow::Result<PathBuf> {
        let dir = self.root.join("state").join(kind);
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    fn prefix_dir(&self, family: &str) -> PathBuf {
        self.root.join("prefixes").join(family)
    }

    /// Record that `entry`'s object holds `family`'s state at its step.
    pub fn write_prefix(&self, family: &str, entry: &PrefixEntry) -> anyhow::Result<()> {
        let path = self
            .prefix_dir(family)
            .join(format!("{:010}.json", entry.step));
        write_atomic(&path, &serde_json::to_vec_pretty(entry)?)
    }

    /// Every prefix entry in the cache, with the file that holds it.
    pub fn prefix_entries(&self) -> Vec<(PathBuf, PrefixEntry)> {
        sharded_entries(&self.root, "prefixes")
            .into_iter()
            .filter_map(|path| {
                let entry = read_prefix_entry(&path)?;
                Some((path, entry))
            })
            .collect()
    }

    /// Delete every stored prefix of `family` (the entries first, so no run
    /// picks one up, then their objects); returns the bytes freed.
    pub fn drop_prefixes(&self, family: &str) -> anyhow::Result<u64> {
        let dir = self.prefix_dir(family);
        let mut freed = 0;
        for path in list_dir(&dir) {
            let entry = read_prefix_entry(&path);
            remove_path(&path).with_context(|| format!("removing {}", path.display()))?;
            if let Some(entry) = entry {
                let object = self.object_path(&entry.object);
                freed += disk_usage(&object);
                self.remove_whole(&object)
                    .with_context(|| format!("removing {}", object.display()))?;
                let _ = remove_path(&self.seal_path(&entry.object));
            }
        }
        let _ = fs::remove_dir(&dir);
        Ok(freed)
    }

    /// `family`'s longest stored prefix of at most `until` steps whose
    /// object is intact (as far as its seal tells).
    pub fn best_prefix(&self, family: &str, until: usize) -> Option<PrefixEntry> {
        let mut entries: Vec<PrefixEntry> = list_dir(&self.prefix_dir(family))
            .iter()
            .filter_map(|path| read_prefix_entry(path))
            .filter(|e| e.step <= until)
            .collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.step));
        entries.into_iter().find(|e| self.intact(&e.object))
    }

    pub fn refs_dir(&self, pipeline: &str) -> PathBuf {
        self.root.join("refs").join(pipeline)
    }

    fn ref_path(&self, pipeline: &str, instance: &str) -> PathBuf {
        let id = blake3::hash(instance.as_bytes()).to_hex();
        self.refs_dir(pipeline).join(format!("{}.json", &id[..24]))
    }

    pub fn instance_ref(&self, pipeline: &str, instance: &str) -> Option<InstanceRef> {
        let bytes = fs::read(self.ref_path(pipeline, instance)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn write_ref(&self, pipeline: &str, r: &InstanceRef) -> anyhow::Result<()> {
        let path = self.ref_path(pipeline, &r.instance);
        fs::create_dir_all(path.parent().expect("ref path has a parent"))?;
        write_atomic(&path, &serde_json::to_vec(r)?)
    }

    /// Every ref of a pipeline (instances of its last runs).
    pub fn refs(&self, pipeline: &str) -> Vec<InstanceRef> {
        let Ok(entries) = fs::read_dir(self.refs_dir(pipeline)) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| fs::read(e.ok()?.path()).ok())
            .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
            .collect()
    }

    /// Drop refs of instances that are no longer in the pipeline.
    pub fn retain_refs(&self, pipeline: &str, keep: &dyn Fn(&str) -> bool) {
        for r in self.refs(pipeline) {
            if !keep(&r.instance) {
                let _ = fs::remove_file(self.ref_path(pipeline, &r.instance));
            }
        }
    }

    pub fn pipelines(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.root.join("refs"))
            .into_iter()
            .flatten()
            .filter_map(|e| Some(e.ok()?.file_name().to_str()?.to_string()))
            .collect();
        names.sort();
        names
    }
}

/// Rename `from` to `to` unless `to` exists. A plain rename would replace
/// an existing file: a run storing content another run has just stored
/// (and is sealing) would swap the file under that seal, and the next hit
/// would find the object "changed" and throw it away.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    };
    let (from_c, to_c) = (c_path(from)?, c_path(to)?);
    // SAFETY: renameat2(2) with two NUL-terminated paths relative to the
    // working directory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) {
        return Err(err);
    }
    // A file system without RENAME_NOREPLACE: a file is linked (which fails
    // on an existing name) then unlinked; a folder cannot replace a
    // non-empty one anyway.
    if fs::symlink_metadata(from)?.is_dir() {
        fs::rename(from, to)
    } else {
        fs::hard_link(from, to)?;
        fs::remove_file(from)
    }
}

/// Write `bytes` to `path` so that readers see either the old file or the
/// whole new one, even after a crash.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().expect("atomic write target has a parent");
    let temp = dir.join(format!(".{}", unique_name("partial")));
    let written = (|| -> io::Result<()> {
        fs::create_dir_all(dir)?;
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temp, path)
    })();
    if let Err(err) = written {
        // A partial file is never trusted; leave none behind (disk full).
        let _ = fs::remove_file(&temp);
        return Err(err).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

/// One file of an object as sealed: path inside it, size, mtime.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct FileStamp {
    path: String,
    len: u64,
    mtime_ns: u128,
}

/// Every file under `path` (or `path` itself), in path order.
fn file_stamps(path: &Path) -> io::Result<Vec<FileStamp>> {
    fn walk(root: &Path, path: &Path, out: &mut Vec<FileStamp>) -> io::Result<()> {
        let meta = fs::symlink_metadata(path)?;
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = fs::read_dir(path)?
                .map(|e| e.map(|e| e.path()))
                .collect::<io::Result<_>>()?;
            entries.sort();
            for entry in entries {
                walk(root, &entry, out)?;
            }
        } else {
            let mtime_ns = meta
                .modified()?
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            out.push(FileStamp {
                path: path
                    .strip_prefix(root)
                    .unwrap_or(path)
                    .to_string_lossy()
                    .into_owned(),
                len: meta.len(),
                mtime_ns,
            });
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(path, path, &mut out)?;
    Ok(out)
}

/// A name no other process or thread will pick.
fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether some process holds the key lock file at `path` (see
/// `Cache::lock_key`).
pub fn key_lock_held(path: &Path) -> bool {
    File::open(path).is_ok_and(|file| file.try_lock().is_err())
}

/// The entries of a folder (none if it cannot be read).
pub fn list_dir(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| Some(e.ok()?.path()))
        .collect()
}

/// The entries of every shard of `root/dir` (`records/ab/…`, `objects/ab/…`).
pub fn sharded_entries(root: &Path, dir: &str) -> Vec<PathBuf> {
    list_dir(&root.join(dir))
        .iter()
        .flat_map(|shard| list_dir(shard))
        .collect()
}

/// A prefix entry file, or `None` where it is unreadable (a partial write).
fn read_prefix_entry(path: &Path) -> Option<PrefixEntry> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

pub fn remove_path(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}

/// Files in the store are read-only so a stage cannot alter its inputs in
/// place; folders stay writable so gc can delete them.
fn make_read_only(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            make_read_only(&entry?.path())?;
        }
    } else {
        let mut perms = meta.permissions();
        perms.set_readonly(true);
        fs::set_permissions(path, perms)?;
    }
    Ok(())
}

/// Total size of the files under `path`, in bytes.
pub fn disk_usage(path: &Path) -> u64 {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::read_dir(path)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| disk_usage(&e.path()))
            .sum(),
        Ok(meta) => meta.len(),
        Err(_) => 0,
    }
}

/// Whether this process may create files in `dir` (false on a read-only
/// mount even for root, which permission bits do not stop).
fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) reads the NUL-terminated path and nothing else.
    unsafe { libc::access(path.as_ptr(), libc::W_OK) == 0 }
}

/// Whether `file` is the file now at `path` (same device and inode).
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run that finds the cache unused removes what killed writers left:
    /// half-written prefix entries too, never a whole one.
    #[test]
    fn an_unused_cache_loses_its_partial_prefix_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let entry = PrefixEntry {
            step: 80,
            object: "ab".repeat(32),
            key: "cd".repeat(32),
            instance: "train[steps=100]".into(),
        };
        cache.write_prefix("family", &entry).unwrap();
        let family = cache.prefix_dir("family");
        fs::write(family.join(".partial-1-2-3"), b"{\"step\": 1").unwrap();
        drop(cache.lock_shared().unwrap());
        let left: Vec<PathBuf> = list_dir(&family);
        assert_eq!(left, [family.join("0000000080.json")]);
        assert_eq!(cache.prefix_entries().len(), 1);
    }

    /// Runs storing the same content under different keys (two pipelines
    /// whose outputs happen to be equal) must leave one object whose seal
    /// describes it: a rename that replaced the first copy after its seal
    /// was read made the next hit see "changed" and throw it away.
    #[test]
    fn concurrent_stores_of_one_content_leave_an_intact_object() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        for round in 0..60 {
            let content = format!("round {round}\n");
            let stored: Vec<String> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..3)
                    .map(|t| {
                        let (cache, content) = (&cache, &content);
                        scope.spawn(move || {
                            let temp = cache.temp_dir(&format!("{t:0>16}")).unwrap();
                            let output = temp.join("o");
                            fs::write(&output, content).unwrap();
                            cache.store(&output).unwrap()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(stored.windows(2).all(|w| w[0] == w[1]), "{stored:?}");
            assert!(
                cache.intact(&stored[0]),
                "round {round}: the stored object does not match its seal"
            );
        }
    }
}
