//! The home manager on real temporary directories. Needs root (it chowns to container uids).
//!
//! Every test has its own temporary directory holding `homes/` (the homeRoot) and `outside/`
//! (what an attacker would like the agent to touch through a planted symlink), so the tests run
//! in parallel.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use tempfile::TempDir;
use uwsgi_it_agent::homes::{
    ArchiveOutcome, HomeChange, HomeError, HomeSpec, Homes, KeysOutcome, Retention, UsageLimits,
};
use uwsgi_it_domain::ssh_keys::{KeyLineProblem, MANAGED_HEADER, SshKeyError};
use uwsgi_it_testbed::ssh_keys;

const UID: u32 = 30001;
const MIB: u64 = 1024 * 1024;
const KEY_A: &str = ssh_keys::ALICE;
const KEY_B: &str = ssh_keys::BOB;

struct Fixture {
    _tmp: TempDir,
    root: PathBuf,
    outside: PathBuf,
    homes: Homes,
}

impl Fixture {
    fn new() -> Self {
        assert!(
            running_as_root(),
            "these tests chown to container uids and must run as root"
        );
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("homes");
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let homes = Homes::new(root.clone()).unwrap();
        Fixture {
            _tmp: tmp,
            root,
            outside,
            homes,
        }
    }

    fn home(&self) -> PathBuf {
        self.root.join(UID.to_string())
    }

    /// A directory outside homeRoot, owned by root, mode 0750, holding `secret` = "secret".
    fn outside_dir(&self) -> PathBuf {
        let dir = self.outside.join("dir");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
        fs::write(dir.join("secret"), "secret").unwrap();
        dir
    }

