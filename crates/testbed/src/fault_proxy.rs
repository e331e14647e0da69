//! A fault proxy between one client (a controller under test) and the real API server.
//!
//! The client talks plain HTTP to the proxy on loopback; the proxy forwards every request with
//! the credentials of the client it was built from. On the test's word it can
//! - **hold** the writes that match a rule until released (a decision computed, then delayed
//!   while someone else acts),
//! - **lose the response** to the next request that matches (the request reaches the API server
//!   and is applied; the client sees its connection drop),
//! - **serve a stale list**: answer the next list of a path with a snapshot taken earlier, and
//! - **reset the watches** in flight, so the client relists (and meets the stale list).
//!
//! Only for tests: it never listens beyond loopback.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use kube::Client;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

/// Which requests a fault applies to: a method (`None`: any) and a substring of the path.
#[derive(Debug, Clone)]
pub struct Rule {
    /// `PUT`, `PATCH`, ...; `None` matches every method.
    pub method: Option<http::Method>,
    /// A part of the request path, e.g. `/servers/s1/status`.
    pub path: String,
}

impl Rule {
    /// Requests of `method` whose path contains `path`.
    pub fn new(method: http::Method, path: impl Into<String>) -> Self {
        Rule {
            method: Some(method),
            path: path.into(),
        }
    }

    fn matches<B>(&self, request: &Request<B>) -> bool {
        self.method.as_ref().is_none_or(|m| m == request.method())
            && request.uri().path().contains(&self.path)
    }
}

#[derive(Default)]
struct State {
    hold: Mutex<Vec<Rule>>,
    held: Mutex<usize>,
    held_changed: Notify,
    released: Notify,
    lose: Mutex<Option<Rule>>,
    lost: Mutex<usize>,
    stale: Mutex<Option<(String, Bytes)>>,
    /// The path whose next watch is told its resourceVersion expired (410), forcing a relist.
    expire: Mutex<Option<String>>,
    stale_served: Mutex<usize>,
    writes: Mutex<Vec<String>>,
    reads: Mutex<Vec<String>>,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    address: SocketAddr,
    state: Arc<State>,
    upstream: Client,
    watches: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

type ProxyBody = UnsyncBoxBody<Bytes, std::io::Error>;

fn full(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(text.to_string()))
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 that forwards with `upstream`'s credentials.
    pub async fn start(upstream: Client) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let state = Arc::new(State::default());
        let (watches, _) = watch::channel(0u64);
        let task = {
            let state = Arc::clone(&state);
            let upstream = upstream.clone();
            let watches = watches.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let state = Arc::clone(&state);
                    let upstream = upstream.clone();
                    let resets = watches.subscribe();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            forward(
                                Arc::clone(&state),
                                upstream.clone(),
                                resets.clone(),
                                request,
                            )
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            })
        };
        Ok(FaultProxy {
            address,
            state,
            upstream,
            watches,
            task,
        })
    }

    /// A client that talks to the API server through this proxy (no credentials of its own).
    pub fn client(&self) -> Result<Client> {
        let config = self.config()?;
        Ok(Client::try_from(config)?)
    }

    /// A kubeconfig for a process that should talk through this proxy.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: proxy\n  cluster:\n    server: http://{}\nusers:\n- name: proxy\n  user: {{}}\ncontexts:\n- name: proxy\n  context:\n    cluster: proxy\n    user: proxy\ncurrent-context: proxy\n",
            self.address
        )
    }

    fn config(&self) -> Result<kube::Config> {
        let url = format!("http://{}", self.address)
            .parse()
            .context("proxy URL")?;
        Ok(kube::Config::new(url))
    }

    /// Holds every request matching `rule` from now on (besides those already held), until
    /// [`FaultProxy::release`] or [`FaultProxy::release_path`].
    pub fn hold(&self, rule: Rule) {
        self.state.hold.lock().unwrap().push(rule);
    }

    /// Waits until at least `count` requests were held (in all, since the proxy started).
    pub async fn wait_held(&self, count: usize) {
        loop {
            let changed = self.state.held_changed.notified();
            if *self.state.held.lock().unwrap() >= count {
                return;
            }
            changed.await;
        }
    }

    /// Lets every held request through (in no particular order) and holds nothing more.
    pub fn release(&self) {
        self.state.hold.lock().unwrap().clear();
        self.state.released.notify_waiters();
    }

    /// Stops holding the requests of the rules on `path` and lets those through; the others
    /// stay held.
    pub fn release_path(&self, path: &str) {
        self.state
            .hold
            .lock()
            .unwrap()
            .retain(|rule| rule.path != path);
        self.state.released.notify_waiters();
    }

    /// Forwards the next request matching `rule`, then drops its response: the API server
    /// applied it, the client never hears so.
    pub fn lose_next_response(&self, rule: Rule) {
        *self.state.lose.lock().unwrap() = Some(rule);
    }

    /// How many responses were lost so far.
    pub fn lost(&self) -> usize {
        *self.state.lost.lock().unwrap()
    }

    /// Takes a snapshot of the list at `path` (e.g. `/apis/uwsgi.it/v1alpha1/containers`) now;
    /// the next list of that path is answered with it once [`FaultProxy::serve_stale`] is
    /// called.
    pub async fn snapshot(&self, path: &str) -> Result<Bytes> {
        let request = Request::get(path).body(Vec::new())?;
        let text = self.upstream.request_text(request).await?;
        Ok(Bytes::from(text))
    }

    /// Answers the next list of `path` with `snapshot`; the watches in flight are reset and the
    /// next watch of `path` is told its resourceVersion is too old (410 Expired, what a lagging
    /// watch cache answers), so the client relists — and gets the stale list.
    pub fn serve_stale(&self, path: &str, snapshot: Bytes) {
        *self.state.stale.lock().unwrap() = Some((path.to_string(), snapshot));
        *self.state.expire.lock().unwrap() = Some(path.to_string());
        self.reset_watches();
    }

    /// How many stale lists were served.
    pub fn stale_served(&self) -> usize {
        *self.state.stale_served.lock().unwrap()
    }

    /// Ends every watch response in flight (the client sees its watches close).
    pub fn reset_watches(&self) {
        self.watches.send_modify(|generation| *generation += 1);
    }

    /// The writes (method and path) that went through so far.
    pub fn writes(&self) -> Vec<String> {
        self.state.writes.lock().unwrap().clone()
    }

    /// The reads of one object or list (path and query; not watches) that went through so far.
    pub fn reads(&self) -> Vec<String> {
        self.state.reads.lock().unwrap().clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.release();
        self.task.abort();
    }
}

