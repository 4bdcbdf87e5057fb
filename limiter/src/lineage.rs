//! Which replica this process succeeds: a lock file in the snapshot directory.
//!
//! Every process start is a new replica (`crdt::ReplicaId`). When a replica dies without saying
//! so (SIGKILL, an OOM kill, a crash), its peers cannot tell a dead replica from a cut-off one,
//! so `strict` mode waits out its lease before anyone else may spend its share, and meanwhile
//! every lease needs its answers: strict spending stops cluster-wide for `lease + guard` and
//! more (docs/crdt.md, "What it costs").
//!
//! A process that restarts on the same snapshot directory (a container restarting in its pod
//! keeps its `emptyDir`) can know its predecessor is dead, and say so. The directory holds
//! `replica.lock`: each process holds an exclusive `flock` on it for as long as it runs and
//! writes its replica id into it. The kernel releases the lock when the holder exits, however
//! it exits. So a process that takes the lock knows that the replica named in the file will
//! never spend again, and its peers may treat that replica as retired at once
//! (`escrow::Node::supersede`). A lock held by a live process means two processes were given
//! one snapshot directory: that is refused at start (they would overwrite each other's
//! snapshots too).
//!
//! This needs a local filesystem, where `flock` is the kernel's (an `emptyDir`, a local
//! volume); on a network filesystem whose locks are not released with their holder, do not
//! share one directory between restarts of different processes.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::crdt::ReplicaId;

/// The lock file's name in the snapshot directory.
pub const LOCK_FILE: &str = "replica.lock";

/// This process's hold on a snapshot directory: the lock, held until it is dropped (at exit).
#[derive(Debug)]
pub struct Lineage {
    /// Open and locked for the life of the process: closing it would release the lock.
    _file: File,
    /// The replica that held the directory before this process, now certainly gone.
    pub predecessor: Option<ReplicaId>,
    pub path: PathBuf,
}

/// Why a directory could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(
        "{0} is locked by another running process: two limiter processes were given the same \
         snapshot directory (each needs its own)"
    )]
    Held(PathBuf),
    #[error("cannot use {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Locks `dir/replica.lock` for this process (creating `dir` if needed), reads which replica
/// held it before, and writes `me` in its place.
pub fn claim(dir: &Path, me: ReplicaId) -> Result<Lineage, ClaimError> {
    let path = dir.join(LOCK_FILE);
    let io = |source| ClaimError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Err(ClaimError::Held(path)),
        Err(TryLockError::Error(e)) => return Err(io(e)),
    }
    let mut previous = String::new();
    file.read_to_string(&mut previous).map_err(io)?;
    // Anything but one id (an empty file from a crash between truncating and writing, a file
    // from elsewhere) names no predecessor: its peers then wait out its lease, as without a
    // directory.
    let predecessor = u64::from_str_radix(previous.trim(), 16)
        .ok()
        .map(ReplicaId)
        .filter(|&p| p != me);
    file.set_len(0).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.write_all(format!("{:016x}\n", me.0).as_bytes())
        .map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(Lineage {
        _file: file,
        predecessor,
        path,
    })
}

/// Whether a running process holds `dir` ([`claim`]): its lock file is there and locked.
/// Creates nothing. Testing takes a shared lock for an instant, so a replica starting on `dir`
/// at that very moment would be refused as if two had been given it (start it again).
pub fn is_held(dir: &Path) -> std::io::Result<bool> {
    let file = match File::open(dir.join(LOCK_FILE)) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(false),
        Err(TryLockError::WouldBlock) => Ok(true),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_process_has_no_predecessor_and_the_next_one_succeeds_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = claim(dir.path(), ReplicaId(0xabc)).unwrap();
        assert_eq!(first.predecessor, None);
        drop(first); // the process exits: the kernel releases its lock
        let second = claim(dir.path(), ReplicaId(0xdef)).unwrap();
        assert_eq!(second.predecessor, Some(ReplicaId(0xabc)));
        drop(second);
        let third = claim(dir.path(), ReplicaId(0x123)).unwrap();
        assert_eq!(third.predecessor, Some(ReplicaId(0xdef)));
    }

    #[test]
    fn a_directory_is_held_while_its_process_runs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_held(dir.path()).unwrap(), "no lock file");
        assert!(!is_held(&dir.path().join("absent")).unwrap());
        let holder = claim(dir.path(), ReplicaId(0xabc)).unwrap();
        assert!(is_held(dir.path()).unwrap());
        drop(holder);
        assert!(!is_held(dir.path()).unwrap(), "released at exit");
        // Testing left no lock behind.
        claim(dir.path(), ReplicaId(0xdef)).unwrap();
    }

    #[test]
    fn a_directory_held_by_a_live_process_is_refused_and_left_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let _holder = claim(dir.path(), ReplicaId(0xabc)).unwrap();
        let err = claim(dir.path(), ReplicaId(0xdef)).unwrap_err();
        assert!(matches!(err, ClaimError::Held(_)), "{err}");
        let text = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(text.trim(), format!("{:016x}", 0xabc));
    }

    #[test]
    fn an_unreadable_lock_file_names_no_predecessor() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOCK_FILE), "not an id\n").unwrap();
        let lineage = claim(dir.path(), ReplicaId(0xdef)).unwrap();
        assert_eq!(lineage.predecessor, None);
        std::fs::write(dir.path().join(LOCK_FILE), "").unwrap();
        drop(lineage);
        assert_eq!(claim(dir.path(), ReplicaId(1)).unwrap().predecessor, None);
    }
}
