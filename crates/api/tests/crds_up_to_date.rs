//! The committed `crds/` must be exactly what the Rust types generate: a type change without
//! `bash hack/update-crds.sh` fails here.

use std::collections::BTreeSet;
use std::path::Path;

#[test]
fn committed_crds_match_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds");
    let manifests = uwsgi_it_api::crd_manifests().expect("CRDs render");
    for manifest in &manifests {
        let path = dir.join(&manifest.file_name);
        let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{} is missing ({e}); run `bash hack/update-crds.sh`",
                path.display()
            )
        });
        assert!(
            committed == manifest.yaml,
            "{} drifted from the Rust types; run `bash hack/update-crds.sh` and commit",
            path.display()
        );
    }
    let expected: BTreeSet<_> = manifests.iter().map(|m| m.file_name.clone()).collect();
    let present: BTreeSet<_> = std::fs::read_dir(&dir)
        .expect("crds/ exists")
        .map(|e| {
            e.expect("readable entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(
        present, expected,
        "crds/ holds files no Rust type generates"
    );
}
