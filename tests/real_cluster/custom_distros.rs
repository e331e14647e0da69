//! Custom distros on the real cluster: a Debian tree filled in through a storage container is
//! the root filesystem of a consumer, and nothing the customer does to the trees it can reach
//! brings a host path or another customer's file into a Pod.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use uwsgi_it_api::condition::{self, AVAILABLE, RUNNING};
use uwsgi_it_api::{Container, CustomDistro, DistroRoot};
use uwsgi_it_testbed::real_cluster::{
    self, RealCluster, http_get, wait_condition, write_as_customer,
};

use super::{CUSTOMER, WAIT, cluster_apply, step};

/// The public port of the consumer's app.
const PUBLIC_PORT: u16 = 9200;
const PRIVATE_PORT: u16 = 8000;

pub async fn scenario(cluster: &RealCluster, client: &Client) {
    let containers: Api<Container> = Api::namespaced(client.clone(), CUSTOMER);
    let distros: Api<CustomDistro> = Api::namespaced(client.clone(), CUSTOMER);
    let pods: Api<Pod> = Api::namespaced(client.clone(), CUSTOMER);
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let stamp = format!("{:x}", std::process::id() ^ 0x5eed);

    step("another customer's home on server-1, with a marker file only it holds");
    cluster_apply(
        cluster,
        "apiVersion: uwsgi.it/v1alpha1
kind: Customer
metadata: {name: bobco}
spec: {servers: [server-1]}",
    );
    let customers: Api<uwsgi_it_api::Customer> = Api::all(client.clone());
    wait_condition(&customers, "bobco", "Ready", WAIT)
        .await
        .expect("the other customer's namespace");
    cluster_apply(
        cluster,
        "apiVersion: uwsgi.it/v1alpha1
kind: Container
metadata: {name: victim, namespace: bobco}
spec: {server: server-1, memory: 64, storage: 100}",
    );
    let bob_containers: Api<Container> = Api::namespaced(client.clone(), "bobco");
    let victim = wait_condition(&bob_containers, "victim", "HomeReady", WAIT)
        .await
        .expect("the victim's home");
    let victim_uid = uid_of(&victim);
    let victim_home = cluster.home_root().join(victim_uid.to_string());
    let marker_name = format!("victim-marker-{stamp}");
    write_as_customer(
        &victim_home.join(&marker_name),
        "victim's secret\n",
        victim_uid,
    )
    .unwrap();
    let victim_before = snapshot(&victim_home);

    step("a storage container; a CustomDistro gets an empty tree, filled through the container");
    cluster_apply(
        cluster,
        "apiVersion: uwsgi.it/v1alpha1
kind: Container
metadata: {name: store, namespace: acme}
spec: {server: server-1, memory: 128, storage: 4000, distro: bookworm, customDistrosStorage: true}",
    );
    let store = wait_condition(&containers, "store", "Running", WAIT)
        .await
        .expect("the storage container runs");
    let store_uid = uid_of(&store);
    let trees = cluster
        .home_root()
        .join(".distros")
        .join(store_uid.to_string());
    let store_home = format!("/containers/{store_uid}");
    let root = add_distro(cluster, &distros, &store_home, "deb", &stamp).await;
    assert_eq!(root.emperor, "/opt/unbit/uwsgi/uwsgi");
    for dir in ["etc", "opt", "srv", "usr", "var", "bin", "lib"] {
        assert!(
            root.directories.iter().any(|d| d == dir),
            "{dir} in {:?}",
            root.directories
        );
    }
    for never in ["proc", "dev", "sys", "tmp", "run", "containers"] {
        assert!(
            !root.directories.iter().any(|d| d == never),
            "{never} is not the distro's"
        );
    }

    step("a consumer runs on it as its root filesystem and answers through a PortMapping");
    cluster_apply(
        cluster,
        &format!(
            "apiVersion: uwsgi.it/v1alpha1
kind: Container
metadata: {{name: legacy, namespace: acme}}
spec: {{server: server-1, memory: 256, storage: 500, customDistro: deb}}
---
apiVersion: uwsgi.it/v1alpha1
kind: PortMapping
metadata: {{name: legacy-http, namespace: acme}}
spec: {{container: legacy, proto: tcp, publicPort: {PUBLIC_PORT}, privatePort: {PRIVATE_PORT}}}"
        ),
    );
    let legacy = wait_condition(&containers, "legacy", "HomeReady", WAIT)
        .await
        .expect("the consumer's home");
    let legacy_uid = uid_of(&legacy);
    let legacy_home = cluster.home_root().join(legacy_uid.to_string());
    write_probe_app(&legacy_home, legacy_uid, &marker_name);
    wait_condition(&containers, "legacy", "Running", WAIT)
        .await
        .expect("the consumer runs on the custom distro");
    let pod = pods.get("legacy").await.unwrap();
    let security = pod.spec.as_ref().unwrap().containers[0]
        .security_context
        .clone()
        .unwrap();
    assert_eq!(
        security.capabilities.unwrap().drop,
        Some(vec!["ALL".to_string()])
    );
    // Running is the Pod's; the vassal starts and the forward is programmed just after.
    let seen = wait_probe(cluster, &format!("deb-{stamp}"))
        .await
        .expect("the consumer's app answers on the public port");
    assert!(
        seen.contains(&format!("deb-{stamp}")),
        "the distro's /etc/os-release: {seen}"
    );
    assert!(seen.contains("home=written"), "it writes its home: {seen}");
    assert!(
        seen.contains("usr=Permission denied") || seen.contains("usr=Read-only file system"),
        "the distro is read-only to it: {seen}"
    );
    assert!(
        seen.contains("shared=written"),
        "except a world-writable directory: {seen}"
    );
    assert!(
        seen.contains("markers=[]"),
        "no marker of another customer: {seen}"
    );
    let old_volume = distro_volume(&volumes, legacy_uid)
        .await
        .expect("the distro's volume");

    step("customDistro changed on the running consumer: the new tree is its root, the old PV gone");
    add_distro(cluster, &distros, &store_home, "deb2", &stamp).await;
    patch_spec(
        &containers,
        "legacy",
        serde_json::json!({"customDistro": "deb2"}),
    )
    .await;
    let seen = wait_probe(cluster, &format!("deb2-{stamp}"))
        .await
        .expect("the consumer answers from the new root");
    assert!(seen.contains("markers=[]"), "{seen}");
    wait_gone(&volumes, &old_volume).await;
    let new_volume = distro_volume(&volumes, legacy_uid)
        .await
        .expect("the new distro's volume");
    assert_ne!(new_volume, old_volume);

    step("the distro directory itself cannot be replaced, renamed or linked by the customer");
    for attempt in [
        format!("mv {store_home}/distros/deb2 {store_home}/distros/moved"),
        format!("rmdir {store_home}/distros/deb2"),
        format!("ln -s / {store_home}/distros/evil"),
        format!("mkdir {store_home}/distros/sneaky"),
        format!("mv {store_home}/distros {store_home}/distros.old"),
    ] {
        let (ok, output) = exec_in_store(cluster, &attempt);
        assert!(!ok, "{attempt} must fail: {output}");
    }
    assert!(trees.join("deb2/etc/os-release").is_file());
    assert!(!trees.join("evil").exists() && !trees.join("sneaky").exists());

    step("components inside the tree replaced by links to /, /proc and another customer's home");
    let swap = format!(
        "cd {store_home}/distros/deb2 && mv usr usr.real && ln -s / usr && mv etc etc.real && ln -s /proc etc && mv opt opt.real && ln -s {} opt",
        victim_home.display()
    );
    let (ok, output) = exec_in_store(cluster, &swap);
    assert!(ok, "the customer may change its own tree: {output}");
    // While it runs: its mounts are what was there when it started.
    let seen = probe(cluster)
        .await
        .expect("the running consumer still answers");
    assert!(
        seen.contains(&format!("deb2-{stamp}")) && seen.contains("markers=[]"),
        "{seen}"
    );
    // And a restart (a memory change) right away, before the agent looks again.
    patch_spec(&containers, "legacy", serde_json::json!({"memory": 300})).await;
    let why = wait_running_false_after(&containers, "legacy", &pods).await;
    eprintln!("[real-cluster] consumer after the swap: {why}");
    let unavailable = wait_reason(&distros, "deb2", AVAILABLE, "NoUwsgi").await;
    for link in ["/usr", "/etc", "/opt"] {
        assert!(
            unavailable.contains(&format!("{link} (a link")),
            "{link}: {unavailable}"
        );
    }
    // Never started on what the links point to.
    assert_never_ran(&pods, "legacy").await;
    assert!(
        probe(cluster).await.is_err(),
        "nothing answers while the root is broken"
    );
    let message = running_message(&containers, "legacy").await;
    assert!(
        message.contains("not available") || message.contains("CreateContainerConfigError"),
        "the condition says why: {message}"
    );

    step("a Pod made by hand with the swapped /usr as a subPath: the kubelet refuses to mount it");
    // What a restart racing the agent's next look would get: the controller's last survey still
    // lists /usr. The kubelet resolves a subPath without following a link out of the volume.
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(client.clone(), CUSTOMER);
    let claim = claims
        .list(&ListParams::default().labels("uwsgi.it/container=legacy"))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|c| c.name_any())
        .find(|n| n.starts_with("legacy-distro-"))
        .expect("legacy's distro claim");
    cluster_apply(
        cluster,
        &format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: subpath-race, namespace: acme}}
