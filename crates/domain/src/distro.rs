//! Custom distributions: root filesystems a customer fills through a *storage container*
//! (at `<home>/distros/<path>`) and runs its other containers on.
//!
//! A distro lives on one server's disk, so it is usable only by containers of the same customer
//! on that same server. A storage container never uses a custom distro itself (it would mount
//! its own home, or another distro, as its root). Deleting a distro still in use is refused
//! (uwsgi.it cascaded instead, breaking the containers that used it).

use crate::identity::ObjectKey;

/// Longest allowed distro `path`.
pub const MAX_DISTRO_PATH_LEN: usize = 64;

/// What the distro rules need to know about a Container.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerFacts {
    /// `metadata.namespace` (the customer).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The server's node name: `status.server` once admitted, else the controller's resolution
    /// of `spec.server`; `None` when it does not resolve.
    pub server: Option<String>,
    /// Whether the container is admitted (condition `Admitted=True`, or holds a reservation).
    pub admitted: bool,
    /// `spec.customDistrosStorage`.
    pub custom_distros_storage: bool,
    /// `spec.customDistro`.
    pub custom_distro: Option<String>,
}

/// What the distro rules need to know about a CustomDistro.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DistroFacts {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec.storageContainer`: a Container name in the same namespace.
    pub storage_container: String,
    /// `spec.path`: a directory name under the storage container's `distros/`.
    pub path: String,
}

/// An accepted distro: where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedDistro {
    /// The storage container's server (`status.server` of the distro).
    pub server: String,
    /// The storage container's name.
    pub storage_container: String,
}

/// Why a distro `path` is not a safe directory name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DistroPathError {
    /// Empty.
    #[error("path is empty: it must be one directory name under distros/")]
    Empty,
    /// Longer than [`MAX_DISTRO_PATH_LEN`].
    #[error("path is {len} characters long; at most {MAX_DISTRO_PATH_LEN} are allowed")]
    TooLong {
        /// Its length in characters.
        len: usize,
    },
    /// `.` or `..`: they name the `distros/` directory itself or the home above it.
    #[error("path {path:?} is not allowed: . and .. are not distro directories")]
    DotOrDotDot {
        /// The path.
        path: String,
    },
    /// The first character is not a letter or digit.
    #[error("path {path:?} must start with a letter or digit, not {ch:?}")]
    BadFirstChar {
        /// The path.
        path: String,
        /// The first character.
        ch: char,
    },
    /// A character outside `[A-Za-z0-9._-]`.
    #[error(
        "path {path:?} has {ch:?} at position {position}; only letters, digits, '.', '_' and '-' are allowed"
    )]
    BadChar {
        /// The path.
        path: String,
        /// The character.
        ch: char,
        /// Its position (0-based, in characters).
        position: usize,
    },
}

/// Checks a distro `path`: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 64 characters, never `.` or
/// `..`. That makes it one plain directory name: no `/`, no traversal, no hidden entry, nothing
/// a shell or `nft` would interpret.
pub fn validate_distro_path_name(path: &str) -> Result<(), DistroPathError> {
    let len = path.chars().count();
    if len == 0 {
        return Err(DistroPathError::Empty);
    }
    if len > MAX_DISTRO_PATH_LEN {
        return Err(DistroPathError::TooLong { len });
    }
    // Unreachable through the first-character rule, kept so the rule holds on its own.
    if path == "." || path == ".." {
        return Err(DistroPathError::DotOrDotDot {
            path: path.to_owned(),
        });
    }
    for (position, ch) in path.chars().enumerate() {
        let ok = ch.is_ascii_alphanumeric() || (position > 0 && matches!(ch, '.' | '_' | '-'));
        if !ok {
            return Err(if position == 0 {
                DistroPathError::BadFirstChar {
                    path: path.to_owned(),
                    ch,
                }
            } else {
                DistroPathError::BadChar {
                    path: path.to_owned(),
                    ch,
                    position,
                }
            });
        }
    }
    Ok(())
}

