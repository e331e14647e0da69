//! Building the host paths the agent touches, from validated numbers and names only.
//!
//! Every function returns a path strictly below `home_root`: the root itself must be absolute and
//! normalised (no `.`/`..` components, no empty components), uids are numbers in the container
//! range, and names are checked against a pattern that cannot express `..` or `/`. The agent
//! still opens these paths without following symlinks; this module guarantees the *names* cannot
//! escape.

use std::path::{Component, Path, PathBuf};

/// The first uid given to a container (uwsgi.it: 30001 and above).
pub const FIRST_CONTAINER_UID: u32 = 30001;
/// Longest custom distro directory name.
pub const MAX_DISTRO_NAME_LEN: usize = 64;
/// Directory, under `home_root`, where deleted homes are moved.
pub const ARCHIVE_DIR: &str = ".archive";
/// Directory, inside a storage container's home, where it sees its custom distros (a mount of
/// its [`storage_distros_dir`], not a directory of the home).
pub const DISTROS_DIR: &str = "distros";
/// Directory, under `home_root`, holding every storage container's custom distro trees. It and
/// each `<uid>` below it are root-owned: a PersistentVolume path below them has no component a
/// customer can replace with a symlink (the kubelet follows symlinks when it bind-mounts a local
/// volume: the CVE-2017-1002101 class).
pub const DISTRO_TREES_DIR: &str = ".distros";