spec:
  nodeName: server-1
  automountServiceAccountToken: false
  securityContext: {{runAsUser: {legacy_uid}, runAsGroup: {legacy_uid}, runAsNonRoot: true, seccompProfile: {{type: RuntimeDefault}}}}
  containers:
  - name: main
    image: {image}
    command: [/usr/bin/cat, /etc/os-release]
    securityContext: {{allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}
    volumeMounts:
    - {{name: distro, mountPath: /usr, subPath: usr}}
    - {{name: distro, mountPath: /etc, subPath: etc}}
  volumes:
  - name: distro
    persistentVolumeClaim: {{claimName: {claim}}}",
            image = cluster.env("DISTRO_ROOT_IMAGE")
        ),
    );
    let refusal = wait_waiting_reason(&pods, "subpath-race", "CreateContainerConfigError").await;
    eprintln!("[real-cluster] kubelet: {refusal}");
    assert_never_ran(&pods, "subpath-race").await;
    pods.delete("subpath-race", &Default::default())
        .await
        .unwrap();

    step("the customer puts its tree back: the consumer starts on it again, still confined");
    let restore = format!(
        "cd {store_home}/distros/deb2 && rm usr etc opt && mv usr.real usr && mv etc.real etc && mv opt.real opt"
    );
    let (ok, output) = exec_in_store(cluster, &restore);
    assert!(ok, "{output}");
    let seen = wait_probe(cluster, &format!("deb2-{stamp}"))
        .await
        .expect("the consumer answers again");
    assert!(seen.contains("markers=[]"), "{seen}");

    step("a consumer on another server, or of another customer: refused, nothing mounted");
    cluster_apply(
        cluster,
        "apiVersion: uwsgi.it/v1alpha1
kind: Container
metadata: {name: faraway, namespace: acme}
spec: {server: server-2, memory: 64, storage: 100, customDistro: deb}
---
apiVersion: uwsgi.it/v1alpha1
kind: Container
metadata: {name: intruder, namespace: bobco}
spec: {server: server-1, memory: 64, storage: 100, customDistro: deb}",
    );
    wait_reason(&containers, "faraway", RUNNING, "CustomDistroOnOtherServer").await;
    wait_reason(&bob_containers, "intruder", RUNNING, "CustomDistroNotFound").await;
    let bob_pods: Api<Pod> = Api::namespaced(client.clone(), "bobco");
    assert!(pods.get_opt("faraway").await.unwrap().is_none());
    assert!(bob_pods.get_opt("intruder").await.unwrap().is_none());
    for name in ["faraway", "intruder"] {
        let api = if name == "faraway" {
            &containers
        } else {
            &bob_containers
        };
        let uid = uid_of(&api.get(name).await.unwrap());
        assert!(
            distro_volume(&volumes, uid).await.is_none(),
            "{name} has no distro volume"
        );
    }

    step("links planted at the storage home's .ssh and vassals: the agent writes through none");
    let plant = format!(
        "cd {store_home} && rm -rf .ssh && ln -s {victim}/.ssh .ssh && mv vassals vassals.real && ln -s {victim} vassals",
        victim = victim_home.display()
    );
    let store_pod = pods.get("store").await.unwrap().metadata.uid;
    let (ok, output) = exec_in_store(cluster, &plant);
    assert!(ok, "{output}");
    patch_spec(
        &containers,
        "store",
        serde_json::json!({"sshKeys": [uwsgi_it_testbed::ssh_keys::MALLORY]}),
    )
    .await;
    let refused = wait_reason(&containers, "store", "KeysReady", "SymlinkRefused").await;
    assert!(refused.contains(".ssh"), "{refused}");
    // A key problem is the keys' alone: the home stays ready and the Pod keeps running.
    let store = containers.get("store").await.unwrap();
    assert!(
        uwsgi_it_api::condition::is_true(
            uwsgi_it_api::condition::HasConditions::conditions(&store),
            "HomeReady"
        ),
        "{:?}",
        store.status
    );
    let pod = pods.get("store").await.unwrap();
    assert_eq!(
        pod.metadata.uid, store_pod,
        "the storage Pod was not replaced"
    );
    assert!(pod_running(&pod), "the storage Pod still runs");

    step("nothing outside the customers' own trees changed");
    assert_eq!(
        snapshot(&victim_home),
        victim_before,
        "the victim's home is as it was"
    );
    let trees_meta = std::fs::metadata(&trees).unwrap();
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::uid(&trees_meta),
            std::os::unix::fs::MetadataExt::mode(&trees_meta) & 0o7777
        ),
        (0, 0o755),
        "the trees' parent is still root's"
    );
}