/// Why a CustomDistro is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DistroRefusal {
    /// `spec.path` is not a safe directory name.
    #[error(transparent)]
    InvalidPath(#[from] DistroPathError),
    /// No Container of that name in the namespace.
    #[error("storage container {container} does not exist in this namespace")]
    StorageContainerNotFound {
        /// `spec.storageContainer`.
        container: String,
    },
    /// The container is not a storage container.
    #[error("container {container} is not a storage container (customDistrosStorage is false)")]
    NotAStorageContainer {
        /// `spec.storageContainer`.
        container: String,
    },
    /// The storage container is not admitted, so it has no server and no home yet.
    #[error("storage container {container} is not admitted")]
    StorageContainerNotAdmitted {
        /// `spec.storageContainer`.
        container: String,
    },
}

impl DistroRefusal {
    /// The `reason` of the distro's `Accepted=False` condition.
    pub fn reason(&self) -> &'static str {
        match self {
            DistroRefusal::InvalidPath(_) => "InvalidPath",
            DistroRefusal::StorageContainerNotFound { .. } => "StorageContainerNotFound",
            DistroRefusal::NotAStorageContainer { .. } => "NotAStorageContainer",
            DistroRefusal::StorageContainerNotAdmitted { .. } => "StorageContainerNotAdmitted",
        }
    }
}

/// Accepts a CustomDistro: its path is valid and its storage container exists in its
/// namespace, has `customDistrosStorage: true` and is admitted. The distro's server is the
/// storage container's.
///
/// `containers` may hold the containers of any namespaces; only the distro's is looked at.
pub fn accept_distro(
    distro: &DistroFacts,
    containers: &[ContainerFacts],
) -> Result<AcceptedDistro, DistroRefusal> {
    validate_distro_path_name(&distro.path)?;
    let container = distro.storage_container.clone();
    let storage = containers
        .iter()
        .find(|c| c.namespace == distro.namespace && c.name == distro.storage_container)
        .ok_or_else(|| DistroRefusal::StorageContainerNotFound {
            container: container.clone(),
        })?;
    if !storage.custom_distros_storage {
        return Err(DistroRefusal::NotAStorageContainer { container });
    }
    match (&storage.server, storage.admitted) {
        (Some(server), true) => Ok(AcceptedDistro {
            server: server.clone(),
            storage_container: container,
        }),
        _ => Err(DistroRefusal::StorageContainerNotAdmitted { container }),
    }
}

/// Why a container may not use a custom distro.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DistroUseRefusal {
    /// A storage container never uses a custom distro.
    #[error(
        "container {container} is a storage container (customDistrosStorage) and may not use a custom distro"
    )]
    StorageContainer {
        /// The container's name.
        container: String,
    },
    /// No CustomDistro of that name in the container's namespace.
    #[error("custom distro {distro} does not exist in this namespace")]
    DistroNotFound {
        /// `spec.customDistro`.
        distro: String,
    },
    /// The distro belongs to another customer.
    #[error("custom distro {distro} belongs to another customer")]
    OtherCustomer {
        /// The distro's name.
        distro: String,
    },
    /// The distro itself is not accepted.
    #[error("custom distro {distro} is not accepted: {why}")]
    DistroNotAccepted {
        /// The distro's name.
        distro: String,
        /// Why.
        why: DistroRefusal,
    },
    /// The container's server is not known yet.
    #[error("container {container} has no server yet")]
    ServerUnknown {
        /// The container's name.
        container: String,
    },
    /// The distro is on another server's disk.
    #[error(
        "custom distro {distro} is on server {distro_server}, container {container} is on server {container_server}"
    )]
    OtherServer {
        /// The distro's name.
        distro: String,
        /// The distro's server.
        distro_server: String,
        /// The container's name.
        container: String,
        /// The container's server.
        container_server: String,
    },
}

