//! The reloader: the only writer of the route table. Triggers (file watcher, SIGHUP, admin
//! `POST /reload`) are queued and handled one at a time: read → parse → validate (pure) →
//! build → swap. Any failure keeps the old table serving and is reported.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::table::RouteTable;
use crate::app::Shared;
use crate::config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The config file (or its directory) changed. Skipped when the content is unchanged.
    Watch,
    /// SIGHUP.
    Signal,
    /// `POST /reload` on the admin listener.
    Admin,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Watch => "watch",
            Trigger::Signal => "signal",
            Trigger::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied { version: u64 },
    Unchanged { version: u64 },
    Rejected { errors: Vec<String> },
}

struct ReloadRequest {
    trigger: Trigger,
    reply: Option<oneshot::Sender<Outcome>>,
}

/// A handle to queue reloads.
#[derive(Clone)]
pub struct Reloader {
    tx: mpsc::Sender<ReloadRequest>,
}

impl Reloader {
    /// Queues a reload and waits for its outcome.
    pub async fn reload(&self, trigger: Trigger) -> Outcome {
        let (reply, rx) = oneshot::channel();
        let req = ReloadRequest {
            trigger,
            reply: Some(reply),
        };
        if self.tx.send(req).await.is_err() {
            return Outcome::Rejected {
                errors: vec!["the gateway is shutting down".into()],
            };
        }
        rx.await.unwrap_or(Outcome::Rejected {
            errors: vec!["the reload was abandoned".into()],
        })
    }

    /// Queues a reload without waiting (watcher and signal triggers).
    pub fn trigger(&self, trigger: Trigger) {
        let _ = self.tx.try_send(ReloadRequest {
            trigger,
            reply: None,
        });
    }
}

pub fn content_hash(text: &str) -> String {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// The hash of a whole config: routes.yaml's (`text_hash`) folded with each file it read (path
/// and content; a missing file counts as such), so that an edited proto is a changed config.
/// Reads files: call it off the async workers.
pub fn config_hash(text_hash: &str, files: &[PathBuf]) -> String {
    if files.is_empty() {
        return text_hash.to_string();
    }
    let mut h = DefaultHasher::new();
    text_hash.hash(&mut h);
    for f in files {
        f.hash(&mut h);
        std::fs::read(f).ok().hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

/// What a reload compares with to skip a config that did not change: the running config's
/// hash and the files its build read.
pub struct Running {
    pub hash: String,
    pub files: Vec<PathBuf>,
}

/// Reads, parses and validates `path` (at most `max_size` bytes) on a blocking thread, so a
/// large file never holds an async worker: requests keep being served meanwhile. Pure apart
/// from the reads and env lookups; returns the spec and routes.yaml's content hash, or `None`
/// when the config (routes.yaml and the files it read) is still `unchanged`'s.
pub async fn load_spec(
    path: &Path,
    max_size: u64,
    unchanged: Option<Running>,
) -> Result<Option<(config::ConfigSpec, String)>, Vec<String>> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let file = path.display().to_string();
        let errors =
            |e: config::ConfigErrors| e.0.iter().map(ToString::to_string).collect::<Vec<_>>();
        let text = config::read_file(&path, max_size).map_err(errors)?;
        let hash = content_hash(&text);
        if let Some(running) = unchanged
            && config_hash(&hash, &running.files) == running.hash
        {
            return Ok(None);
        }
        let spec = config::load_str(&file, &text, &config::process_env).map_err(errors)?;
        Ok(Some((spec, hash)))
    })
    .await
    .unwrap_or_else(|_| Err(vec!["the config parse failed unexpectedly".into()]))
}

/// Builds a table from a validated spec: the reflection requests first (the only awaits), then
/// the build itself on a blocking thread. Returns the table and the whole config's hash
/// ([`config_hash`] of `text_hash` and the files the build read).
pub async fn build_table(
    spec: config::ConfigSpec,
    text_hash: String,
    path: &Path,
    version: u64,
    previous: Option<&RouteTable>,
    metrics: &Arc<crate::telemetry::metrics::Metrics>,
) -> Result<(RouteTable, String), Vec<String>> {
    // What the running table has that the new one keeps where unchanged.
    let (previous, previous_state, previous_otel) = match previous {
        Some(t) => (t.backends.clone(), t.state.clone(), t.otel.clone()),
        None => (crate::backends::BackendSet::default(), None, None),
    };
    let file = path.display().to_string();
    let path_buf = path.to_path_buf();
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let reflected = crate::backends::BuildContext::prepare(&spec.backends, &base)
        .await
        .reflected;
    let metrics = metrics.clone();
    tokio::task::spawn_blocking(move || {
        let mut cx = crate::backends::BuildContext::new(&base);
        cx.metrics = Some(metrics.clone());
        cx.reflected = reflected;
        cx.previous_state = previous_state;
        let mut table =
            RouteTable::build(spec, version, &previous, &metrics, &cx).map_err(|e| {
                let text = std::fs::read_to_string(&path_buf).unwrap_or_default();
                e.placed(&file, &text)
                    .0
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            })?;
        // The trace exporter, and the certificate files it read (a change reloads).
        let otlp = table.spec.telemetry.otlp.clone();
        table.otel = crate::telemetry::otel::Otel::reuse_or_build(
            previous_otel.as_ref(),
            otlp.as_ref(),
            &base,
        )
        .map_err(|e| vec![format!("{file}: {e}")])?;
        if let Some(tls) = otlp.as_ref().and_then(|o| o.tls.as_ref()) {
            let files = [&tls.ca, &tls.cert, &tls.key];
            table
                .files
                .extend(files.into_iter().flatten().map(|p| base.join(p)));
            table.files.sort();
            table.files.dedup();
        }
        let hash = config_hash(&text_hash, &table.files);
        Ok((table, hash))
    })
    .await
    .unwrap_or_else(|_| Err(vec!["the config build failed unexpectedly".into()]))
}

