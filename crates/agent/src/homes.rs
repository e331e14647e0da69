//! Container homes on the host file system: `<homeRoot>/<uid>`, its `.ssh/authorized_keys`, a
//! storage container's distro trees (`<homeRoot>/.distros/<uid>/<path>`, seen by the storage
//! container at `<home>/distros`), storage use, and archiving or deleting a home.
//!
//! Paths come from `uwsgi_it_domain::paths`, which only builds them from validated numbers and
//! names. That keeps the *names* under `homeRoot`; it cannot stop a symlink planted on the disk.
//! A home is owned by its customer's uid, so the customer can rename, replace or symlink
//! anything inside it at any time, even while the agent works. Therefore every component below
//! `homeRoot` (and `homeRoot` itself) is opened relative to its parent's descriptor with
//! `O_NOFOLLOW`, and ownership, modes and contents are then changed through the descriptor
//! (`fchown`, `fchmod`, `openat`, `renameat`), never through a path that could be swapped
//! between a check and a use. The ancestors of `homeRoot` belong to the supplier and are
//! trusted.
//!
//! Everything here blocks on file-system calls; call it from `tokio::task::spawn_blocking`.
//! Calls for the same uid are expected to be serialised by the caller (one reconcile per
//! object at a time); calls for different uids may run concurrently.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    AtFlags, CWD, Dir, FileType, Gid, Mode, OFlags, RenameFlags, ResolveFlags, Stat, Uid, fchmod,
    fchown, fstat, fsync, mkdirat, openat, openat2, renameat, renameat_with, statat, unlinkat,
};
use rustix::io::Errno;
use uwsgi_it_domain::distro::{EMPEROR_CANDIDATES, MAX_ROOT_DIRECTORIES, is_root_directory_name};
use uwsgi_it_domain::paths::{self, PathError};
use uwsgi_it_domain::ssh_keys::{self, SshKeyError};

/// Mode of `homeRoot` when the agent creates it: others may traverse to their own home (the
/// kubelet and the container runtime need that) but not list the uids.
pub const HOME_ROOT_MODE: u32 = 0o711;
/// Mode of a home: private to its container.
pub const HOME_MODE: u32 = 0o700;
/// Mode of `.ssh`: sshd's `StrictModes` refuses keys in a group- or world-writable directory.
pub const SSH_DIR_MODE: u32 = 0o700;
/// Mode of `authorized_keys`.
pub const AUTHORIZED_KEYS_MODE: u32 = 0o600;
/// Mode of `<homeRoot>/.distros` (root's): traversed by the runtime, listed by nobody else.
pub const DISTRO_TREES_MODE: u32 = 0o711;
/// Mode of `<homeRoot>/.distros/<uid>` (root's): the storage container lists its trees there but
/// cannot create, rename or replace one, so no PersistentVolume path has a component it owns
/// except the tree itself.
pub const STORAGE_DISTROS_MODE: u32 = 0o755;
/// Mode of a distro tree when the agent creates it (the storage container's uid owns it):
/// readable and traversable by the customer's other containers, which run as other uids.
pub const DISTRO_TREE_MODE: u32 = 0o755;
/// Mode of `<homeRoot>/.archive`: archived homes keep customer data, readable by root only.
pub const ARCHIVE_MODE: u32 = 0o700;
/// uwsgi.it's home layout: `vassals/` is what the Emperor watches, the others are where a
/// customer's apps keep logs, sockets and pid files, scratch files and configuration. Each is
/// made when nothing of its name is there; whatever is there is the customer's and left as it
/// is (mode, owner, contents, even a symlink).
pub const LAYOUT: [&str; 5] = ["vassals", "logs", "run", "tmp", "etc"];
/// Mode of the layout directories when the agent makes them (the home itself is 0700).
pub const LAYOUT_MODE: u32 = 0o755;

const AUTHORIZED_KEYS: &str = "authorized_keys";
/// Fixed name, so that a temp file left by a crash is found and replaced by the next write
/// instead of piling up in the customer's home.
const AUTHORIZED_KEYS_TMP: &str = ".authorized_keys.uwsgi-it.tmp";
/// Prefix of subtrees that `Delete` moves up to the top of the home to keep the number of open
/// descriptors bounded (see [`MAX_DELETE_DEPTH`]).
const DELETE_FLATTEN_PREFIX: &str = ".uwsgi-it-deleting-";
/// Deleting keeps one descriptor open per directory level; deeper subtrees are moved to the top
/// of the home and removed in a later pass, so a customer cannot make its home undeletable by
/// nesting directories deeper than the agent's descriptor limit.
const MAX_DELETE_DEPTH: usize = 64;
/// A pass that moves subtrees up always makes progress, so this only guards against a process
/// that keeps writing into a home being deleted (its Pod should be gone by then).
const MAX_DELETE_PASSES: usize = 100_000;

/// Opens an existing directory without following a symlink in its last component. `NONBLOCK`
/// makes no difference for a directory but keeps a FIFO planted under the name from blocking
/// the open if the kernel ever reached it.
const DIR_OPEN: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NONBLOCK);

/// Why a home operation failed. Every message names the path (or field) and what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    InvalidSshKey(#[from] SshKeyError),
    #[error(
        "{}: was not written by the operator (it lacks the operator's first line), so sshKeys are not applied over it; remove it to let sshKeys manage the keys, or empty sshKeys to keep it",
        .path.display()
    )]
    HandMadeKeys { path: PathBuf },
    #[error("{}: is a symbolic link; refusing to follow it", .path.display())]
    Symlink { path: PathBuf },
    #[error("{}: is a {found}, expected a directory", .path.display())]
    NotADirectory { path: PathBuf, found: &'static str },
    #[error("{}: is a {found}, expected a regular file", .path.display())]
    NotARegularFile { path: PathBuf, found: &'static str },
    #[error("{}: does not exist", .path.display())]
    NotFound { path: PathBuf },
    #[error("{}: is owned by uid {found}, not by the storage container's uid {expected}", .path.display())]
    NotOwned {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(
        "{}: is on another file system (a mount point inside the home); refusing to delete across it",
        .path.display()
    )]
    MountPoint { path: PathBuf },
    #[error("{}: already exists; refusing to overwrite an archived home", .path.display())]
    ArchiveExists { path: PathBuf },
    #[error("{}: still not empty after {passes} removal passes", .path.display())]
    NotEmpty { path: PathBuf, passes: usize },
    #[error("{}: {op} failed: {source}", .path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl HomeError {
    fn io(path: &Path, op: &'static str, errno: Errno) -> Self {
        HomeError::Io {
            path: path.to_owned(),
            op,
            source: errno.into(),
        }
    }

    fn std_io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        HomeError::Io {
            path: path.to_owned(),
            op,
            source,
        }
    }
}