    fn outside_file(&self) -> PathBuf {
        let file = self.outside.join("file");
        fs::write(&file, "outside content\n").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        file
    }
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn spec(storage_container: bool, keys: &[&str]) -> HomeSpec {
    HomeSpec {
        uid: UID,
        storage_container,
        ssh_keys: keys.iter().map(|k| (*k).to_owned()).collect(),
    }
}

/// (uid, gid, permission bits) of `path`, not following a symlink.
fn owner_mode(path: &Path) -> (u32, u32, u32) {
    let meta = fs::symlink_metadata(path).unwrap();
    (meta.uid(), meta.gid(), meta.mode() & 0o7777)
}

/// Everything an attacker could have changed about a directory tree outside homeRoot.
fn snapshot(path: &Path) -> Vec<(PathBuf, u32, u32, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![path.to_owned()];
    while let Some(p) = stack.pop() {
        let meta = fs::symlink_metadata(&p).unwrap();
        let content = if meta.is_file() {
            fs::read(&p).unwrap()
        } else {
            Vec::new()
        };
        out.push((p.clone(), meta.uid(), meta.gid(), meta.mode(), content));
        if meta.is_dir() {
            let mut children: Vec<_> = fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            children.sort();
            stack.extend(children);
        }
    }
    out.sort();
    out
}

fn assert_symlink_error(error: HomeError, path: &Path) {
    let message = error.to_string();
    match &error {
        HomeError::Symlink { path: reported } => assert_eq!(reported, path, "{message}"),
        other => panic!("expected a symlink refusal for {path:?}, got {other:?}"),
    }
    assert!(
        message.contains(&path.display().to_string()) && message.contains("symbolic link"),
        "{message}"
    );
}

// ---------------------------------------------------------------------------------------------
// ensure

#[test]
fn creates_the_home_owned_by_the_uid_private_and_idempotently() {
    let f = Fixture::new();
    let report = f.homes.ensure(&spec(false, &[])).unwrap();
    assert_eq!(report.home, f.home());
    assert!(report.changes.contains(&HomeChange::CreatedDir {
        path: f.root.clone()
    }));
    assert!(
        report
            .changes
            .contains(&HomeChange::CreatedDir { path: f.home() })
    );
    assert!(!report.unchanged());
    assert_eq!(report.unexpected_distros, None);

    assert_eq!(owner_mode(&f.root), (0, 0, 0o711));
    assert_eq!(owner_mode(&f.home()), (UID, UID, 0o700));
    assert_eq!(owner_mode(&f.home().join(".ssh")), (UID, UID, 0o700));
    assert!(!f.home().join("distros").exists());
    assert!(!f.home().join(".ssh/authorized_keys").exists());

    let again = f.homes.ensure(&spec(false, &[])).unwrap();
    assert!(again.unchanged(), "{:?}", again.changes);
    assert_eq!(owner_mode(&f.home()), (UID, UID, 0o700));
}

#[test]
fn the_home_gets_the_uwsgi_it_layout_once_and_the_customer_keeps_it() {
    let f = Fixture::new();
    f.homes.ensure(&spec(false, &[])).unwrap();
    for name in ["vassals", "logs", "run", "tmp", "etc"] {
        assert_eq!(
            owner_mode(&f.home().join(name)),
            (UID, UID, 0o755),
            "{name}"
        );
    }
    // The customer's from now on: a changed mode stays, a removed directory is made again, a
    // name turned into a symlink is neither followed nor replaced.
    fs::set_permissions(f.home().join("logs"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::remove_dir(f.home().join("tmp")).unwrap();
    fs::remove_dir(f.home().join("etc")).unwrap();
    let elsewhere = f.outside.join("not-the-customers");
    fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, f.home().join("etc")).unwrap();
    let report = f.homes.ensure(&spec(false, &[])).unwrap();
    assert_eq!(
        report.changes,
        [HomeChange::CreatedDir {
            path: f.home().join("tmp")
        }]
    );
    assert_eq!(owner_mode(&f.home().join("logs")), (UID, UID, 0o700));
    assert!(
        fs::symlink_metadata(f.home().join("etc"))
            .unwrap()
            .is_symlink()
    );
    assert_eq!(
        fs::metadata("/").unwrap().uid(),
        0,
        "the symlink target was not chowned"
    );
}

#[test]
fn an_existing_home_root_keeps_its_mode() {
    let f = Fixture::new();
    fs::create_dir(&f.root).unwrap();
    fs::set_permissions(&f.root, fs::Permissions::from_mode(0o755)).unwrap();
    let report = f.homes.ensure(&spec(false, &[])).unwrap();
    assert!(!report.changes.contains(&HomeChange::CreatedDir {
        path: f.root.clone()
    }));
    assert_eq!(owner_mode(&f.root), (0, 0, 0o755));
}

#[test]
fn repairs_owner_and_mode_and_says_so() {
    let f = Fixture::new();
    f.homes.ensure(&spec(false, &[])).unwrap();
    std::os::unix::fs::chown(f.home(), Some(0), Some(0)).unwrap();
    fs::set_permissions(f.home(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(f.home().join(".ssh"), fs::Permissions::from_mode(0o777)).unwrap();

    let report = f.homes.ensure(&spec(false, &[])).unwrap();
    assert!(report.changes.contains(&HomeChange::FixedOwner {
        path: f.home(),
        from_uid: 0,
        from_gid: 0
    }));
    assert!(report.changes.contains(&HomeChange::FixedMode {
        path: f.home(),
        from_mode: 0o755
    }));
    assert!(report.changes.contains(&HomeChange::FixedMode {
        path: f.home().join(".ssh"),
        from_mode: 0o777
    }));
    assert_eq!(owner_mode(&f.home()), (UID, UID, 0o700));
    assert_eq!(owner_mode(&f.home().join(".ssh")), (UID, UID, 0o700));
    assert!(f.homes.ensure(&spec(false, &[])).unwrap().unchanged());
}

#[test]
fn distros_only_for_storage_containers() {
    let f = Fixture::new();
    f.homes.ensure(&spec(false, &[])).unwrap();
    assert!(!f.home().join("distros").exists());

    let report = f.homes.ensure(&spec(true, &[])).unwrap();
    let trees = f.root.join(".distros");
    let mine = trees.join(UID.to_string());
    assert_eq!(
        report.changes,
        [
            HomeChange::CreatedDir {
                path: trees.clone()
            },
            HomeChange::CreatedDir { path: mine.clone() },
            HomeChange::CreatedDir {
                path: f.home().join("distros")
            }
        ]
    );
    // The trees' parents are root's, so no component of a distro's path is the customer's but
    // the tree itself; the home's distros/ is only the mount point of <homeRoot>/.distros/<uid>.
    assert_eq!(owner_mode(&trees), (0, 0, 0o711));
    assert_eq!(owner_mode(&mine), (0, 0, 0o755));
    assert_eq!(owner_mode(&f.home().join("distros")), (UID, UID, 0o755));
    assert!(f.homes.ensure(&spec(true, &[])).unwrap().unchanged());

    // Turned off: left alone (it may hold customer data) but reported.
    fs::write(f.home().join("distros/keep"), "x").unwrap();
    let report = f.homes.ensure(&spec(false, &[])).unwrap();
    assert!(report.unchanged());
    assert_eq!(report.unexpected_distros, Some(f.home().join("distros")));
    assert_eq!(fs::read(f.home().join("distros/keep")).unwrap(), b"x");
}

#[test]
fn keys_are_written_rewritten_on_change_and_removed_when_empty() {
    let f = Fixture::new();
    let keys = f.home().join(".ssh/authorized_keys");

    let report = f.homes.ensure(&spec(false, &[KEY_A])).unwrap();
    assert!(report.changes.contains(&HomeChange::WroteAuthorizedKeys {
        path: keys.clone(),
        keys: 1
    }));
    assert_eq!(report.keys.unwrap(), KeysOutcome::Applied { keys: 1 });
    assert_eq!(
        fs::read_to_string(&keys).unwrap(),
        format!("{MANAGED_HEADER}\n{KEY_A}\n")
    );
    assert_eq!(owner_mode(&keys), (UID, UID, 0o600));
    assert!(f.homes.ensure(&spec(false, &[KEY_A])).unwrap().unchanged());

    let report = f.homes.ensure(&spec(false, &[KEY_A, KEY_B])).unwrap();
    assert_eq!(
        report.changes,
        [HomeChange::WroteAuthorizedKeys {
            path: keys.clone(),
            keys: 2
        }]
    );
    assert_eq!(
        fs::read_to_string(&keys).unwrap(),
        format!("{MANAGED_HEADER}\n{KEY_A}\n{KEY_B}\n")
    );
    assert_eq!(owner_mode(&keys), (UID, UID, 0o600));
    // No temp file left behind.
    let names: Vec<_> = fs::read_dir(f.home().join(".ssh"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["authorized_keys"]);

    let report = f.homes.ensure(&spec(false, &[])).unwrap();
    assert_eq!(
        report.changes,
        [HomeChange::RemovedAuthorizedKeys { path: keys.clone() }]
    );
    assert!(!keys.exists());
    assert!(f.homes.ensure(&spec(false, &[])).unwrap().unchanged());
}

#[test]
fn a_tampered_keys_file_is_replaced_not_modified() {
    let f = Fixture::new();
    let keys = f.home().join(".ssh/authorized_keys");
    f.homes.ensure(&spec(false, &[KEY_A])).unwrap();

    // Right content, wrong mode: sshd would refuse it.
    fs::set_permissions(&keys, fs::Permissions::from_mode(0o666)).unwrap();
    assert!(!f.homes.ensure(&spec(false, &[KEY_A])).unwrap().unchanged());
    assert_eq!(owner_mode(&keys), (UID, UID, 0o600));

    // A hard link to a file outside that looks like the agent's own: the agent must write a new
    // file, never into the linked one. (One without the header is not touched at all: see
    // a_hand_made_keys_file_is_never_replaced_or_removed.)
    let outside = f.outside_file();
    fs::write(&outside, format!("{MANAGED_HEADER}\n{KEY_B}\n")).unwrap();
    let before = snapshot(&f.outside);
    fs::remove_file(&keys).unwrap();
    fs::hard_link(&outside, &keys).unwrap();
    f.homes
        .ensure(&spec(false, &[KEY_A]))
        .unwrap()
        .keys
        .unwrap();
    assert_eq!(snapshot(&f.outside), before);
    assert_eq!(
        fs::read_to_string(&keys).unwrap(),
        format!("{MANAGED_HEADER}\n{KEY_A}\n")
    );
    assert_eq!(owner_mode(&keys), (UID, UID, 0o600));
    assert_eq!(fs::metadata(&keys).unwrap().nlink(), 1);
}

#[test]
fn a_bad_key_changes_no_key_but_the_home_is_still_made() {
    let f = Fixture::new();
    f.homes.ensure(&spec(false, &[KEY_A])).unwrap();
    let keys = f.home().join(".ssh/authorized_keys");
    let before = fs::read(&keys).unwrap();
    for (bad, problem) in [
        (
            format!("{KEY_B}\ncommand=\"sh\" {KEY_B}"),
            KeyLineProblem::ControlCharacter,
        ),
        (
            format!("command=\"sh\" {KEY_B}"),
            KeyLineProblem::UnknownType {
                found: "command=\"sh\"".into(),
            },
        ),
    ] {
        let report = f.homes.ensure(&spec(false, &[KEY_B, &bad])).unwrap();
        let error = report.keys.unwrap_err();
        assert!(
            matches!(&error, HomeError::InvalidSshKey(e) if *e == SshKeyError { index: 1, problem: problem.clone() }),
            "{error:?}"
        );
        assert!(error.to_string().starts_with("sshKeys[1]: "), "{error}");
        assert_eq!(fs::read(&keys).unwrap(), before, "no key changed");
    }

    // A new home with a bad key: the home and its layout exist, the keys do not.
    let other = Fixture::new();
    let report = other.homes.ensure(&spec(false, &["ssh-rsa AAAA"])).unwrap();
    assert!(report.keys.is_err());
    assert!(other.home().join("vassals").is_dir());
    assert!(!other.home().join(".ssh").exists());
}

#[test]
fn a_hand_made_keys_file_is_never_replaced_or_removed() {
    let f = Fixture::new();
    f.homes.ensure(&spec(false, &[])).unwrap();
    let ssh = f.home().join(".ssh");
    fs::create_dir_all(&ssh).unwrap();
    let keys = ssh.join("authorized_keys");
    let own = format!("{KEY_B}\n# my own\n");
    fs::write(&keys, &own).unwrap();

    // No sshKeys: the customer's file stays.
    let report = f.homes.ensure(&spec(false, &[])).unwrap();
    assert_eq!(report.keys.unwrap(), KeysOutcome::HandMade);
    assert_eq!(fs::read_to_string(&keys).unwrap(), own);

    // sshKeys set: refused, named, and the file stays.
    let report = f.homes.ensure(&spec(false, &[KEY_A])).unwrap();
    let error = report.keys.unwrap_err();
    assert!(
        matches!(&error, HomeError::HandMadeKeys { path } if *path == keys),
        "{error:?}"
    );
    assert!(error.to_string().contains("remove it"), "{error}");
    assert_eq!(fs::read_to_string(&keys).unwrap(), own);

    // Removed by the customer: sshKeys now manage it.
    fs::remove_file(&keys).unwrap();
    let report = f.homes.ensure(&spec(false, &[KEY_A])).unwrap();
    assert_eq!(report.keys.unwrap(), KeysOutcome::Applied { keys: 1 });

    // What an earlier agent wrote (the same lines, no header) is recognised as its own and
    // gets the header, so later changes apply.
    fs::write(&keys, format!("{KEY_A}\n")).unwrap();
    let report = f.homes.ensure(&spec(false, &[KEY_A])).unwrap();
    assert_eq!(report.keys.unwrap(), KeysOutcome::Applied { keys: 1 });
    assert!(
        fs::read_to_string(&keys)
            .unwrap()
            .starts_with(MANAGED_HEADER)
    );
    let report = f.homes.ensure(&spec(false, &[KEY_A, KEY_B])).unwrap();
    assert_eq!(report.keys.unwrap(), KeysOutcome::Applied { keys: 2 });
    let report = f.homes.ensure(&spec(false, &[])).unwrap();
    assert_eq!(report.keys.unwrap(), KeysOutcome::Applied { keys: 0 });
    assert!(!keys.exists());
}

#[test]
fn uids_below_the_container_range_are_refused() {
    let f = Fixture::new();
    let error = f
        .homes
        .ensure(&HomeSpec {
            uid: 0,
            ..HomeSpec::default()
        })
        .unwrap_err();
    assert!(matches!(error, HomeError::Path(_)), "{error:?}");
    assert!(!f.root.exists());
    assert!(f.homes.usage(1000).is_err());
    assert!(f.homes.archive(1000, Retention::Delete, 1).is_err());
}

// ---------------------------------------------------------------------------------------------
// symlinks and other planted things

#[test]
fn a_symlinked_home_is_refused_and_the_target_untouched() {
    let f = Fixture::new();
    let target = f.outside_dir();
    fs::create_dir(&f.root).unwrap();
    symlink(&target, f.home()).unwrap();
    let before = snapshot(&f.outside);

    let error = f.homes.ensure(&spec(true, &[KEY_A])).unwrap_err();
    assert_symlink_error(error, &f.home());
    assert_eq!(snapshot(&f.outside), before);
    assert_eq!(owner_mode(&target), (0, 0, 0o750));

    // Nor may archiving or deleting go through it.
    for retention in [Retention::Archive, Retention::Delete, Retention::Retain] {
        let error = f.homes.archive(UID, retention, 1).unwrap_err();
        assert_symlink_error(error, &f.home());
    }
    assert!(f.homes.usage(UID).is_err());
    assert_eq!(snapshot(&f.outside), before);
    assert!(
        fs::symlink_metadata(f.home())
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn a_symlinked_ssh_dir_is_refused_and_the_target_untouched() {
    let f = Fixture::new();
    f.homes.ensure(&spec(false, &[])).unwrap();
    let target = f.outside_dir();
    let ssh = f.home().join(".ssh");
    fs::remove_dir(&ssh).unwrap();
    symlink(&target, &ssh).unwrap();
    let before = snapshot(&f.outside);

    let error = f
        .homes
        .ensure(&spec(false, &[KEY_A]))
        .unwrap()
        .keys
        .unwrap_err();
    assert_symlink_error(error, &ssh);
    assert_eq!(snapshot(&f.outside), before);
    assert!(!target.join("authorized_keys").exists());
    assert_eq!(owner_mode(&target), (0, 0, 0o750));
}

#[test]
fn a_symlinked_keys_file_is_refused_and_the_target_untouched() {
    let f = Fixture::new();
    f.homes.ensure(&spec(false, &[KEY_A])).unwrap();
    let target = f.outside_file();
    let keys = f.home().join(".ssh/authorized_keys");
    fs::remove_file(&keys).unwrap();
    symlink(&target, &keys).unwrap();
    let before = snapshot(&f.outside);

    for key_list in [&[KEY_B][..], &[]] {
        let error = f
            .homes
            .ensure(&spec(false, key_list))
            .unwrap()
            .keys
            .unwrap_err();
        assert_symlink_error(error, &keys);
        assert_eq!(snapshot(&f.outside), before);
        assert_eq!(fs::read_to_string(&target).unwrap(), "outside content\n");
        assert_eq!(owner_mode(&target), (0, 0, 0o640));
    }
}

#[test]
fn a_symlinked_distros_mount_point_is_left_alone_and_never_followed() {
    let f = Fixture::new();
    f.homes.ensure(&spec(false, &[])).unwrap();
    let target = f.outside_dir();
    let distros = f.home().join("distros");
    symlink(&target, &distros).unwrap();
    let before = snapshot(&f.outside);

    // The name is the customer's: a symlink there only changes its own Pod's view.
    f.homes.ensure(&spec(true, &[])).unwrap();
    assert!(
        fs::symlink_metadata(&distros)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(snapshot(&f.outside), before);
    assert_eq!(
        owner_mode(&f.root.join(".distros").join(UID.to_string())),
        (0, 0, 0o755)
    );
}

#[test]
fn a_symlinked_home_root_is_refused() {
    let f = Fixture::new();
    let target = f.outside_dir();
    symlink(&target, &f.root).unwrap();
    let before = snapshot(&f.outside);
    let error = f.homes.ensure(&spec(false, &[])).unwrap_err();
    assert_symlink_error(error, &f.root);
    assert_eq!(snapshot(&f.outside), before);
}

#[test]
fn a_file_where_a_directory_belongs_is_refused_with_its_kind() {
    let f = Fixture::new();
    f.homes.ensure(&spec(false, &[])).unwrap();
    let ssh = f.home().join(".ssh");
    fs::remove_dir(&ssh).unwrap();
    fs::write(&ssh, "not a dir").unwrap();
    let error = f
        .homes
        .ensure(&spec(false, &[KEY_A]))
        .unwrap()
        .keys
        .unwrap_err();
    assert!(
        matches!(&error, HomeError::NotADirectory { path, found: "regular file" } if *path == ssh),
        "{error:?}"
    );
    assert!(error.to_string().contains(&ssh.display().to_string()));
}

#[test]
fn a_fifo_as_keys_file_is_refused_without_hanging() {
    let f = Fixture::new();
    f.homes.ensure(&spec(false, &[])).unwrap();
    let keys = f.home().join(".ssh/authorized_keys");
    mkfifo(&keys);
    let error = f
        .homes
        .ensure(&spec(false, &[KEY_A]))
        .unwrap()
        .keys
        .unwrap_err();
    assert!(
        matches!(&error, HomeError::NotARegularFile { path, found: "FIFO" } if *path == keys),
        "{error:?}"
    );
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

// ---------------------------------------------------------------------------------------------
// archive, retain, delete

#[test]
fn archive_moves_the_home_with_its_files() {
    let f = Fixture::new();
    f.homes.ensure(&spec(false, &[KEY_A])).unwrap();
    fs::write(f.home().join("data.txt"), "customer data").unwrap();

    let outcome = f
        .homes
        .archive(UID, Retention::Archive, 1_700_000_000)
        .unwrap();
    let archived = f.root.join(".archive").join(format!("{UID}-1700000000"));
    assert_eq!(
        outcome,
        ArchiveOutcome::Archived {
            to: archived.clone()
        }
    );
    assert!(!f.home().exists());
    assert_eq!(
        fs::read(archived.join("data.txt")).unwrap(),
        b"customer data"
    );
    assert_eq!(
        fs::read_to_string(archived.join(".ssh/authorized_keys")).unwrap(),
        format!("{MANAGED_HEADER}\n{KEY_A}\n")
    );
    assert_eq!(owner_mode(&archived), (UID, UID, 0o700));
    assert_eq!(owner_mode(&f.root.join(".archive")), (0, 0, 0o700));

    // Idempotent.
    assert_eq!(
        f.homes
            .archive(UID, Retention::Archive, 1_700_000_001)
            .unwrap(),
        ArchiveOutcome::AlreadyGone
    );
}

#[test]
fn archive_refuses_to_overwrite_an_earlier_archive() {
    let f = Fixture::new();
    f.homes.ensure(&spec(false, &[])).unwrap();
    f.homes.archive(UID, Retention::Archive, 5).unwrap();
    f.homes.ensure(&spec(false, &[])).unwrap();
    fs::write(f.home().join("second"), "2").unwrap();
    let error = f.homes.archive(UID, Retention::Archive, 5).unwrap_err();
    assert!(
        matches!(error, HomeError::ArchiveExists { .. }),
        "{error:?}"
    );
    assert!(f.home().join("second").exists());
}

#[test]
fn a_symlinked_archive_dir_is_refused() {
    let f = Fixture::new();
    f.homes.ensure(&spec(false, &[])).unwrap();
    let target = f.outside_dir();
    symlink(&target, f.root.join(".archive")).unwrap();
    let before = snapshot(&f.outside);
    let error = f.homes.archive(UID, Retention::Archive, 7).unwrap_err();
    assert_symlink_error(error, &f.root.join(".archive"));
    assert_eq!(snapshot(&f.outside), before);
    assert!(f.home().is_dir());
}

#[test]
fn retain_leaves_the_home_in_place() {
    let f = Fixture::new();
    f.homes.ensure(&spec(false, &[])).unwrap();
    fs::write(f.home().join("data.txt"), "kept").unwrap();
    assert_eq!(
        f.homes.archive(UID, Retention::Retain, 1).unwrap(),
        ArchiveOutcome::Retained { home: f.home() }
    );
    assert_eq!(fs::read(f.home().join("data.txt")).unwrap(), b"kept");
    assert!(!f.root.join(".archive").exists());
}

#[test]
fn delete_removes_the_tree_without_following_symlinks() {
    let f = Fixture::new();
    f.homes.ensure(&spec(true, &[KEY_A])).unwrap();
    let outside_file = f.outside_file();
    let outside_dir = f.outside_dir();
    let before = snapshot(&f.outside);
    fs::create_dir_all(f.home().join("a/b/c")).unwrap();
    fs::write(f.home().join("a/b/c/file"), "x").unwrap();
    symlink(&outside_file, f.home().join("link-to-file")).unwrap();
    symlink(&outside_dir, f.home().join("a/link-to-dir")).unwrap();
    symlink("/", f.home().join("a/b/link-to-root")).unwrap();
    mkfifo(&f.home().join("fifo"));

    assert_eq!(
        f.homes.archive(UID, Retention::Delete, 1).unwrap(),
        ArchiveOutcome::Deleted { home: f.home() }
    );
    assert!(!f.home().exists() && f.root.is_dir());
    assert_eq!(snapshot(&f.outside), before);
    assert!(outside_file.exists());
    assert_eq!(
        f.homes.archive(UID, Retention::Delete, 2).unwrap(),
        ArchiveOutcome::AlreadyGone
    );
}

#[test]
fn delete_copes_with_very_deep_trees() {
    let f = Fixture::new();
    f.homes.ensure(&spec(false, &[])).unwrap();
    // Deeper than the deleter keeps descriptors for, built relative to stay under PATH_MAX.
    let mut dir = fs::File::open(f.home()).unwrap();
    for _ in 0..300 {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&dir);
        let next = PathBuf::from(format!("/proc/self/fd/{fd}/d"));
        fs::create_dir(&next).unwrap();
        dir = fs::File::open(&next).unwrap();
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&dir);
    fs::write(format!("/proc/self/fd/{fd}/leaf"), "deep").unwrap();
    drop(dir);

    assert_eq!(
        f.homes.archive(UID, Retention::Delete, 1).unwrap(),
        ArchiveOutcome::Deleted { home: f.home() }
    );
    assert!(!f.home().exists());
}

// ---------------------------------------------------------------------------------------------
// usage

#[test]
fn usage_counts_allocated_bytes() {
    let f = Fixture::new();
    f.homes.ensure(&spec(false, &[])).unwrap();
    let empty = f.homes.usage(UID).unwrap();
    assert!(!empty.truncated);
    assert_eq!(
        empty.entries, 7,
        "the home, its five layout directories and .ssh"
    );

    let data = vec![0x5a_u8; 3 * MIB as usize];
    fs::write(f.home().join("three-mib"), &data).unwrap();
    // A sparse file takes (almost) no blocks: only allocated space counts.
    fs::File::create(f.home().join("sparse"))
        .unwrap()
        .set_len(100 * MIB)
        .unwrap();
    // A symlink to a big file outside is not followed.
    let big_outside = f.outside.join("big");
    fs::write(&big_outside, vec![1_u8; 2 * MIB as usize]).unwrap();
    symlink(&big_outside, f.home().join("link")).unwrap();
    // A hard link counts once.
    fs::hard_link(f.home().join("three-mib"), f.home().join("three-mib-again")).unwrap();

    let usage = f.homes.usage(UID).unwrap();
    assert!(!usage.truncated);
    assert_eq!(usage.entries, 11);
    let grown = usage.bytes - empty.bytes;
    // Block-size tolerance: file systems round up to their block (and may add metadata blocks).
    assert!(
        (3 * MIB..3 * MIB + 256 * 1024).contains(&grown),
        "3 MiB written, {grown} bytes counted"
    );
    assert!(usage.apparent_bytes >= 103 * MIB);
}

#[test]
fn usage_stops_at_the_entry_budget() {
    let f = Fixture::new();
    f.homes.ensure(&spec(false, &[])).unwrap();
    for i in 0..50 {
        fs::write(f.home().join(format!("f{i}")), "x").unwrap();
    }
    let limits = UsageLimits {
        max_entries: 10,
        ..UsageLimits::default()
    };
    let usage = f.homes.usage_with_limits(UID, limits).unwrap();
    assert!(usage.truncated);
    assert_eq!(usage.entries, 10);
    let full = f.homes.usage(UID).unwrap();
    assert!(!full.truncated);
    assert_eq!(full.entries, 57, "50 files, the home, its layout and .ssh");

    let shallow = UsageLimits {
        max_depth: 1,
        ..UsageLimits::default()
    };
    let usage = f.homes.usage_with_limits(UID, shallow).unwrap();
    assert!(usage.truncated, "entering .ssh needs depth 2");
}

#[test]
fn usage_of_a_missing_home_names_it() {
    let f = Fixture::new();
    let error = f.homes.usage(UID).unwrap_err();
    assert!(
        matches!(&error, HomeError::NotFound { path } if *path == f.home()),
        "{error:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// custom distros

/// A small root filesystem as a customer would make it, owned by `uid`: merged /usr (relative
/// links), /etc/os-release, uWSGI at /opt/unbit/uwsgi/uwsgi reached through an absolute link.
fn fill_tree(tree: &Path, uid: u32) {
    for dir in [
        "usr/bin",
        "usr/lib",
        "etc/alternatives",
        "opt/unbit/uwsgi",
        "var/tmp",
        "proc",
        "tmp",
    ] {
        fs::create_dir_all(tree.join(dir)).unwrap();
    }
    fs::write(tree.join("etc/os-release"), "ID=test\n").unwrap();
    fs::write(tree.join("usr/bin/uwsgi-core"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(
        tree.join("usr/bin/uwsgi-core"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    symlink("/usr/bin/uwsgi-core", tree.join("etc/alternatives/uwsgi")).unwrap();
    symlink(
        "/etc/alternatives/uwsgi",
        tree.join("opt/unbit/uwsgi/uwsgi"),
    )
    .unwrap();
    symlink("usr/bin", tree.join("bin")).unwrap();
    symlink("usr/lib", tree.join("lib")).unwrap();
    std::process::Command::new("chown")
        .args(["-hR", &format!("{uid}:{uid}"), &tree.display().to_string()])
        .status()
        .unwrap();
}

#[test]
fn a_distro_tree_is_made_under_a_root_owned_parent_and_surveyed() {
    let f = Fixture::new();
    f.homes.ensure(&spec(true, &[])).unwrap();
    let survey = f.homes.ensure_distro_tree(UID, "debian").unwrap();
    let tree = f.root.join(".distros").join(UID.to_string()).join("debian");
    assert_eq!(survey.tree, tree);
    assert!(survey.created);
    assert_eq!(owner_mode(&tree), (UID, UID, 0o755));
    assert!(survey.directories.is_empty());
    assert_eq!(survey.emperor, None);

    fill_tree(&tree, UID);
    let survey = f.homes.ensure_distro_tree(UID, "debian").unwrap();
    assert!(!survey.created);
    // proc and tmp are the runtime's and the container's own, never the distro's.
    assert_eq!(
        survey.directories,
        ["bin", "etc", "lib", "opt", "usr", "var"]
    );
    assert_eq!(survey.emperor.as_deref(), Some("/opt/unbit/uwsgi/uwsgi"));
}

#[test]
fn links_out_of_a_distro_tree_are_never_taken() {
    let f = Fixture::new();
    f.homes.ensure(&spec(true, &[])).unwrap();
    let tree = f.homes.ensure_distro_tree(UID, "debian").unwrap().tree;
    fill_tree(&tree, UID);
    let target = f.outside_dir();
    // Top-level links to a host path, to the host's /proc, out of the tree with .., broken.
    symlink(&target, tree.join("srv")).unwrap();
    symlink("/proc", tree.join("media")).unwrap();
    symlink("../../..", tree.join("mnt")).unwrap();
    symlink("nowhere", tree.join("home")).unwrap();
    // uWSGI reached only through a link out of the tree does not count either.
    fs::remove_file(tree.join("opt/unbit/uwsgi/uwsgi")).unwrap();
    fs::write(target.join("uwsgi"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(target.join("uwsgi"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink(target.join("uwsgi"), tree.join("opt/unbit/uwsgi/uwsgi")).unwrap();
    fs::remove_file(tree.join("usr/bin/uwsgi-core")).unwrap();
    let before = snapshot(&f.outside);

    let survey = f.homes.ensure_distro_tree(UID, "debian").unwrap();
    assert_eq!(
        survey.directories,
        ["bin", "etc", "lib", "opt", "usr", "var"]
    );
    for name in ["/srv", "/media", "/mnt", "/home"] {
        assert!(
            survey.skipped.iter().any(|s| s.starts_with(name)),
            "{name}: {:?}",
            survey.skipped
        );
    }
    // RESOLVE_IN_ROOT: the absolute link is resolved inside the tree, where it names nothing.
    assert_eq!(survey.emperor, None);
    assert_eq!(snapshot(&f.outside), before);
}

#[test]
fn a_distro_tree_not_owned_by_the_storage_container_is_refused() {
    let f = Fixture::new();
    f.homes.ensure(&spec(true, &[])).unwrap();
    let tree = f.homes.ensure_distro_tree(UID, "debian").unwrap().tree;
    std::os::unix::fs::chown(&tree, Some(UID + 1), Some(UID + 1)).unwrap();
    let error = f.homes.ensure_distro_tree(UID, "debian").unwrap_err();
    assert!(
        matches!(error, HomeError::NotOwned { found, expected, .. } if found == UID + 1 && expected == UID),
        "{error}"
    );
    assert!(matches!(
        f.homes.ensure_distro_tree(UID, "../etc"),
        Err(HomeError::Path(_))
    ));
}

#[test]
fn a_storage_containers_trees_follow_its_home_into_the_archive_or_away() {
    for retention in [Retention::Archive, Retention::Delete, Retention::Retain] {
        let f = Fixture::new();
        f.homes.ensure(&spec(true, &[])).unwrap();
        let tree = f.homes.ensure_distro_tree(UID, "debian").unwrap().tree;
        fill_tree(&tree, UID);
        f.homes.archive(UID, retention, 1_700_000_000).unwrap();
        let trees = f.root.join(".distros").join(UID.to_string());
        let archived = f.root.join(format!(".archive/{UID}-1700000000.distros"));
        match retention {
            Retention::Archive => {
                assert!(!trees.exists());
                assert!(archived.join("debian/etc/os-release").exists());
            }
            Retention::Delete => assert!(!trees.exists() && !archived.exists()),
            Retention::Retain => assert!(tree.join("etc/os-release").exists()),
        }
    }
}