impl DistroUseRefusal {
    /// A condition `reason` for the container.
    pub fn reason(&self) -> &'static str {
        match self {
            DistroUseRefusal::StorageContainer { .. } => "StorageContainerCannotUseCustomDistro",
            DistroUseRefusal::DistroNotFound { .. } => "CustomDistroNotFound",
            DistroUseRefusal::OtherCustomer { .. } => "CustomDistroOfOtherCustomer",
            DistroUseRefusal::DistroNotAccepted { .. } => "CustomDistroNotAccepted",
            DistroUseRefusal::ServerUnknown { .. } => "ServerUnknown",
            DistroUseRefusal::OtherServer { .. } => "CustomDistroOnOtherServer",
        }
    }
}

/// Whether `container` may use `distro`: not a storage container itself, same namespace, the
/// distro accepted, and both on the same server. Returns where the distro is.
pub fn may_use_distro(
    container: &ContainerFacts,
    distro: &DistroFacts,
    containers: &[ContainerFacts],
) -> Result<AcceptedDistro, DistroUseRefusal> {
    if container.custom_distros_storage {
        return Err(DistroUseRefusal::StorageContainer {
            container: container.name.clone(),
        });
    }
    if container.namespace != distro.namespace {
        return Err(DistroUseRefusal::OtherCustomer {
            distro: distro.name.clone(),
        });
    }
    let accepted =
        accept_distro(distro, containers).map_err(|why| DistroUseRefusal::DistroNotAccepted {
            distro: distro.name.clone(),
            why,
        })?;
    let server = container
        .server
        .as_ref()
        .ok_or_else(|| DistroUseRefusal::ServerUnknown {
            container: container.name.clone(),
        })?;
    if *server != accepted.server {
        return Err(DistroUseRefusal::OtherServer {
            distro: distro.name.clone(),
            distro_server: accepted.server,
            container: container.name.clone(),
            container_server: server.clone(),
        });
    }
    Ok(accepted)
}

/// Checks the container's `spec.customDistro`, looked up by name in its namespace.
/// `Ok(None)` when it uses none.
pub fn check_custom_distro(
    container: &ContainerFacts,
    distros: &[DistroFacts],
    containers: &[ContainerFacts],
) -> Result<Option<AcceptedDistro>, DistroUseRefusal> {
    let Some(wanted) = &container.custom_distro else {
        return Ok(None);
    };
    let distro = distros
        .iter()
        .find(|d| d.namespace == container.namespace && d.name == *wanted)
        .ok_or_else(|| DistroUseRefusal::DistroNotFound {
            distro: wanted.clone(),
        })?;
    may_use_distro(container, distro, containers).map(Some)
}