/// What a home must look like.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HomeSpec {
    pub uid: u32,
    /// `customDistrosStorage`: the home gets a `distros/` directory.
    pub storage_container: bool,
    /// `sshKeys`, one per line of `authorized_keys` (see `uwsgi_it_domain::ssh_keys`). Blank
    /// entries are dropped; an empty list removes an `authorized_keys` the agent wrote and leaves
    /// one the customer wrote.
    pub ssh_keys: Vec<String>,
}

/// One thing [`Homes::ensure`] changed on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HomeChange {
    CreatedDir {
        path: PathBuf,
    },
    FixedOwner {
        path: PathBuf,
        from_uid: u32,
        from_gid: u32,
    },
    FixedMode {
        path: PathBuf,
        from_mode: u32,
    },
    WroteAuthorizedKeys {
        path: PathBuf,
        keys: usize,
    },
    RemovedAuthorizedKeys {
        path: PathBuf,
    },
}

impl std::fmt::Display for HomeChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HomeChange::CreatedDir { path } => write!(f, "created {}", path.display()),
            HomeChange::FixedOwner {
                path,
                from_uid,
                from_gid,
            } => write!(f, "{}: owner was {from_uid}:{from_gid}", path.display()),
            HomeChange::FixedMode { path, from_mode } => {
                write!(f, "{}: mode was {from_mode:04o}", path.display())
            }
            HomeChange::WroteAuthorizedKeys { path, keys } => {
                write!(f, "wrote {keys} key(s) to {}", path.display())
            }
            HomeChange::RemovedAuthorizedKeys { path } => write!(f, "removed {}", path.display()),
        }
    }
}

/// The outcome of [`Homes::ensure`].
#[derive(Debug)]
pub struct HomeReport {
    /// `<homeRoot>/<uid>`.
    pub home: PathBuf,
    /// Empty when the home already matched the spec.
    pub changes: Vec<HomeChange>,
    /// Set when a container that is not a storage container has a `distros/` entry. It is left
    /// alone (it may be customer data, or the flag was just turned off) but worth reporting.
    pub unexpected_distros: Option<PathBuf>,
    /// What became of `sshKeys`. A key problem is reported on its own and never makes the home
    /// fail: the home, and the Pod that uses it, do not depend on the keys.
    pub keys: Result<KeysOutcome, HomeError>,
}

/// `authorized_keys` after [`Homes::ensure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeysOutcome {
    /// It holds the `sshKeys` (this many), or there are none and neither is there a file.
    Applied { keys: usize },
    /// `sshKeys` is empty and the file is the customer's own: left as it is.
    HandMade,
}

impl HomeReport {
    pub fn unchanged(&self) -> bool {
        self.changes.is_empty()
    }
}

/// Limits that bound the cost of [`Homes::usage_with_limits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageLimits {
    /// Entries (files, directories, links) examined before giving up with `truncated`.
    pub max_entries: u64,
    /// Directory levels descended (one open descriptor each) before giving up with
    /// `truncated`.
    pub max_depth: usize,
}

impl Default for UsageLimits {
    fn default() -> Self {
        UsageLimits {
            max_entries: 1_000_000,
            max_depth: 256,
        }
    }
}

/// Storage used by a home.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StorageUsage {
    /// Allocated bytes (`st_blocks * 512`): what the disk really gives up, so sparse files count
    /// for what they hold and small files for at least a block. Hard links count once.
    pub bytes: u64,
    /// Sum of file sizes (`st_size`), for comparison.
    pub apparent_bytes: u64,
    /// Entries counted, the home directory included.
    pub entries: u64,
    /// True when a limit stopped the walk: the numbers are then a lower bound.
    pub truncated: bool,
}

/// `homeRetention`: what happens to a deleted container's home.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Retention {
    /// Leave the home where it is.
    Retain,
    /// Rename it into `<homeRoot>/.archive/<uid>-<unix time>`.
    #[default]
    Archive,
    /// Remove it.
    Delete,
}

/// The outcome of [`Homes::archive`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveOutcome {
    Retained {
        home: PathBuf,
    },
    Archived {
        to: PathBuf,
    },
    Deleted {
        home: PathBuf,
    },
    /// There was no home (already archived or deleted, or never created).
    AlreadyGone,
}

/// True when `used_bytes` has reached `quota_threshold_percent` of `storage_mb` (1 MB = 1 MiB).
/// A threshold of 0 is always reached; above 100 it is reached only past the reservation.
pub fn threshold_crossed(used_bytes: u64, storage_mb: u64, quota_threshold_percent: u32) -> bool {
    // u128: storage_mb * 2^20 * percent overflows u64 for very large reservations.
    u128::from(used_bytes) * 100
        >= u128::from(storage_mb) * 1024 * 1024 * u128::from(quota_threshold_percent)
}

/// The homes of one node, under `homeRoot`.
#[derive(Debug, Clone)]
pub struct Homes {
    root: PathBuf,
}