/// A CustomDistro `name` (path `name`) of the storage container `store`: the agent makes its
/// empty tree, the customer fills it (os-release naming `<name>-<stamp>`), the agent surveys it.
async fn add_distro(
    cluster: &RealCluster,
    distros: &Api<CustomDistro>,
    store_home: &str,
    name: &str,
    stamp: &str,
) -> DistroRoot {
    cluster_apply(
        cluster,
        &format!(
            "apiVersion: uwsgi.it/v1alpha1
kind: CustomDistro
metadata: {{name: {name}, namespace: acme}}
spec: {{storageContainer: store, path: {name}}}"
        ),
    );
    let empty = wait_reason(distros, name, AVAILABLE, "Empty").await;
    assert!(empty.contains(&format!("/distros/{name}")), "{empty}");
    fill_through_store(cluster, store_home, name, &format!("{name}-{stamp}"));
    let available = wait_condition(distros, name, AVAILABLE, WAIT)
        .await
        .unwrap_or_else(|e| panic!("the filled tree {name} is available: {e}"));
    available.status.unwrap().root.expect("the agent's survey")
}

fn uid_of(container: &Container) -> u32 {
    let uid = container
        .status
        .as_ref()
        .and_then(|s| s.uid)
        .expect("a uid");
    u32::try_from(uid).unwrap()
}