/// The names of the distros `container` may use (`status.usableCustomDistros`), sorted.
pub fn usable_distros(
    container: &ContainerFacts,
    distros: &[DistroFacts],
    containers: &[ContainerFacts],
) -> Vec<String> {
    let mut names: Vec<String> = distros
        .iter()
        .filter(|d| d.namespace == container.namespace)
        .filter(|d| may_use_distro(container, d, containers).is_ok())
        .map(|d| d.name.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The containers that name `distro` in `spec.customDistro`, sorted by name; its `usedBy` is
/// their number.
///
/// Every referring container counts, admitted or not and whether or not it may use the distro:
/// any of them may run with it as soon as it is admitted or the distro becomes usable, and the
/// count guards deletion.
pub fn used_by(distro: &DistroFacts, containers: &[ContainerFacts]) -> Vec<String> {
    let mut names: Vec<String> = containers
        .iter()
        .filter(|c| c.namespace == distro.namespace)
        .filter(|c| c.custom_distro.as_deref() == Some(distro.name.as_str()))
        .map(|c| c.name.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Why a CustomDistro may not be deleted yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("custom distro {} is used by {} container(s): {}; change their customDistro first", distro, users.len(), users.join(", "))]
pub struct DeletionRefused {
    /// The distro (`namespace/name`).
    pub distro: ObjectKey,
    /// The containers using it, sorted.
    pub users: Vec<String>,
}

impl DeletionRefused {
    /// The condition `reason`.
    pub fn reason(&self) -> &'static str {
        "InUse"
    }
}

/// Whether `distro` may be deleted (its finalizer removed): only when no container uses it.
/// `key` is the distro's ordering key, kept in the refusal for messages.
pub fn check_deletion(
    key: &ObjectKey,
    distro: &DistroFacts,
    containers: &[ContainerFacts],
) -> Result<(), DeletionRefused> {
    let users = used_by(distro, containers);
    if users.is_empty() {
        Ok(())
    } else {
        Err(DeletionRefused {
            distro: key.clone(),
            users,
        })
    }
}

/// Top-level names a container running on a custom distro never takes from the distro: the
/// runtime provides `/proc`, `/dev` and `/sys`, `/tmp` and `/run` are private to each container
/// (an empty directory of its own, so two containers on one distro share no scratch space), and
/// `/containers` holds the container's home.
pub const ROOT_ENTRIES_NOT_FROM_DISTRO: [&str; 6] =
    ["containers", "dev", "proc", "run", "sys", "tmp"];

/// Most top-level directories a distro may bring (each is one mount in the container).
pub const MAX_ROOT_DIRECTORIES: usize = 64;

/// Where a distro's uWSGI may be, in order of preference: the seed's distro checklist puts it at
/// `/opt/unbit/uwsgi/uwsgi`; a distro with a packaged uWSGI has it on the standard `PATH`.
pub const EMPEROR_CANDIDATES: [&str; 4] = [
    "/opt/unbit/uwsgi/uwsgi",
    "/usr/local/bin/uwsgi",
    "/usr/bin/uwsgi",
    "/bin/uwsgi",
];

/// Whether a top-level entry of a distro tree is mounted into the containers running on it: a
/// plain name (the distro `path` rule: no `/`, no dot entries, nothing hidden) that the runtime
/// or the operator does not provide itself.
pub fn is_root_directory_name(name: &str) -> bool {
    validate_distro_path_name(name).is_ok() && !ROOT_ENTRIES_NOT_FROM_DISTRO.contains(&name)
}

/// A root filesystem a container can run on: the directories to mount at `/<name>` and the
/// Emperor binary to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnableRoot {
    /// Top-level directories, sorted, without duplicates.
    pub directories: Vec<String>,
    /// An entry of [`EMPEROR_CANDIDATES`].
    pub emperor: String,
}

/// Why a distro's reported root cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RootRefusal {
    /// The agent has not reported a usable tree.
    #[error("custom distro {distro} is not available: {why}")]
    NotAvailable {
        /// The distro's name.
        distro: String,
        /// The agent's message, or what is missing.
        why: String,
    },
    /// A reported directory is not a plain top-level name, or is one the runtime provides.
    #[error(
        "custom distro {distro}: status.root.directories has {name:?}, which is not a top-level directory a container may take from a distro (a plain name, not one of {})",
        ROOT_ENTRIES_NOT_FROM_DISTRO.join(", ")
    )]
    BadDirectory {
        /// The distro's name.
        distro: String,
        /// The offending entry.
        name: String,
    },
    /// More directories than [`MAX_ROOT_DIRECTORIES`].
    #[error(
        "custom distro {distro}: {count} top-level directories, at most {MAX_ROOT_DIRECTORIES} are mounted"
    )]
    TooManyDirectories {
        /// The distro's name.
        distro: String,
        /// How many were reported.
        count: usize,
    },
    /// The Emperor is not one of the known places, or lies in a directory that is not mounted.
    #[error(
        "custom distro {distro}: status.root.emperor {emperor:?} must be one of {} inside a mounted top-level directory",
        EMPEROR_CANDIDATES.join(", ")
    )]
    BadEmperor {
        /// The distro's name.
        distro: String,
        /// The reported path.
        emperor: String,
    },
}