impl Homes {
    /// `home_root` must be absolute and normalised (see `uwsgi_it_domain::paths`). It need not
    /// exist yet: [`Homes::ensure`] creates it.
    pub fn new(home_root: PathBuf) -> Result<Self, HomeError> {
        // archive_dir validates the root alone.
        paths::archive_dir(&home_root)?;
        Ok(Homes { root: home_root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Makes the home match `spec`, idempotently; see the module documentation for the rules.
    pub fn ensure(&self, spec: &HomeSpec) -> Result<HomeReport, HomeError> {
        let uid = spec.uid;
        // Validate everything before touching the disk, so bad input changes nothing.
        let home = paths::home_dir(&self.root, uid)?;
        let ssh = paths::ssh_dir(&self.root, uid)?;
        let keys_path = paths::authorized_keys(&self.root, uid)?;
        let distros = paths::distros_dir(&self.root, uid)?;
        let keys = ssh_keys::parse_keys(&spec.ssh_keys);
        let owner = Some((uid, uid));

        let mut changes = Vec::new();
        let root_fd = self
            .open_root(true, &mut changes)?
            .ok_or_else(|| HomeError::NotFound {
                path: self.root.clone(),
            })?;
        let home_fd = ensure_dir(root_fd.as_fd(), &home, HOME_MODE, owner, &mut changes)?;

        let mut unexpected_distros = None;
        if spec.storage_container {
            // The trees' root-owned parent first: the storage container's Pod mounts it.
            self.ensure_storage_distros(root_fd.as_fd(), uid, &mut changes)?;
            // Only the mount point of that parent: whatever the customer puts at this name is
            // its own business and affects only its own Pod's view.
            create_if_missing(home_fd.as_fd(), &distros, uid, LAYOUT_MODE, &mut changes)?;
        } else {
            match statat(
                home_fd.as_fd(),
                file_name(&distros),
                AtFlags::SYMLINK_NOFOLLOW,
            ) {
                Ok(_) => unexpected_distros = Some(distros),
                Err(Errno::NOENT) => {}
                Err(errno) => return Err(HomeError::io(&distros, "stat", errno)),
            }
        }

        // A bad key is refused before `.ssh` is touched; whatever goes wrong with the keys, the
        // rest of the home is still made.
        let keys = keys.map_err(HomeError::from).and_then(|keys| {
            let ssh_fd = ensure_dir(home_fd.as_fd(), &ssh, SSH_DIR_MODE, owner, &mut changes)?;
            sync_authorized_keys(ssh_fd.as_fd(), &keys_path, &keys, uid, &mut changes)
        });
        for name in LAYOUT {
            create_if_missing(
                home_fd.as_fd(),
                &home.join(name),
                uid,
                LAYOUT_MODE,
                &mut changes,
            )?;
        }

        Ok(HomeReport {
            home,
            changes,
            unexpected_distros,
            keys,
        })
    }

    /// Storage used by the home, with the default [`UsageLimits`].
    pub fn usage(&self, uid: u32) -> Result<StorageUsage, HomeError> {
        self.usage_with_limits(uid, UsageLimits::default())
    }

    /// Storage used by the home: walks it without following symlinks (a link counts for its own
    /// blocks), without entering other file systems (a mount point inside the home is neither
    /// counted nor entered) and within `limits`.
    pub fn usage_with_limits(
        &self,
        uid: u32,
        limits: UsageLimits,
    ) -> Result<StorageUsage, HomeError> {
        let home = paths::home_dir(&self.root, uid)?;
        let not_found = || HomeError::NotFound { path: home.clone() };
        let root_fd = self
            .open_root(false, &mut Vec::new())?
            .ok_or_else(not_found)?;
        let home_fd = open_dir(root_fd.as_fd(), &home)?.ok_or_else(not_found)?;
        let top = fstat(&home_fd).map_err(|e| HomeError::io(&home, "stat", e))?;
        let device = top.st_dev;

        let mut usage = StorageUsage {
            bytes: allocated_bytes(&top),
            apparent_bytes: apparent_bytes(&top),
            entries: 1,
            truncated: false,
        };
        let mut seen_links = HashSet::new();
        let mut stack = vec![Dir::new(home_fd).map_err(|e| HomeError::io(&home, "read", e))?];
        loop {
            let depth = stack.len();
            let Some(dir) = stack.last_mut() else { break };
            let entry = match dir.next() {
                None => {
                    stack.pop();
                    continue;
                }
                // The customer may remove a directory while it is walked; what is gone uses
                // no space.
                Some(Err(Errno::NOENT)) => {
                    stack.pop();
                    continue;
                }
                Some(Err(errno)) => return Err(HomeError::io(&home, "read directory", errno)),
                Some(Ok(entry)) => entry,
            };
            let name = entry.file_name();
            if is_dot_entry(name.to_bytes()) {
                continue;
            }
            if usage.entries >= limits.max_entries {
                usage.truncated = true;
                break;
            }
            let dir_fd = dir.fd().map_err(|e| HomeError::io(&home, "read", e))?;
            let stat = match statat(dir_fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => stat,
                Err(Errno::NOENT) => continue,
                Err(errno) => return Err(HomeError::io(&home, "stat an entry below", errno)),
            };
            usage.entries += 1;
            if stat.st_dev != device {
                continue;
            }
            let kind = FileType::from_raw_mode(stat.st_mode);
            let first_link = kind == FileType::Directory
                || link_count(&stat) <= 1
                || seen_links.insert(stat.st_ino);
            if first_link {
                usage.bytes = usage.bytes.saturating_add(allocated_bytes(&stat));
                usage.apparent_bytes = usage.apparent_bytes.saturating_add(apparent_bytes(&stat));
            }
            if kind != FileType::Directory {
                continue;
            }
            if depth >= limits.max_depth {
                usage.truncated = true;
                continue;
            }
            let child = match openat(dir_fd, name, DIR_OPEN, Mode::empty()) {
                Ok(fd) => fd,
                // Replaced by a symlink or a file, or removed, since the stat: nothing to enter.
                Err(Errno::NOENT | Errno::LOOP | Errno::NOTDIR) => continue,
                Err(errno) => return Err(HomeError::io(&home, "open a directory below", errno)),
            };
            stack.push(Dir::new(child).map_err(|e| HomeError::io(&home, "read", e))?);
        }
        Ok(usage)
    }

    /// Applies `retention` to a deleted container's home. Idempotent: a home that is already
    /// gone gives [`ArchiveOutcome::AlreadyGone`].
    pub fn archive(
        &self,
        uid: u32,
        retention: Retention,
        now_unix: u64,
    ) -> Result<ArchiveOutcome, HomeError> {
        let home = paths::home_dir(&self.root, uid)?;
        let archive_dir = paths::archive_dir(&self.root)?;
        let destination = paths::archive_path(&self.root, uid, now_unix)?;
        let Some(root_fd) = self.open_root(false, &mut Vec::new())? else {
            return Ok(ArchiveOutcome::AlreadyGone);
        };
        // Refuses a symlink or a file where the home should be: something is wrong and a person
        // should look before anything is moved or removed.
        let Some(home_fd) = open_dir(root_fd.as_fd(), &home)? else {
            return Ok(ArchiveOutcome::AlreadyGone);
        };
        // A storage container's trees go the same way as its home, first: an interrupted
        // release is retried while the home is still there to say so.
        self.release_distro_trees(root_fd.as_fd(), uid, retention, now_unix)?;
        match retention {
            Retention::Retain => Ok(ArchiveOutcome::Retained { home }),
            Retention::Archive => {
                drop(home_fd);
                let archive_fd = ensure_dir(
                    root_fd.as_fd(),
                    &archive_dir,
                    ARCHIVE_MODE,
                    None,
                    &mut Vec::new(),
                )?;
                let moved = rename_no_replace(
                    root_fd.as_fd(),
                    file_name(&home),
                    archive_fd.as_fd(),
                    file_name(&destination),
                );
                match moved {
                    Ok(()) => {}
                    Err(Errno::NOENT) => return Ok(ArchiveOutcome::AlreadyGone),
                    Err(Errno::EXIST | Errno::NOTEMPTY) => {
                        return Err(HomeError::ArchiveExists { path: destination });
                    }
                    Err(errno) => return Err(HomeError::io(&home, "rename into archive", errno)),
                }
                // The rename is only durable once both directories are on disk.
                fsync(&archive_fd).map_err(|e| HomeError::io(&archive_dir, "fsync", e))?;
                fsync(&root_fd).map_err(|e| HomeError::io(&self.root, "fsync", e))?;
                Ok(ArchiveOutcome::Archived { to: destination })
            }
            Retention::Delete => {
                remove_tree(root_fd.as_fd(), home_fd, &home)?;
                fsync(&root_fd).map_err(|e| HomeError::io(&self.root, "fsync", e))?;
                Ok(ArchiveOutcome::Deleted { home })
            }
        }
    }

    /// Applies `retention` to `<homeRoot>/.distros/<uid>` when it exists: moved next to the
    /// archived home as `<uid>-<time>.distros`, removed, or left.
    fn release_distro_trees(
        &self,
        root_fd: BorrowedFd<'_>,
        uid: u32,
        retention: Retention,
        now_unix: u64,
    ) -> Result<(), HomeError> {
        let trees = paths::distro_trees_dir(&self.root)?;
        let storage = paths::storage_distros_dir(&self.root, uid)?;
        let Some(trees_fd) = open_dir(root_fd, &trees)? else {
            return Ok(());
        };
        let Some(storage_fd) = open_dir(trees_fd.as_fd(), &storage)? else {
            return Ok(());
        };
        match retention {
            Retention::Retain => Ok(()),
            Retention::Archive => {
                drop(storage_fd);
                let archive_dir = paths::archive_dir(&self.root)?;
                let destination = paths::archive_distros_path(&self.root, uid, now_unix)?;
                let archive_fd =
                    ensure_dir(root_fd, &archive_dir, ARCHIVE_MODE, None, &mut Vec::new())?;
                match rename_no_replace(
                    trees_fd.as_fd(),
                    file_name(&storage),
                    archive_fd.as_fd(),
                    file_name(&destination),
                ) {
                    Ok(()) | Err(Errno::NOENT) => {}
                    Err(Errno::EXIST | Errno::NOTEMPTY) => {
                        return Err(HomeError::ArchiveExists { path: destination });
                    }
                    Err(errno) => {
                        return Err(HomeError::io(&storage, "rename into archive", errno));
                    }
                }
                fsync(&archive_fd).map_err(|e| HomeError::io(&archive_dir, "fsync", e))?;
                fsync(&trees_fd).map_err(|e| HomeError::io(&trees, "fsync", e))
            }
            Retention::Delete => remove_tree(trees_fd.as_fd(), storage_fd, &storage),
        }
    }

    /// `<homeRoot>/.distros` and `<homeRoot>/.distros/<uid>`, root-owned, with their modes.
    fn ensure_storage_distros(
        &self,
        root_fd: BorrowedFd<'_>,
        uid: u32,
        changes: &mut Vec<HomeChange>,
    ) -> Result<OwnedFd, HomeError> {
        let trees = paths::distro_trees_dir(&self.root)?;
        let storage = paths::storage_distros_dir(&self.root, uid)?;
        let trees_fd = ensure_dir(root_fd, &trees, DISTRO_TREES_MODE, Some((0, 0)), changes)?;
        ensure_dir(
            trees_fd.as_fd(),
            &storage,
            STORAGE_DISTROS_MODE,
            Some((0, 0)),
            changes,
        )
    }

    /// Makes the tree `<homeRoot>/.distros/<storage_uid>/<path_name>` (owned by the storage
    /// container's uid, created when missing, otherwise left as the customer made it) and looks
    /// at what it holds, never leaving the tree: see [`survey_tree`].
    pub fn ensure_distro_tree(
        &self,
        storage_uid: u32,
        path_name: &str,
    ) -> Result<DistroSurvey, HomeError> {
        let tree = paths::custom_distro_dir(&self.root, storage_uid, path_name)?;
        let root_fd =
            self.open_root(false, &mut Vec::new())?
                .ok_or_else(|| HomeError::NotFound {
                    path: self.root.clone(),
                })?;
        let mut changes = Vec::new();
        let parent = self.ensure_storage_distros(root_fd.as_fd(), storage_uid, &mut changes)?;
        // Only root can write the parent, so once made the name cannot be swapped; what is
        // already there is the customer's tree and is left as it is.
        let created = create_if_missing(
            parent.as_fd(),
            &tree,
            storage_uid,
            DISTRO_TREE_MODE,
            &mut changes,
        )?;
        let tree_fd = open_dir(parent.as_fd(), &tree)?
            .ok_or_else(|| HomeError::NotFound { path: tree.clone() })?;
        let stat = fstat(&tree_fd).map_err(|e| HomeError::io(&tree, "stat", e))?;
        if stat.st_uid != storage_uid {
            return Err(HomeError::NotOwned {
                path: tree,
                found: stat.st_uid,
                expected: storage_uid,
            });
        }
        let mut survey = survey_tree(tree_fd.as_fd(), &tree)?;
        survey.created = created;
        Ok(survey)
    }

    /// Opens `homeRoot` without following a symlink in its last component, creating it (and,
    /// with the supplier's trust, its ancestors) when `create` is set.
    fn open_root(
        &self,
        create: bool,
        changes: &mut Vec<HomeChange>,
    ) -> Result<Option<OwnedFd>, HomeError> {
        let parent = self.root.parent().ok_or_else(|| HomeError::NotADirectory {
            path: self.root.clone(),
            found: "file-system root",
        })?;
        let parent_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let parent_fd = match openat(CWD, parent, parent_flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) if create => {
                std::fs::create_dir_all(parent)
                    .map_err(|e| HomeError::std_io(parent, "create directory", e))?;
                openat(CWD, parent, parent_flags, Mode::empty())
                    .map_err(|e| HomeError::io(parent, "open", e))?
            }
            Err(Errno::NOENT) => return Ok(None),
            Err(errno) => return Err(HomeError::io(parent, "open", errno)),
        };
        let existing = open_dir(parent_fd.as_fd(), &self.root)?;
        if existing.is_some() || !create {
            // An existing root's owner and mode are the supplier's to choose.
            return Ok(existing);
        }
        ensure_dir(parent_fd.as_fd(), &self.root, HOME_ROOT_MODE, None, changes).map(Some)
    }
}

/// What a distro tree holds, as a container running on it would see it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DistroSurvey {
    /// The tree on the host.
    pub tree: PathBuf,
    /// Whether the agent created the (empty) tree just now.
    pub created: bool,
    /// Top-level directories (or relative links to directories within the tree) a container
    /// mounts, sorted; see `uwsgi_it_domain::distro::is_root_directory_name`.
    pub directories: Vec<String>,
    /// Top-level entries left out, each with why (a link out of the tree, say).
    pub skipped: Vec<String>,
    /// The first of `EMPEROR_CANDIDATES` that is an executable file (for all users) in the
    /// tree, resolved as inside the container: links are followed, but never out of the tree.
    pub emperor: Option<String>,
}

/// Looks at a distro tree through its descriptor. The top level is read entry by entry without
/// following links; a top-level link counts only when it resolves *beneath* the tree
/// (`RESOLVE_BENEATH`: no absolute target, no `..` out of it), as the kubelet will require of the
/// subPath. The Emperor is looked for with `RESOLVE_IN_ROOT`: absolute links inside the distro
/// (`/usr/bin/uwsgi -> /etc/alternatives/uwsgi`) resolve against the tree, as they will inside
/// the container, and nothing resolves to a path outside it.
fn survey_tree(tree_fd: BorrowedFd<'_>, tree: &Path) -> Result<DistroSurvey, HomeError> {
    let mut survey = DistroSurvey {
        tree: tree.to_owned(),
        ..DistroSurvey::default()
    };
    for name in list_names(tree_fd, tree)? {
        let Some(text) = name.to_str() else {
            continue;
        };
        if !is_root_directory_name(text) {
            continue;
        }
        let stat = match statat(tree_fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => continue,
            Err(errno) => return Err(HomeError::io(&tree.join(&name), "stat", errno)),
        };
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::Directory => survey.directories.push(text.to_owned()),
            FileType::Symlink => {
                let beneath = openat2(
                    tree_fd,
                    name.as_os_str(),
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                    ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
                );
                match beneath {
                    Ok(_) => survey.directories.push(text.to_owned()),
                    Err(_) => survey.skipped.push(format!(
                        "/{text} (a link that leaves the tree or is broken)"
                    )),
                }
            }
            _ => {}
        }
    }
    survey.directories.sort();
    if survey.directories.len() > MAX_ROOT_DIRECTORIES {
        for extra in survey.directories.split_off(MAX_ROOT_DIRECTORIES) {
            survey.skipped.push(format!(
                "/{extra} (more than {MAX_ROOT_DIRECTORIES} top-level directories)"
            ));
        }
    }
    survey.emperor = EMPEROR_CANDIDATES
        .iter()
        .find(|candidate| {
            let relative = candidate.trim_start_matches('/');
            let top = relative.split('/').next().unwrap_or_default();
            survey.directories.iter().any(|d| d == top) && executable_in_tree(tree_fd, relative)
        })
        .map(|candidate| (*candidate).to_owned());
    Ok(survey)
}