/// Starts the reload task. It runs until `shutdown` is cancelled.
pub fn spawn(
    shared: Arc<Shared>,
    path: PathBuf,
    max_size: u64,
    shutdown: CancellationToken,
) -> Reloader {
    let (tx, mut rx) = mpsc::channel::<ReloadRequest>(16);
    tokio::spawn(async move {
        loop {
            let req = tokio::select! {
                r = rx.recv() => match r { Some(r) => r, None => break },
                _ = shutdown.cancelled() => break,
            };
            let mut reqs = vec![req];
            if reqs[0].trigger == Trigger::Watch {
                // Editors write in several steps; let them finish, then handle one reload.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while let Ok(r) = rx.try_recv() {
                    reqs.push(r);
                }
            }
            let trigger = if reqs.iter().all(|r| r.trigger == Trigger::Watch) {
                Trigger::Watch
            } else {
                reqs.iter()
                    .find(|r| r.trigger != Trigger::Watch)
                    .map_or(Trigger::Watch, |r| r.trigger)
            };
            let outcome = apply(&shared, &path, max_size, trigger).await;
            for r in reqs {
                if let Some(reply) = r.reply {
                    let _ = reply.send(outcome.clone());
                }
            }
        }
    });
    Reloader { tx }
}

async fn apply(shared: &Shared, path: &Path, max_size: u64, trigger: Trigger) -> Outcome {
    let current = shared.table.load_full();
    let version = current.version + 1;
    let now = SystemTime::now();
    let unchanged = (trigger == Trigger::Watch).then(|| Running {
        hash: shared.status().hash,
        files: current.files.clone(),
    });
    let loaded = match load_spec(path, max_size, unchanged).await {
        Ok(None) => {
            // An unchanged file (a touch, a write to a neighbour, a revert to the running
            // content) is not a new version; a revert clears the last rejection.
            let status = shared.status();
            if status.last_error.is_some() {
                shared.update_status(|s| s.last_error = None);
                tracing::info!(
                    version = current.version,
                    "The config file matches the running version again; its last error is cleared."
                );
            }
            return Outcome::Unchanged {
                version: current.version,
            };
        }
        Ok(Some((spec, text_hash))) => {
            build_table(
                spec,
                text_hash,
                path,
                version,
                Some(&current),
                &shared.metrics,
            )
            .await
        }
        Err(e) => Err(e),
    };
    match loaded {
        Ok((table, hash)) => {
            if table.spec.server.listen != current.spec.server.listen
                || table.spec.server.admin != current.spec.server.admin
                || table.spec.server.tls != current.spec.server.tls
            {
                tracing::warn!(
                    "Listener addresses and TLS file paths apply at the next restart; the running listeners are kept."
                );
            }
            let table = Arc::new(table);
            shared.table.store(table.clone());
            table.activate();
            shared.watch_files(&table.files);
            retire(current);
            shared.update_status(|s| {
                s.version = version;
                s.hash = hash;
                s.last_reload = Some(now);
                s.last_attempt = Some(now);
                s.last_error = None;
            });
            shared.metrics.reload(true, version);
            tracing::info!(version, trigger = trigger.as_str(), "Config applied.");
            Outcome::Applied { version }
        }
        Err(errors) => {
            shared.update_status(|s| {
                s.last_attempt = Some(now);
                s.last_error = Some(errors.join("\n"));
            });
            shared.metrics.reload(false, current.version);
            tracing::error!(
                trigger = trigger.as_str(),
                errors = %errors.join("; "),
                "Config reload rejected; the previous config keeps serving."
            );
            Outcome::Rejected { errors }
        }
    }
}

/// Drops a replaced table off the async workers, once the requests that still hold it are
/// done: freeing a table of many routes takes long (about 0.7 s for 150,000), and would stall
/// every request on the worker that did it. Gives up waiting after 30 s (a request that holds it
/// that long drops it itself).
fn retire(table: Arc<RouteTable>) {
    tokio::task::spawn_blocking(move || {
        let mut table = table;
        for _ in 0..3000 {
            match Arc::try_unwrap(table) {
                Ok(t) => return drop(t),
                Err(still) => table = still,
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
}

/// Watches the config file's directory. Editors replace files by rename and Kubernetes swaps a
/// `..data` symlink, so the directory (not the file) is watched and every change in it queues
/// a reload; the content hash filters out changes that are not to the config. When the config
/// is a symlink into another directory, that directory is watched too, so edits of the target
/// are seen.
pub fn watch(path: &Path, reloader: Reloader) -> notify::Result<notify::RecommendedWatcher> {
    let parent = |p: &Path| {
        p.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    };
    let dir = parent(path);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && !matches!(ev.kind, EventKind::Access(_))
        {
            reloader.trigger(Trigger::Watch);
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    if let Ok(target) = std::fs::canonicalize(path) {
        let target_dir = parent(&target);
        if std::fs::canonicalize(&dir).ok().as_ref() != Some(&target_dir) {
            // Best effort: the target may move later (a symlink swap), which the first watch sees.
            let _ = watcher.watch(&target_dir, RecursiveMode::NonRecursive);
        }
    }
    Ok(watcher)
}