/// Runs `script` in the storage container's Pod, as its customer: (exit status 0, output).
fn exec_in_store(cluster: &RealCluster, script: &str) -> (bool, String) {
    let output = cluster
        .kubectl()
        .args([
            "exec", "-n", CUSTOMER, "store", "-c", "main", "--", "sh", "-c", script,
        ])
        .output()
        .expect("kubectl exec");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// The customer uploads a root filesystem into `distros/<path>` through its storage container
/// (tar on stdin of `kubectl exec`, as it would from its laptop): the platform distro's Debian
/// tree, with an os-release of its own and a world-writable /srv/shared.
fn fill_through_store(cluster: &RealCluster, store_home: &str, path: &str, name: &str) {
    let tree = debian_tree();
    let script = format!(
        "set -e; cd {store_home}/distros/{path}; tar -x --no-same-owner --exclude='./dev/*' 2>/dev/null || true; \
         test -x opt/unbit/uwsgi/uwsgi || test -L opt/unbit/uwsgi/uwsgi; \
         printf 'PRETTY_NAME=\"{name}\"\\nID=uwsgi-it-test\\n' > etc/os-release.new; rm -f etc/os-release; mv etc/os-release.new etc/os-release; \
         mkdir -p srv/shared; chmod 1777 srv/shared"
    );
    let file = std::fs::File::open(&tree).unwrap_or_else(|e| panic!("{}: {e}", tree.display()));
    let output = cluster
        .kubectl()
        .args([
            "exec", "-i", "-n", CUSTOMER, "store", "-c", "main", "--", "sh", "-c", &script,
        ])
        .stdin(file)
        .output()
        .expect("kubectl exec");
    assert!(
        output.status.success(),
        "filling distros/{path}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The Debian root filesystem `hack/images.sh` built for the platform distro (mmdebstrap of
/// minbase with uwsgi-core and its python3 plugin).
fn debian_tree() -> PathBuf {
    let cache = std::env::var_os("UWSGI_IT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/uwsgi-it-operator")
        });
    let dir = cache.join("rootfs");
    let mut found: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("distro-bookworm-") && n.ends_with(".tar"))
        })
        .collect();
    found.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    found.pop().expect("hack/images.sh built the bookworm tree")
}