/// Whether `relative` names, inside the tree, a regular file every user may execute (the
/// containers on a distro run as uids other than its owner's).
fn executable_in_tree(tree_fd: BorrowedFd<'_>, relative: &str) -> bool {
    let opened = openat2(
        tree_fd,
        relative,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    );
    opened
        .ok()
        .and_then(|fd| fstat(&fd).ok())
        .is_some_and(|stat| {
            FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile
                && stat.st_mode & 0o001 != 0
        })
}

/// Makes `authorized_keys` hold `keys`, touching only a file the agent wrote (see
/// `uwsgi_it_domain::ssh_keys::is_managed`).
fn sync_authorized_keys(
    ssh_fd: BorrowedFd<'_>,
    path: &Path,
    keys: &[ssh_keys::KeyLine],
    uid: u32,
    changes: &mut Vec<HomeChange>,
) -> Result<KeysOutcome, HomeError> {
    let content = ssh_keys::authorized_keys_content(keys);
    let current = read_small_regular_file(ssh_fd, path, MAX_KEYS_FILE_READ)?;
    let hand_made = current
        .as_ref()
        .is_some_and(|(bytes, _)| !ssh_keys::is_managed(bytes, keys));
    if content.is_empty() {
        if hand_made {
            return Ok(KeysOutcome::HandMade);
        }
        // No keys: no file, rather than an empty one, so "no keys" has one representation.
        if current.is_some() {
            match unlinkat(ssh_fd, AUTHORIZED_KEYS, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(errno) => return Err(HomeError::io(path, "remove", errno)),
            }
            fsync(ssh_fd).map_err(|e| HomeError::io(path, "fsync directory of", e))?;
            changes.push(HomeChange::RemovedAuthorizedKeys {
                path: path.to_owned(),
            });
        }
        return Ok(KeysOutcome::Applied { keys: 0 });
    }
    if hand_made {
        return Err(HomeError::HandMadeKeys {
            path: path.to_owned(),
        });
    }
    let up_to_date = current.is_some_and(|(bytes, stat)| {
        bytes == content
            && stat.st_uid == uid
            && stat.st_gid == uid
            && stat.st_mode & 0o7777 == AUTHORIZED_KEYS_MODE
            // A second link could be a hard link the customer made to some other file; a fresh
            // file makes sure the agent's writes only ever reach a file it created.
            && link_count(&stat) == 1
    });
    if !up_to_date {
        write_atomically(ssh_fd, path, &content, uid)?;
        changes.push(HomeChange::WroteAuthorizedKeys {
            path: path.to_owned(),
            keys: keys.len(),
        });
    }
    Ok(KeysOutcome::Applied { keys: keys.len() })
}

