//! The image recipes: the Dockerfile's build stage has everything cargo reads, and
//! `hack/oci-image.py` (what `hack/images.sh` packs images with) is reproducible.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The `COPY <sources...> <destination>` lines of the Dockerfile's first (build) stage.
fn build_stage_copies(dockerfile: &str) -> Vec<(Vec<String>, String)> {
    let mut copies = Vec::new();
    let mut stages = 0;
    for line in dockerfile.lines().map(str::trim) {
        if line.starts_with("FROM ") {
            stages += 1;
        }
        if stages == 1
            && let Some(rest) = line.strip_prefix("COPY ")
        {
            let mut words: Vec<String> = rest
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .map(str::to_string)
                .collect();
            let destination = words.pop().expect("COPY has a destination");
            copies.push((words, destination));
        }
    }
    copies
}

fn copy_tree(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

#[test]
fn the_dockerfile_build_stage_copies_everything_cargo_reads() {
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let copies = build_stage_copies(&dockerfile);
    assert!(!copies.is_empty(), "the build stage copies the sources");
    let context = tempfile::tempdir().unwrap();
    for (sources, destination) in copies {
        for source in sources {
            let target = if destination.ends_with('/') {
                context
                    .path()
                    .join(destination.trim_start_matches("./"))
                    .join(Path::new(&source).file_name().unwrap())
            } else {
                context.path().join(destination.trim_start_matches("./"))
            };
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            copy_tree(&repo(&source), &target);
        }
    }
    // `cargo fetch` reads what `cargo build --locked` reads first: every manifest of the
    // workspace and the path of every target they declare (`cargo metadata` does not check those).
    // It fetches for every platform: on a fresh machine some crates (a Windows-only one, say)
    // are not in the local cache yet, so it may download them (hack/test.sh fetches first).
    let output = Command::new(env!("CARGO"))
        .args(["fetch", "--locked"])
        .arg("--manifest-path")
        .arg(context.path().join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "cargo cannot read the workspace the Dockerfile copies: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn pack(dir: &Path, layer: &Path, created: &str, out: &str) -> String {
    let output = Command::new("python3")
        .arg(repo("hack/oci-image.py"))
        .args(["--name", "uwsgi-it.local/test:1", "--created", created])
        .arg("--out")
        .arg(dir.join(out))
        .arg("--layer")
        .arg(layer)
        .args(["--entrypoint", r#"["/bin/true"]"#, "--user", "65532:65532"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "oci-image.py: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

#[test]
fn oci_images_are_reproducible_from_their_layers_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer.tar");
    let status = Command::new("tar")
        .args([
            "--mtime=@0",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-cf",
        ])
        .arg(&layer)
        .arg("-C")
        .arg(repo("hack"))
        .arg("oci-image.py")
        .status()
        .unwrap();
    assert!(status.success());

    let first = pack(dir.path(), &layer, "1700000000", "a.tar");
    let second = pack(dir.path(), &layer, "1700000000", "b.tar");
    assert!(first.starts_with("sha256:"), "{first}");
    assert_eq!(first, second, "same layers and time, same manifest digest");
    assert_eq!(
        std::fs::read(dir.path().join("a.tar")).unwrap(),
        std::fs::read(dir.path().join("b.tar")).unwrap(),
        "byte-identical archives"
    );
    let later = pack(dir.path(), &layer, "1700000001", "c.tar");
    assert_ne!(first, later, "the creation time is part of the image");

    // An OCI layout that names the image for `ctr images import`.
    let listing = Command::new("tar")
        .arg("-xOf")
        .arg(dir.path().join("a.tar"))
        .arg("index.json")
        .output()
        .unwrap();
    let index: serde_json::Value = serde_json::from_slice(&listing.stdout).unwrap();
    assert_eq!(
        index["manifests"][0]["annotations"]["io.containerd.image.name"],
        "uwsgi-it.local/test:1"
    );
    assert_eq!(index["manifests"][0]["digest"], first.as_str());
}