async fn forward(
    state: Arc<State>,
    upstream: Client,
    mut resets: watch::Receiver<u64>,
    request: Request<Incoming>,
) -> std::result::Result<Response<ProxyBody>, std::io::Error> {
    let method = request.method().clone();
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let is_write = method != http::Method::GET;
    let is_watch = path_and_query.contains("watch=true") || path_and_query.contains("watch=1");

    // A stale list, once.
    if method == http::Method::GET && !is_watch {
        let stale = {
            let mut stale = state.stale.lock().unwrap();
            match stale.as_ref() {
                Some((path, _)) if request.uri().path() == path => stale.take(),
                _ => None,
            }
        };
        if let Some((_, body)) = stale {
            *state.stale_served.lock().unwrap() += 1;
            let mut response = Response::new(
                Full::new(body)
                    .map_err(|never: Infallible| match never {})
                    .boxed_unsync(),
            );
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            return Ok(response);
        }
    }

    // A watch told to relist.
    if is_watch {
        let expire = {
            let mut expire = state.expire.lock().unwrap();
            match expire.as_deref() {
                Some(path) if request.uri().path() == path => expire.take(),
                _ => None,
            }
        };
        if expire.is_some() {
            let event = r#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version","reason":"Expired","code":410}}"#;
            let mut response = full(StatusCode::OK, &format!("{event}\n"));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            return Ok(response);
        }
    }

    // Held requests wait until no rule holds them any more.
    let holds = |state: &State| {
        state
            .hold
            .lock()
            .unwrap()
            .iter()
            .any(|rule| rule.matches(&request))
    };
    if holds(&state) {
        *state.held.lock().unwrap() += 1;
        state.held_changed.notify_waiters();
        loop {
            let released = state.released.notified();
            if !holds(&state) {
                break;
            }
            released.await;
        }
    }
    let lose = {
        let mut lose = state.lose.lock().unwrap();
        if lose.as_ref().is_some_and(|rule| rule.matches(&request)) {
            lose.take();
            true
        } else {
            false
        }
    };

    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let mut builder = Request::builder().method(parts.method).uri(&path_and_query);
    for (name, value) in &parts.headers {
        if name != http::header::HOST && name != http::header::AUTHORIZATION {
            builder = builder.header(name, value);
        }
    }
    let upstream_request = builder
        .body(kube::client::Body::from(body.to_vec()))
        .map_err(std::io::Error::other)?;
    if is_write {
        state
            .writes
            .lock()
            .unwrap()
            .push(format!("{method} {path_and_query}"));
    } else if method == http::Method::GET && !is_watch {
        state.reads.lock().unwrap().push(path_and_query.to_string());
    }
    let response = match upstream.send(upstream_request).await {
        Ok(response) => response,
        Err(e) => return Ok(full(StatusCode::BAD_GATEWAY, &e.to_string())),
    };
    if lose {
        *state.lost.lock().unwrap() += 1;
        // Dropping the connection without an answer: what a broken network does.
        return Err(std::io::Error::other("response lost on purpose"));
    }
    let (parts, body) = response.into_parts();
    let body: ProxyBody = if is_watch {
        // A watch ends when the test resets the watches.
        resets.borrow_and_update();
        let frames = body
            .into_data_stream()
            .map(|chunk| chunk.map(Frame::data).map_err(std::io::Error::other));
        let stream = futures::stream::unfold(
            (Box::pin(frames), resets),
            |(mut frames, mut resets)| async move {
                tokio::select! {
                    next = frames.next() => next.map(|frame| (frame, (frames, resets))),
                    _ = resets.changed() => None,
                }
            },
        );
        BodyExt::boxed_unsync(StreamBody::new(stream))
    } else {
        body.map_err(std::io::Error::other).boxed_unsync()
    };
    Ok(Response::from_parts(parts, body))
}