/// Enough of an existing `authorized_keys` to compare it with the largest file the agent writes
/// (64 keys of 8 KiB and the header) and to see the header of any other.
const MAX_KEYS_FILE_READ: usize = 64 * 8 * 1024 + 1024;

/// Reads `authorized_keys` if it is a regular file, at most `limit + 1` bytes (enough to tell
/// whether it differs from anything of `limit` bytes). A symlink or anything else is refused.
fn read_small_regular_file(
    dir: BorrowedFd<'_>,
    path: &Path,
    limit: usize,
) -> Result<Option<(Vec<u8>, Stat)>, HomeError> {
    // NONBLOCK: a FIFO planted by the customer must not hang the agent.
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    let fd = match openat(dir, AUTHORIZED_KEYS, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(Errno::LOOP) => {
            return Err(classify(
                dir,
                OsStr::new(AUTHORIZED_KEYS),
                path,
                Expect::File,
            ));
        }
        Err(errno) => return Err(HomeError::io(path, "open", errno)),
    };
    let stat = fstat(&fd).map_err(|e| HomeError::io(path, "stat", e))?;
    let kind = FileType::from_raw_mode(stat.st_mode);
    if kind != FileType::RegularFile {
        return Err(HomeError::NotARegularFile {
            path: path.to_owned(),
            found: kind_name(kind),
        });
    }
    let mut bytes = Vec::new();
    File::from(fd)
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| HomeError::std_io(path, "read", e))?;
    Ok(Some((bytes, stat)))
}

