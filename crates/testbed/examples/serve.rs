//! Starts a control plane and keeps it running until Ctrl-C; prints the kubeconfig path.
//! Handy for poking at the API server by hand: `cargo run -p uwsgi-it-testbed --example serve`.

fn main() -> anyhow::Result<()> {
    let plane = uwsgi_it_testbed::control_plane::ControlPlane::start()?;
    println!("export KUBECONFIG={}", plane.kubeconfig_path().display());
    let (stop, stopped) = std::sync::mpsc::channel();
    ctrlc_like(stop);
    let _ = stopped.recv();
    Ok(())
}

fn ctrlc_like(stop: std::sync::mpsc::Sender<()>) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    std::thread::spawn(move || {
        runtime.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        let _ = stop.send(());
    });
}