/// A vassal that reports what its root looks like: the distro's os-release, whether it can
/// write its home, /usr and the world-writable /srv/shared, and where (if anywhere) a file named
/// like the other customer's marker is visible.
fn write_probe_app(home: &Path, uid: u32, marker: &str) {
    let container_home = format!("/containers/{uid}");
    let app = format!(
        r#"import os

def attempt(path):
    try:
        with open(path, 'w') as f:
            f.write('x')
        return 'written'
    except OSError as e:
        return e.strerror

def markers():
    found, seen = [], 0
    for top, dirs, files in os.walk('/'):
        if top in ('/proc', '/sys', '/dev'):
            dirs[:] = []
            continue
        seen += len(files) + len(dirs)
        if seen > 300000:
            found.append('(walk cut short)')
            break
        found.extend(os.path.join(top, f) for f in files if f == '{marker}')
    return found

def application(env, start_response):
    start_response('200 OK', [('Content-Type', 'text/plain')])
    lines = [
        open('/etc/os-release').read().strip(),
        'home=' + attempt('{container_home}/written-by-vassal'),
        'usr=' + attempt('/usr/uwsgi-it-probe'),
        'shared=' + attempt('/srv/shared/from-%d' % os.getuid()),
        'markers=%s' % markers(),
    ]
    return [('\n'.join(lines) + '\n').encode()]
"#
    );
    write_as_customer(&home.join("probe.py"), &app, uid).unwrap();
    let ini = format!(
        "[uwsgi]\nplugins = python3\nmaster = true\nhttp-socket = :{PRIVATE_PORT}\nwsgi-file = {container_home}/probe.py\n"
    );
    write_as_customer(&home.join("vassals/probe.ini"), &ini, uid).unwrap();
}

async fn probe(cluster: &RealCluster) -> anyhow::Result<String> {
    let netns = cluster.client_netns()?;
    let address = std::net::SocketAddrV4::new(cluster.public_ip("server-1"), PUBLIC_PORT);
    match http_get(&netns, address, "/", Duration::from_secs(5))? {
        (200, body) => Ok(body),
        (status, body) => anyhow::bail!("HTTP {status}: {body}"),
    }
}