/// Writes `content` to `authorized_keys` so that sshd sees either the old file or the whole new
/// one: a fresh temp file in the same directory, owned and moded before any byte is written,
/// fsynced, then renamed over the old name (a rename replaces a symlink rather than following
/// it, should one appear after the check).
fn write_atomically(
    ssh_fd: BorrowedFd<'_>,
    path: &Path,
    content: &[u8],
    uid: u32,
) -> Result<(), HomeError> {
    let tmp_path = path.with_file_name(AUTHORIZED_KEYS_TMP);
    match unlinkat(ssh_fd, AUTHORIZED_KEYS_TMP, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => {}
        Err(errno) => return Err(HomeError::io(&tmp_path, "remove stale", errno)),
    }
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mode = Mode::from_raw_mode(AUTHORIZED_KEYS_MODE);
    let fd = openat(ssh_fd, AUTHORIZED_KEYS_TMP, flags, mode)
        .map_err(|e| HomeError::io(&tmp_path, "create", e))?;
    let written = (|| {
        fchown(&fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(uid)))
            .map_err(|e| HomeError::io(&tmp_path, "chown", e))?;
        // Explicit, because the process umask applied to the mode given at creation.
        fchmod(&fd, mode).map_err(|e| HomeError::io(&tmp_path, "chmod", e))?;
        let mut file = File::from(fd);
        file.write_all(content)
            .map_err(|e| HomeError::std_io(&tmp_path, "write", e))?;
        file.sync_all()
            .map_err(|e| HomeError::std_io(&tmp_path, "fsync", e))?;
        renameat(ssh_fd, AUTHORIZED_KEYS_TMP, ssh_fd, AUTHORIZED_KEYS)
            .map_err(|e| HomeError::io(path, "rename into place", e))
    })();
    if written.is_err() {
        let _ = unlinkat(ssh_fd, AUTHORIZED_KEYS_TMP, AtFlags::empty());
        return written;
    }
    fsync(ssh_fd).map_err(|e| HomeError::io(path, "fsync directory of", e))
}