/// Why a path could not be built. Each variant names the offending field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("homeRoot: {home_root:?} must be an absolute path")]
    HomeRootNotAbsolute { home_root: PathBuf },
    #[error("homeRoot: {home_root:?} must be normalised (no \".\", \"..\" or empty components)")]
    HomeRootNotNormalised { home_root: PathBuf },
    #[error("homeRoot: {home_root:?} must not be the file-system root")]
    HomeRootIsFilesystemRoot { home_root: PathBuf },
    #[error("{field}: uid {uid} is below {FIRST_CONTAINER_UID}, the first container uid")]
    UidOutOfRange { field: &'static str, uid: u32 },
    #[error("{field}: must not be empty")]
    NameEmpty { field: &'static str },
    #[error("{field}: {name:?} is longer than {MAX_DISTRO_NAME_LEN} characters")]
    NameTooLong { field: &'static str, name: String },
    #[error("{field}: {name:?} must not be \".\" or \"..\"")]
    NameIsDotEntry { field: &'static str, name: String },
    #[error(
        "{field}: {name:?} must match [A-Za-z0-9][A-Za-z0-9._-]* (letters, digits, '.', '_', '-'; no '/')"
    )]
    NameInvalidCharacters { field: &'static str, name: String },
}

fn validated_root(home_root: &Path) -> Result<&Path, PathError> {
    if !home_root.is_absolute() {
        return Err(PathError::HomeRootNotAbsolute {
            home_root: home_root.to_owned(),
        });
    }
    let text = home_root.as_os_str().as_encoded_bytes();
    // `Path::components` silently drops "." and repeated separators; look at the raw bytes so a
    // root like "/a/./b" or "/a//b" is refused rather than reinterpreted.
    let raw_components_ok = text
        .split(|b| *b == b'/')
        .skip(1)
        .enumerate()
        .all(|(index, part)| match part {
            b"" => index == 0 && text.len() == 1,
            b"." | b".." => false,
            _ => true,
        });
    let trailing_slash = text.len() > 1 && text.ends_with(b"/");
    let components_ok = home_root
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !raw_components_ok || trailing_slash || !components_ok {
        return Err(PathError::HomeRootNotNormalised {
            home_root: home_root.to_owned(),
        });
    }
    if home_root.parent().is_none() {
        return Err(PathError::HomeRootIsFilesystemRoot {
            home_root: home_root.to_owned(),
        });
    }
    Ok(home_root)
}

fn validated_uid(field: &'static str, uid: u32) -> Result<u32, PathError> {
    if uid < FIRST_CONTAINER_UID {
        return Err(PathError::UidOutOfRange { field, uid });
    }
    Ok(uid)
}

/// Checks a directory name against `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 64 characters,
/// never `.` or `..` (the CustomDistro `path` rule).
pub fn validate_distro_name(field: &'static str, name: &str) -> Result<(), PathError> {
    if name.is_empty() {
        return Err(PathError::NameEmpty { field });
    }
    if name.len() > MAX_DISTRO_NAME_LEN {
        return Err(PathError::NameTooLong {
            field,
            name: name.to_owned(),
        });
    }
    if name == "." || name == ".." {
        return Err(PathError::NameIsDotEntry {
            field,
            name: name.to_owned(),
        });
    }
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !first_ok || !rest_ok {
        return Err(PathError::NameInvalidCharacters {
            field,
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// `<home_root>/<uid>`: a container's home.
pub fn home_dir(home_root: &Path, uid: u32) -> Result<PathBuf, PathError> {
    let root = validated_root(home_root)?;
    Ok(root.join(validated_uid("uid", uid)?.to_string()))
}

/// `<home_root>/<uid>/distros`: the mount point, inside a storage container's home, of its
/// custom distro trees.
pub fn distros_dir(home_root: &Path, uid: u32) -> Result<PathBuf, PathError> {
    Ok(home_dir(home_root, uid)?.join(DISTROS_DIR))
}

/// `<home_root>/<uid>/.ssh`: the directory holding `authorized_keys`.
pub fn ssh_dir(home_root: &Path, uid: u32) -> Result<PathBuf, PathError> {
    Ok(home_dir(home_root, uid)?.join(".ssh"))
}

/// `<home_root>/<uid>/.ssh/authorized_keys`: written from the Container's `sshKeys`.
pub fn authorized_keys(home_root: &Path, uid: u32) -> Result<PathBuf, PathError> {
    Ok(ssh_dir(home_root, uid)?.join("authorized_keys"))
}

/// `<home_root>/.archive`: where deleted homes are moved.
pub fn archive_dir(home_root: &Path) -> Result<PathBuf, PathError> {
    Ok(validated_root(home_root)?.join(ARCHIVE_DIR))
}

/// `<home_root>/.archive/<uid>-<unix_time>`: the name a deleted home is renamed to. The archive
/// directory cannot clash with a home: homes are all-digit names.
pub fn archive_path(home_root: &Path, uid: u32, unix_time: u64) -> Result<PathBuf, PathError> {
    let uid = validated_uid("uid", uid)?;
    Ok(archive_dir(home_root)?.join(format!("{uid}-{unix_time}")))
}

/// `<home_root>/.distros`: the root-owned parent of every storage container's distro trees.
pub fn distro_trees_dir(home_root: &Path) -> Result<PathBuf, PathError> {
    Ok(validated_root(home_root)?.join(DISTRO_TREES_DIR))
}

/// `<home_root>/.distros/<storage_uid>`: a storage container's distro trees (root-owned; mounted
/// at `<home>/distros` in the storage container).
pub fn storage_distros_dir(home_root: &Path, storage_uid: u32) -> Result<PathBuf, PathError> {
    let storage_uid = validated_uid("storageContainer uid", storage_uid)?;
    Ok(distro_trees_dir(home_root)?.join(storage_uid.to_string()))
}

/// `<home_root>/.distros/<storage_uid>/<path_name>`: a custom distro's root file system. Only
/// its last component is the customer's, and its parent is root's, so the customer can fill it
/// but never rename or replace it.
pub fn custom_distro_dir(
    home_root: &Path,
    storage_uid: u32,
    path_name: &str,
) -> Result<PathBuf, PathError> {
    validate_distro_name("path", path_name)?;
    Ok(storage_distros_dir(home_root, storage_uid)?.join(path_name))
}

/// `<home_root>/.archive/<uid>-<unix_time>.distros`: where a deleted storage container's distro
/// trees are moved, next to its archived home.
pub fn archive_distros_path(
    home_root: &Path,
    uid: u32,
    unix_time: u64,
) -> Result<PathBuf, PathError> {
    let uid = validated_uid("uid", uid)?;
    Ok(archive_dir(home_root)?.join(format!("{uid}-{unix_time}.distros")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn root() -> &'static Path {
        Path::new("/containers")
    }

    /// Strictly below `root` and made only of normal components after it.
    fn strictly_under(path: &Path, root: &Path) -> bool {
        match path.strip_prefix(root) {
            Ok(rest) => {
                rest.components().count() > 0
                    && rest.components().all(|c| matches!(c, Component::Normal(_)))
            }
            Err(_) => false,
        }
    }

    #[test]
    fn builds_every_path_of_a_home() {
        assert_eq!(
            home_dir(root(), 30001).unwrap(),
            Path::new("/containers/30001")
        );
        assert_eq!(
            distros_dir(root(), 30002).unwrap(),
            Path::new("/containers/30002/distros")
        );
        assert_eq!(
            authorized_keys(root(), 30003).unwrap(),
            Path::new("/containers/30003/.ssh/authorized_keys")
        );
        assert_eq!(
            archive_path(root(), 30004, 1_700_000_000).unwrap(),
            Path::new("/containers/.archive/30004-1700000000")
        );
        assert_eq!(
            custom_distro_dir(root(), 30005, "debian-12.1_custom").unwrap(),
            Path::new("/containers/.distros/30005/debian-12.1_custom")
        );
        assert_eq!(
            home_dir(Path::new("/srv/homes/uwsgi"), u32::MAX).unwrap(),
            Path::new("/srv/homes/uwsgi/4294967295")
        );
    }

    #[test]
    fn refuses_uids_below_the_container_range() {
        for uid in [0, 1, 1000, 30000] {
            assert_eq!(
                home_dir(root(), uid),
                Err(PathError::UidOutOfRange { field: "uid", uid })
            );
            assert!(archive_path(root(), uid, 1).is_err());
            assert!(authorized_keys(root(), uid).is_err());
            assert!(matches!(
                custom_distro_dir(root(), uid, "x"),
                Err(PathError::UidOutOfRange {
                    field: "storageContainer uid",
                    ..
                })
            ));
        }
    }

    #[test]
    fn refuses_bad_home_roots() {
        for bad in ["containers", "", "./containers", "relative/x"] {
            assert!(
                matches!(
                    home_dir(Path::new(bad), 30001),
                    Err(PathError::HomeRootNotAbsolute { .. })
                ),
                "{bad:?}"
            );
        }
        for bad in [
            "/containers/../etc",
            "/containers/..",
            "/a/./b",
            "/a//b",
            "/containers/",
            "//containers",
        ] {
            assert!(
                matches!(
                    home_dir(Path::new(bad), 30001),
                    Err(PathError::HomeRootNotNormalised { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            home_dir(Path::new("/"), 30001),
            Err(PathError::HomeRootIsFilesystemRoot { .. })
        ));
    }

    #[test]
    fn distro_names_follow_the_custom_distro_rule() {
        let longest = "x".repeat(64);
        for good in [
            "a",
            "A",
            "0",
            "debian",
            "a.b",
            "a_b",
            "a-b",
            "a..b",
            longest.as_str(),
        ] {
            assert_eq!(validate_distro_name("path", good), Ok(()), "{good:?}");
        }
        let long = "x".repeat(65);
        type IsExpected = fn(&PathError) -> bool;
        let cases: [(&str, IsExpected); 13] = [
            ("", |e| matches!(e, PathError::NameEmpty { .. })),
            (".", |e| matches!(e, PathError::NameIsDotEntry { .. })),
            ("..", |e| matches!(e, PathError::NameIsDotEntry { .. })),
            (".hidden", |e| {
                matches!(e, PathError::NameInvalidCharacters { .. })
            }),
            ("-flag", |e| {
                matches!(e, PathError::NameInvalidCharacters { .. })
            }),
            ("_x", |e| {
                matches!(e, PathError::NameInvalidCharacters { .. })
            }),
            ("a/b", |e| {
                matches!(e, PathError::NameInvalidCharacters { .. })
            }),
            ("../etc", |e| {
                matches!(e, PathError::NameInvalidCharacters { .. })
            }),
            ("a b", |e| {
                matches!(e, PathError::NameInvalidCharacters { .. })
            }),
            ("a\0b", |e| {
                matches!(e, PathError::NameInvalidCharacters { .. })
            }),
            ("é", |e| {
                matches!(e, PathError::NameInvalidCharacters { .. })
            }),
            ("a\\b", |e| {
                matches!(e, PathError::NameInvalidCharacters { .. })
            }),
            (long.as_str(), |e| {
                matches!(e, PathError::NameTooLong { .. })
            }),
        ];
        for (bad, expected) in cases {
            let error = custom_distro_dir(root(), 30001, bad).unwrap_err();
            assert!(expected(&error), "{bad:?} gave {error:?}");
            assert!(error.to_string().starts_with("path: "), "{error}");
        }
    }

    #[test]
    fn errors_name_the_field_and_the_rule() {
        let error = home_dir(root(), 42).unwrap_err().to_string();
        assert!(error.contains("uid") && error.contains("30001"), "{error}");
        let error = home_dir(Path::new("x"), 30001).unwrap_err().to_string();
        assert!(
            error.starts_with("homeRoot:") && error.contains("absolute"),
            "{error}"
        );
        let error = custom_distro_dir(root(), 30001, "a/b")
            .unwrap_err()
            .to_string();
        assert!(error.contains("[A-Za-z0-9][A-Za-z0-9._-]*"), "{error}");
    }

    fn home_roots() -> impl Strategy<Value = PathBuf> {
        proptest::collection::vec("[A-Za-z0-9._-]{1,12}", 1..4)
            .prop_filter("normal components only", |parts| {
                parts.iter().all(|p| p != "." && p != "..")
            })
            .prop_map(|parts| PathBuf::from(format!("/{}", parts.join("/"))))
    }

    proptest! {
        #[test]
        fn accepted_inputs_stay_strictly_under_home_root(
            home_root in home_roots(),
            uid in any::<u32>(),
            time in any::<u64>(),
            // Arbitrary text, including '/', '.', '..', NUL and non-ASCII.
            name in prop_oneof![".{0,70}", "[A-Za-z0-9._/-]{0,70}", Just("..".to_owned())],
        ) {
            let builders: [Result<PathBuf, PathError>; 7] = [
                home_dir(&home_root, uid),
                distros_dir(&home_root, uid),
                authorized_keys(&home_root, uid),
                archive_path(&home_root, uid, time),
                archive_distros_path(&home_root, uid, time),
                storage_distros_dir(&home_root, uid),
                custom_distro_dir(&home_root, uid, &name),
            ];
            for path in builders.into_iter().flatten() {
                prop_assert!(strictly_under(&path, &home_root), "{path:?} escapes {home_root:?}");
            }
            if uid >= FIRST_CONTAINER_UID {
                prop_assert!(home_dir(&home_root, uid).is_ok());
            }
            if let Ok(path) = custom_distro_dir(&home_root, uid, &name) {
                prop_assert_eq!(path.file_name().and_then(|n| n.to_str()), Some(name.as_str()));
                // Every component but the last is root's: `.distros` and the uid below it.
                let trees = storage_distros_dir(&home_root, uid).unwrap();
                prop_assert_eq!(path.parent(), Some(trees.as_path()));
                let parent = home_root.join(DISTRO_TREES_DIR);
                prop_assert_eq!(trees.parent(), Some(parent.as_path()));
                // Never inside a home, whose components are all the customer's.
                prop_assert!(!path.starts_with(home_dir(&home_root, uid).unwrap()));
            }
        }

        #[test]
        fn arbitrary_home_roots_are_accepted_only_when_normalised(root in "[/a.]{0,12}") {
            if let Ok(home) = home_dir(Path::new(&root), 30001) {
                prop_assert!(strictly_under(&home, Path::new(&root)));
                prop_assert!(!root.contains("/./") && !root.contains("//") && !root.contains("/../"));
                prop_assert!(!root.ends_with("/.") && !root.ends_with("/..") && !root.ends_with('/'));
            }
        }
    }
}