/// Waits until the probe's answer contains `expect`; any other os-release on the way fails.
async fn wait_probe(cluster: &RealCluster, expect: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let last = match probe(cluster).await {
            Ok(body) if body.contains(expect) => return Ok(body),
            Ok(body) => body,
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            anyhow::bail!("no answer with {expect} within {WAIT:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn patch_spec(api: &Api<Container>, name: &str, spec: serde_json::Value) {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({"spec": spec})),
    )
    .await
    .unwrap_or_else(|e| panic!("patching {name}: {e}"));
}

/// Waits for the condition `type_` to have `reason`; returns its message.
async fn wait_reason<K>(api: &Api<K>, name: &str, type_: &str, reason: &str) -> String
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    real_cluster::wait_reason(api, name, type_, reason, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn running_message(api: &Api<Container>, name: &str) -> String {
    let container = api.get(name).await.unwrap();
    let conditions = container.status.map(|s| s.conditions).unwrap_or_default();
    condition::find(&conditions, RUNNING)
        .map(|c| format!("{}: {}", c.reason, c.message))
        .unwrap_or_default()
}

/// Waits until the container is not running (the old Pod replaced, the new one held back).
async fn wait_running_false_after(api: &Api<Container>, name: &str, pods: &Api<Pod>) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let message = running_message(api, name).await;
        let container = api.get(name).await.unwrap();
        let conditions = container.status.map(|s| s.conditions).unwrap_or_default();
        let not_running =
            condition::find(&conditions, RUNNING).is_some_and(|c| c.status == "False");
        let restarted = pods.get_opt(name).await.unwrap().is_none_or(|p| {
            p.annotations().get("uwsgi.it/spec-hash").is_some() && !pod_running(&p)
        });
        if not_running && restarted {
            return message;
        }
        assert!(Instant::now() < deadline, "{name} kept running: {message}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the Pod's container waits with `reason`; returns the kubelet's message.
async fn wait_waiting_reason(pods: &Api<Pod>, name: &str, reason: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let pod = pods.get_opt(name).await.unwrap();
        let waiting = pod
            .as_ref()
            .and_then(|p| p.status.as_ref()?.container_statuses.clone())
            .unwrap_or_default()
            .into_iter()
            .find_map(|c| c.state?.waiting);
        if let Some(waiting) = &waiting
            && waiting.reason.as_deref() == Some(reason)
        {
            return waiting.message.clone().unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "{name}: not waiting with {reason} within {WAIT:?}: {waiting:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn pod_running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
}

/// The Pod of `name`, if there is one, has never had a container running.
async fn assert_never_ran(pods: &Api<Pod>, name: &str) {
    // Give a kubelet that would have started it a moment to do so.
    tokio::time::sleep(Duration::from_secs(3)).await;
    if let Some(pod) = pods.get_opt(name).await.unwrap() {
        let statuses = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.clone())
            .unwrap_or_default();
        for status in statuses {
            assert!(
                status.state.as_ref().is_none_or(|s| s.running.is_none())
                    && status.restart_count == 0,
                "the consumer's container ran on the swapped tree: {status:?}"
            );
        }
    }
}

/// The name of the custom-distro PersistentVolume of the container with `uid`, if any.
async fn distro_volume(volumes: &Api<PersistentVolume>, uid: u32) -> Option<String> {
    let prefix = format!("uwsgi-it-distro-{uid}-");
    volumes
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|v| v.name_any())
        .find(|n| n.starts_with(&prefix))
}

async fn wait_gone(volumes: &Api<PersistentVolume>, name: &str) {
    let deadline = Instant::now() + WAIT;
    while volumes.get_opt(name).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "{name} still exists");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every entry below `dir` with owner, mode, size and content: what an attack would change.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u32, u32, u64, Vec<u8>)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let content = if meta.is_file() {
            std::fs::read(&path).unwrap()
        } else {
            Vec::new()
        };
        out.push((path.clone(), meta.uid(), meta.mode(), meta.len(), content));
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out.sort();
    out
}