/// Opens (or creates) the directory `path`, a direct child of `parent`, without following a
/// symlink, and gives it `mode` and `owner` through its descriptor.
fn ensure_dir(
    parent: BorrowedFd<'_>,
    path: &Path,
    mode: u32,
    owner: Option<(u32, u32)>,
    changes: &mut Vec<HomeChange>,
) -> Result<OwnedFd, HomeError> {
    let (fd, created) = match open_dir(parent, path)? {
        Some(fd) => (fd, false),
        None => {
            match mkdirat(parent, file_name(path), Mode::from_raw_mode(mode)) {
                // EEXIST: someone created it since the open; the open below checks what it is.
                Ok(()) | Err(Errno::EXIST) => {}
                Err(errno) => return Err(HomeError::io(path, "create directory", errno)),
            }
            let fd = open_dir(parent, path)?.ok_or_else(|| HomeError::NotFound {
                path: path.to_owned(),
            })?;
            changes.push(HomeChange::CreatedDir {
                path: path.to_owned(),
            });
            (fd, true)
        }
    };
    let stat = fstat(&fd).map_err(|e| HomeError::io(path, "stat", e))?;
    if let Some((uid, gid)) = owner
        && (stat.st_uid != uid || stat.st_gid != gid)
    {
        fchown(&fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .map_err(|e| HomeError::io(path, "chown", e))?;
        if !created {
            changes.push(HomeChange::FixedOwner {
                path: path.to_owned(),
                from_uid: stat.st_uid,
                from_gid: stat.st_gid,
            });
        }
    }
    // A created directory lands here too: mkdir applied the process umask to `mode`.
    let current_mode = stat.st_mode & 0o7777;
    if current_mode != mode {
        fchmod(&fd, Mode::from_raw_mode(mode)).map_err(|e| HomeError::io(path, "chmod", e))?;
        if !created {
            changes.push(HomeChange::FixedMode {
                path: path.to_owned(),
                from_mode: current_mode,
            });
        }
    }
    Ok(fd)
}

/// Makes the directory `path` (a direct child of `parent`) owned by `uid`, with `mode`, when
/// nothing of that name is there; returns whether it did. Whatever is there already — a
/// directory the customer changed, a file, a symlink — is left alone and never followed: the
/// name is the customer's from now on.
fn create_if_missing(
    parent: BorrowedFd<'_>,
    path: &Path,
    uid: u32,
    mode: u32,
    changes: &mut Vec<HomeChange>,
) -> Result<bool, HomeError> {
    match mkdirat(parent, file_name(path), Mode::from_raw_mode(mode)) {
        Ok(()) => {}
        Err(Errno::EXIST) => return Ok(false),
        Err(errno) => return Err(HomeError::io(path, "create directory", errno)),
    }
    // Through a descriptor opened without following links: the customer may have swapped the
    // name since the mkdir.
    let fd = open_dir(parent, path)?.ok_or_else(|| HomeError::NotFound {
        path: path.to_owned(),
    })?;
    fchown(&fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(uid)))
        .map_err(|e| HomeError::io(path, "chown", e))?;
    fchmod(&fd, Mode::from_raw_mode(mode)).map_err(|e| HomeError::io(path, "chmod", e))?;
    changes.push(HomeChange::CreatedDir {
        path: path.to_owned(),
    });
    Ok(true)
}

#[derive(Clone, Copy)]
enum Expect {
    Dir,
    File,
}

/// Opens the existing directory `path`, a direct child of `parent`. `None` when nothing is
/// there; an error naming the path when something other than a directory is.
fn open_dir(parent: BorrowedFd<'_>, path: &Path) -> Result<Option<OwnedFd>, HomeError> {
    let name = file_name(path);
    match openat(parent, name, DIR_OPEN, Mode::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::NOENT) => Ok(None),
        Err(Errno::LOOP | Errno::NOTDIR) => Err(classify(parent, name, path, Expect::Dir)),
        Err(errno) => Err(HomeError::io(path, "open", errno)),
    }
}

/// Says what is at `name` after an open refused it.
fn classify(parent: BorrowedFd<'_>, name: &OsStr, path: &Path, expect: Expect) -> HomeError {
    let stat = match statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(errno) => return HomeError::io(path, "stat", errno),
    };
    let kind = FileType::from_raw_mode(stat.st_mode);
    let path = path.to_owned();
    match (kind, expect) {
        (FileType::Symlink, _) => HomeError::Symlink { path },
        (_, Expect::Dir) => HomeError::NotADirectory {
            path,
            found: kind_name(kind),
        },
        (_, Expect::File) => HomeError::NotARegularFile {
            path,
            found: kind_name(kind),
        },
    }
}

/// `renameat2(RENAME_NOREPLACE)`, falling back to a check and a plain rename on file systems
/// without it (the fallback's window only matters against root, who alone writes homeRoot).
fn rename_no_replace(
    from_dir: BorrowedFd<'_>,
    from: &OsStr,
    to_dir: BorrowedFd<'_>,
    to: &OsStr,
) -> Result<(), Errno> {
    match renameat_with(from_dir, from, to_dir, to, RenameFlags::NOREPLACE) {
        Err(Errno::INVAL | Errno::NOSYS) => match statat(to_dir, to, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Err(Errno::EXIST),
            Err(Errno::NOENT) => renameat(from_dir, from, to_dir, to),
            Err(errno) => Err(errno),
        },
        other => other,
    }
}

/// Removes the home `home_fd` (named `home` in `root`) and everything in it, unlinking symlinks
/// rather than following them and refusing to cross into another file system.
fn remove_tree(root: BorrowedFd<'_>, home_fd: OwnedFd, home: &Path) -> Result<(), HomeError> {
    let device = fstat(&home_fd)
        .map_err(|e| HomeError::io(home, "stat", e))?
        .st_dev;
    let mut deleter = Deleter {
        home_fd: home_fd.as_fd(),
        device,
        flattened: 0,
    };
    let mut passes = 0;
    loop {
        if !deleter.remove_contents(home_fd.as_fd(), home, 0)? {
            break;
        }
        passes += 1;
        if passes >= MAX_DELETE_PASSES {
            return Err(HomeError::NotEmpty {
                path: home.to_owned(),
                passes,
            });
        }
    }
    drop(home_fd);
    match unlinkat(root, file_name(home), AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(Errno::NOTEMPTY) => Err(HomeError::NotEmpty {
            path: home.to_owned(),
            passes,
        }),
        Err(errno) => Err(HomeError::io(home, "remove directory", errno)),
    }
}