/// Checks the agent's survey of a distro (`status.root`) before the controller builds a Pod
/// from it: the agent is trusted to look at the disk, not to name mount points.
pub fn runnable_root(
    distro: &str,
    directories: &[String],
    emperor: &str,
) -> Result<RunnableRoot, RootRefusal> {
    if directories.len() > MAX_ROOT_DIRECTORIES {
        return Err(RootRefusal::TooManyDirectories {
            distro: distro.to_owned(),
            count: directories.len(),
        });
    }
    if let Some(bad) = directories.iter().find(|d| !is_root_directory_name(d)) {
        return Err(RootRefusal::BadDirectory {
            distro: distro.to_owned(),
            name: bad.clone(),
        });
    }
    let mut sorted = directories.to_vec();
    sorted.sort();
    sorted.dedup();
    let top = emperor
        .strip_prefix('/')
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default();
    if !EMPEROR_CANDIDATES.contains(&emperor) || !sorted.iter().any(|d| d == top) {
        return Err(RootRefusal::BadEmperor {
            distro: distro.to_owned(),
            emperor: emperor.to_owned(),
        });
    }
    Ok(RunnableRoot {
        directories: sorted,
        emperor: emperor.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn storage(ns: &str, name: &str, server: &str) -> ContainerFacts {
        ContainerFacts {
            namespace: ns.into(),
            name: name.into(),
            server: Some(server.into()),
            admitted: true,
            custom_distros_storage: true,
            custom_distro: None,
        }
    }

    fn plain(ns: &str, name: &str, server: &str, distro: Option<&str>) -> ContainerFacts {
        ContainerFacts {
            namespace: ns.into(),
            name: name.into(),
            server: Some(server.into()),
            admitted: true,
            custom_distros_storage: false,
            custom_distro: distro.map(Into::into),
        }
    }

    fn distro(ns: &str, name: &str, storage_container: &str, path: &str) -> DistroFacts {
        DistroFacts {
            namespace: ns.into(),
            name: name.into(),
            storage_container: storage_container.into(),
            path: path.into(),
        }
    }

    fn world() -> (Vec<ContainerFacts>, Vec<DistroFacts>) {
        let containers = vec![
            storage("cust", "store", "node-a"),
            storage("cust", "store-b", "node-b"),
            plain("cust", "web", "node-a", Some("alpine")),
            plain("cust", "far", "node-b", Some("alpine")),
            plain("other", "intruder", "node-a", Some("alpine")),
        ];
        let distros = vec![
            distro("cust", "alpine", "store", "alpine-3.20"),
            distro("cust", "debian", "store", "debian"),
            distro("cust", "on-b", "store-b", "x"),
            distro("cust", "broken", "web", "x"),
            distro("other", "theirs", "store", "x"),
        ];
        (containers, distros)
    }

    #[test]
    fn valid_path_names() {
        for ok in [
            "a",
            "0",
            "alpine-3.20",
            "my_distro.v2",
            "A-",
            &"x".repeat(64),
        ] {
            assert_eq!(validate_distro_path_name(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn invalid_path_names_name_the_rule() {
        assert_eq!(validate_distro_path_name(""), Err(DistroPathError::Empty));
        assert_eq!(
            validate_distro_path_name(&"x".repeat(65)),
            Err(DistroPathError::TooLong { len: 65 })
        );
        assert_eq!(
            validate_distro_path_name("."),
            Err(DistroPathError::DotOrDotDot { path: ".".into() })
        );
        assert_eq!(
            validate_distro_path_name(".."),
            Err(DistroPathError::DotOrDotDot { path: "..".into() })
        );
        for (bad, ch) in [
            (".hidden", '.'),
            ("-x", '-'),
            ("_x", '_'),
            ("/etc", '/'),
            ("é", 'é'),
        ] {
            assert_eq!(
                validate_distro_path_name(bad),
                Err(DistroPathError::BadFirstChar {
                    path: bad.into(),
                    ch
                }),
                "{bad:?}"
            );
        }
        for (bad, ch, position) in [
            ("a/b", '/', 1),
            ("a b", ' ', 1),
            ("ab\0", '\0', 2),
            ("a..\\", '\\', 3),
        ] {
            assert_eq!(
                validate_distro_path_name(bad),
                Err(DistroPathError::BadChar {
                    path: bad.into(),
                    ch,
                    position
                }),
                "{bad:?}"
            );
        }
        assert_eq!(
            validate_distro_path_name("a/b").unwrap_err().to_string(),
            "path \"a/b\" has '/' at position 1; only letters, digits, '.', '_' and '-' are allowed"
        );
        assert_eq!(
            validate_distro_path_name(&"x".repeat(65))
                .unwrap_err()
                .to_string(),
            "path is 65 characters long; at most 64 are allowed"
        );
    }

    #[test]
    fn length_counts_characters_not_bytes() {
        // 64 characters but more bytes: refused for the character, not the length.
        let path = format!("a{}", "é".repeat(63));
        assert!(matches!(
            validate_distro_path_name(&path),
            Err(DistroPathError::BadChar { position: 1, .. })
        ));
    }

    #[test]
    fn a_distro_is_on_its_storage_containers_server() {
        let (containers, distros) = world();
        assert_eq!(
            accept_distro(&distros[0], &containers),
            Ok(AcceptedDistro {
                server: "node-a".into(),
                storage_container: "store".into()
            })
        );
    }

    #[test]
    fn a_distro_needs_an_existing_storage_container_of_its_namespace() {
        let (containers, _) = world();
        let err = accept_distro(&distro("cust", "d", "missing", "x"), &containers).unwrap_err();
        assert_eq!(err.reason(), "StorageContainerNotFound");
        assert_eq!(
            err.to_string(),
            "storage container missing does not exist in this namespace"
        );
        // "store" exists, but in namespace cust: another customer cannot point at it.
        let err = accept_distro(&distro("other", "d", "store", "x"), &containers).unwrap_err();
        assert_eq!(err.reason(), "StorageContainerNotFound");
    }

    #[test]
    fn a_distro_needs_a_container_with_custom_distros_storage() {
        let (containers, distros) = world();
        let err = accept_distro(&distros[3], &containers).unwrap_err();
        assert_eq!(err.reason(), "NotAStorageContainer");
        assert_eq!(
            err.to_string(),
            "container web is not a storage container (customDistrosStorage is false)"
        );
    }

    #[test]
    fn a_distro_needs_an_admitted_storage_container() {
        let mut store = storage("cust", "store", "node-a");
        store.admitted = false;
        let err = accept_distro(&distro("cust", "d", "store", "x"), &[store.clone()]).unwrap_err();
        assert_eq!(err.reason(), "StorageContainerNotAdmitted");
        store.admitted = true;
        store.server = None;
        let err = accept_distro(&distro("cust", "d", "store", "x"), &[store]).unwrap_err();
        assert_eq!(err.reason(), "StorageContainerNotAdmitted");
    }

    #[test]
    fn a_distro_with_a_bad_path_is_refused_before_anything_else() {
        let err = accept_distro(&distro("cust", "d", "missing", ".."), &[]).unwrap_err();
        assert_eq!(err.reason(), "InvalidPath");
        assert_eq!(
            err.to_string(),
            "path \"..\" is not allowed: . and .. are not distro directories"
        );
    }

    #[test]
    fn a_container_on_the_same_server_and_namespace_may_use_the_distro() {
        let (containers, distros) = world();
        assert_eq!(
            check_custom_distro(&containers[2], &distros, &containers),
            Ok(Some(AcceptedDistro {
                server: "node-a".into(),
                storage_container: "store".into()
            }))
        );
    }

    #[test]
    fn a_container_without_custom_distro_needs_no_check() {
        let (containers, distros) = world();
        assert_eq!(
            check_custom_distro(&containers[0], &distros, &containers),
            Ok(None)
        );
    }

    #[test]
    fn a_container_on_another_server_may_not_use_the_distro() {
        let (containers, distros) = world();
        let err = check_custom_distro(&containers[3], &distros, &containers).unwrap_err();
        assert_eq!(err.reason(), "CustomDistroOnOtherServer");
        assert_eq!(
            err.to_string(),
            "custom distro alpine is on server node-a, container far is on server node-b"
        );
    }

    #[test]
    fn another_customers_container_does_not_even_find_the_distro() {
        let (containers, distros) = world();
        let err = check_custom_distro(&containers[4], &distros, &containers).unwrap_err();
        assert_eq!(
            err,
            DistroUseRefusal::DistroNotFound {
                distro: "alpine".into()
            }
        );
        // Asked directly, the namespace rule refuses it too.
        let err = may_use_distro(&containers[4], &distros[0], &containers).unwrap_err();
        assert_eq!(err.reason(), "CustomDistroOfOtherCustomer");
    }

    #[test]
    fn a_storage_container_may_not_use_a_custom_distro() {
        let (mut containers, distros) = world();
        containers[0].custom_distro = Some("debian".into());
        let err = check_custom_distro(&containers[0], &distros, &containers).unwrap_err();
        assert_eq!(err.reason(), "StorageContainerCannotUseCustomDistro");
        assert_eq!(
            err.to_string(),
            "container store is a storage container (customDistrosStorage) and may not use a custom distro"
        );
    }

    #[test]
    fn a_distro_that_is_not_accepted_is_not_usable() {
        let (mut containers, distros) = world();
        containers[2].custom_distro = Some("broken".into());
        let err = check_custom_distro(&containers[2], &distros, &containers).unwrap_err();
        assert_eq!(err.reason(), "CustomDistroNotAccepted");
        assert_eq!(
            err.to_string(),
            "custom distro broken is not accepted: container web is not a storage container \
             (customDistrosStorage is false)"
        );
    }

    #[test]
    fn a_container_without_a_server_may_not_use_a_distro() {
        let (mut containers, distros) = world();
        containers[2].server = None;
        let err = check_custom_distro(&containers[2], &distros, &containers).unwrap_err();
        assert_eq!(err.reason(), "ServerUnknown");
    }

    #[test]
    fn usable_distros_are_the_accepted_ones_of_the_same_customer_and_server_sorted() {
        let (containers, distros) = world();
        assert_eq!(
            usable_distros(&containers[2], &distros, &containers),
            ["alpine", "debian"]
        );
        assert_eq!(
            usable_distros(&containers[3], &distros, &containers),
            ["on-b"]
        );
        assert!(usable_distros(&containers[4], &distros, &containers).is_empty());
        assert!(usable_distros(&containers[0], &distros, &containers).is_empty());
    }

    #[test]
    fn used_by_counts_every_referring_container_of_the_namespace() {
        let (containers, distros) = world();
        // "far" cannot use it (other server) but names it, so it counts; "intruder" names a
        // distro of the same name in its own namespace, which is another distro.
        assert_eq!(used_by(&distros[0], &containers), ["far", "web"]);
        assert!(used_by(&distros[1], &containers).is_empty());
    }

    #[test]
    fn deletion_is_refused_while_used_and_allowed_when_unused() {
        let (containers, distros) = world();
        let key = ObjectKey::new(0, "cust", "alpine");
        let err = check_deletion(&key, &distros[0], &containers).unwrap_err();
        assert_eq!(err.reason(), "InUse");
        assert_eq!(
            err.to_string(),
            "custom distro cust/alpine is used by 2 container(s): far, web; change their customDistro first"
        );
        assert_eq!(
            check_deletion(
                &ObjectKey::new(0, "cust", "debian"),
                &distros[1],
                &containers
            ),
            Ok(())
        );
    }

    proptest! {
        #[test]
        fn accepted_path_names_are_single_safe_directory_names(path in "\\PC{0,70}") {
            if validate_distro_path_name(&path).is_ok() {
                prop_assert!(!path.is_empty() && path.len() <= MAX_DISTRO_PATH_LEN);
                prop_assert!(path != "." && path != "..");
                prop_assert!(!path.starts_with(['.', '-', '_']));
                prop_assert!(path.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
            }
        }

        #[test]
        fn names_matching_the_pattern_are_accepted(path in "[A-Za-z0-9][A-Za-z0-9._-]{0,63}") {
            prop_assert_eq!(validate_distro_path_name(&path), Ok(()));
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_debian_tree_is_runnable_with_its_directories_sorted() {
        let root = runnable_root(
            "deb",
            &names(&["usr", "etc", "bin", "lib", "lib64", "opt", "var", "usr"]),
            "/opt/unbit/uwsgi/uwsgi",
        )
        .unwrap();
        assert_eq!(
            root.directories,
            names(&["bin", "etc", "lib", "lib64", "opt", "usr", "var"])
        );
        assert_eq!(root.emperor, "/opt/unbit/uwsgi/uwsgi");
        let packaged = runnable_root("deb", &names(&["usr", "etc"]), "/usr/bin/uwsgi").unwrap();
        assert_eq!(packaged.emperor, "/usr/bin/uwsgi");
    }

    #[test]
    fn runtime_provided_and_unsafe_names_are_never_mounted_from_a_distro() {
        for bad in [
            "proc",
            "dev",
            "sys",
            "tmp",
            "run",
            "containers",
            "..",
            ".",
            ".hidden",
            "a/b",
            "",
            "/etc",
        ] {
            let error = runnable_root("deb", &names(&["usr", bad]), "/usr/bin/uwsgi").unwrap_err();
            assert!(
                matches!(&error, RootRefusal::BadDirectory { name, .. } if name == bad),
                "{bad:?}: {error}"
            );
            assert!(
                error.to_string().contains("status.root.directories"),
                "{error}"
            );
        }
    }

    #[test]
    fn the_emperor_must_be_a_known_place_in_a_mounted_directory() {
        for bad in [
            "/usr/bin/python3",
            "usr/bin/uwsgi",
            "/opt/unbit/uwsgi/uwsgi/../../x",
            "/tmp/uwsgi",
        ] {
            let error = runnable_root("deb", &names(&["usr", "opt"]), bad).unwrap_err();
            assert!(
                matches!(error, RootRefusal::BadEmperor { .. }),
                "{bad}: {error}"
            );
        }
        // Known place, but /opt is not one of the tree's directories.
        let error = runnable_root("deb", &names(&["usr"]), "/opt/unbit/uwsgi/uwsgi").unwrap_err();
        assert!(
            error.to_string().contains("/opt/unbit/uwsgi/uwsgi"),
            "{error}"
        );
    }

    #[test]
    fn too_many_directories_are_refused_with_the_numbers() {
        let many: Vec<String> = (0..=MAX_ROOT_DIRECTORIES)
            .map(|i| format!("d{i}"))
            .collect();
        let error = runnable_root("deb", &many, "/usr/bin/uwsgi").unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "custom distro deb: 65 top-level directories, at most {MAX_ROOT_DIRECTORIES} are mounted"
            )
        );
    }

    proptest! {
        #[test]
        fn a_runnable_root_only_ever_mounts_plain_names(
            dirs in proptest::collection::vec(".{0,8}", 0..8),
            emperor in prop_oneof![Just("/usr/bin/uwsgi".to_owned()), ".{0,20}"],
        ) {
            if let Ok(root) = runnable_root("d", &dirs, &emperor) {
                for dir in &root.directories {
                    prop_assert!(is_root_directory_name(dir));
                    prop_assert!(!dir.contains('/') && !dir.starts_with('.'));
                }
                prop_assert!(EMPEROR_CANDIDATES.contains(&root.emperor.as_str()));
            }
        }
    }
}