struct Deleter<'a> {
    home_fd: BorrowedFd<'a>,
    device: u64,
    flattened: u64,
}

impl Deleter<'_> {
    /// Removes what `dir` holds. Returns true when something was found in it (so another pass
    /// must check that it is now empty: subtrees may have been moved up to the home).
    fn remove_contents(
        &mut self,
        dir: BorrowedFd<'_>,
        path: &Path,
        depth: usize,
    ) -> Result<bool, HomeError> {
        // Names first, then removal: unlinking while reading a directory may skip entries.
        let names = list_names(dir, path)?;
        for name in &names {
            let child = path.join(name);
            let stat = match statat(dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => stat,
                Err(Errno::NOENT) => continue,
                Err(errno) => return Err(HomeError::io(&child, "stat", errno)),
            };
            if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
                match unlinkat(dir, name.as_os_str(), AtFlags::empty()) {
                    Ok(()) | Err(Errno::NOENT) => {}
                    Err(errno) => return Err(HomeError::io(&child, "remove", errno)),
                }
                continue;
            }
            if stat.st_dev != self.device {
                return Err(HomeError::MountPoint { path: child });
            }
            if depth + 1 >= MAX_DELETE_DEPTH {
                self.move_to_top(dir, name, &child)?;
                continue;
            }
            let child_fd = match open_dir(dir, &child) {
                Ok(Some(fd)) => fd,
                Ok(None) => continue,
                // Swapped for a link or a file since the stat: the next pass unlinks it.
                Err(HomeError::Symlink { .. } | HomeError::NotADirectory { .. }) => continue,
                Err(error) => return Err(error),
            };
            let child_device = fstat(&child_fd)
                .map_err(|e| HomeError::io(&child, "stat", e))?
                .st_dev;
            if child_device != self.device {
                return Err(HomeError::MountPoint { path: child });
            }
            self.remove_contents(child_fd.as_fd(), &child, depth + 1)?;
            drop(child_fd);
            match unlinkat(dir, name.as_os_str(), AtFlags::REMOVEDIR) {
                // NOTEMPTY: subtrees were moved up, or it was refilled; the next pass sees it.
                Ok(()) | Err(Errno::NOENT | Errno::NOTEMPTY) => {}
                Err(errno) => return Err(HomeError::io(&child, "remove directory", errno)),
            }
        }
        Ok(!names.is_empty())
    }

    fn move_to_top(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
    ) -> Result<(), HomeError> {
        loop {
            let target = format!("{DELETE_FLATTEN_PREFIX}{}", self.flattened);
            self.flattened += 1;
            match rename_no_replace(dir, name, self.home_fd, OsStr::new(&target)) {
                Ok(()) | Err(Errno::NOENT) => return Ok(()),
                Err(Errno::EXIST | Errno::NOTEMPTY) => continue,
                Err(errno) => return Err(HomeError::io(path, "move up for removal", errno)),
            }
        }
    }
}

fn list_names(dir: BorrowedFd<'_>, path: &Path) -> Result<Vec<OsString>, HomeError> {
    let mut reader = Dir::read_from(dir).map_err(|e| HomeError::io(path, "read directory", e))?;
    let mut names = Vec::new();
    for entry in &mut reader {
        let entry = entry.map_err(|e| HomeError::io(path, "read directory", e))?;
        let name = entry.file_name().to_bytes();
        if !is_dot_entry(name) {
            names.push(OsStr::from_bytes(name).to_owned());
        }
    }
    Ok(names)
}

fn is_dot_entry(name: &[u8]) -> bool {
    name == b"." || name == b".."
}

/// The last component of a path built by `uwsgi_it_domain::paths` (never empty or `..`).
fn file_name(path: &Path) -> &OsStr {
    path.file_name().unwrap_or(path.as_os_str())
}

fn kind_name(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "regular file",
        FileType::Directory => "directory",
        FileType::Symlink => "symbolic link",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Unknown => "file of unknown type",
    }
}

// The widths of `struct stat` fields differ between architectures (i64 on x86_64, u64 on
// aarch64), so the conversions are written once here.
#[allow(clippy::unnecessary_cast, clippy::cast_sign_loss)]
fn allocated_bytes(stat: &Stat) -> u64 {
    (stat.st_blocks as u64).saturating_mul(512)
}

#[allow(clippy::unnecessary_cast, clippy::cast_sign_loss)]
fn apparent_bytes(stat: &Stat) -> u64 {
    stat.st_size.max(0) as u64
}

#[allow(clippy::unnecessary_cast)]
fn link_count(stat: &Stat) -> u64 {
    stat.st_nlink as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn threshold_is_a_percentage_of_mebibytes() {
        assert!(!threshold_crossed(0, 100, 90));
        assert!(!threshold_crossed(90 * MIB - 1, 100, 90));
        assert!(threshold_crossed(90 * MIB, 100, 90));
        assert!(threshold_crossed(200 * MIB, 100, 90));
        // 1 MB is a MiB, not 10^6 bytes.
        assert!(!threshold_crossed(1_000_000, 1, 100));
        assert!(threshold_crossed(MIB, 1, 100));
        assert!(!threshold_crossed(MIB - 1, 1, 100));
    }

    #[test]
    fn threshold_edges() {
        assert!(threshold_crossed(0, 100, 0), "0% is always reached");
        assert!(!threshold_crossed(100 * MIB, 100, 101));
        assert!(threshold_crossed(101 * MIB, 100, 101));
        // No overflow for huge reservations or usage.
        assert!(!threshold_crossed(u64::MAX, u64::MAX, 100));
        assert!(threshold_crossed(u64::MAX, 1, 100));
    }

    #[test]
    fn new_refuses_bad_roots() {
        assert!(Homes::new(PathBuf::from("relative")).is_err());
        assert!(Homes::new(PathBuf::from("/a/../b")).is_err());
        assert!(Homes::new(PathBuf::from("/")).is_err());
        assert!(Homes::new(PathBuf::from("/containers")).is_ok());
    }
}
