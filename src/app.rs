//! The application: owns the lifetimes of the listeners, the admin API, the reloader, the file
//! watcher and the drain on shutdown. Start-up is the first reload and fails only on bad config.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::router::RouteTable;
use crate::router::reload::{self, Reloader, Trigger};
use crate::telemetry::metrics::Metrics;
use crate::{admin, server};

/// What the admin API reports about the loaded config.
#[derive(Debug, Clone, Default)]
pub struct ConfigStatus {
    pub version: u64,
    pub path: PathBuf,
    pub hash: String,
    pub last_reload: Option<SystemTime>,
    pub last_attempt: Option<SystemTime>,
    pub last_error: Option<String>,
}

/// State shared by the front end, the admin API and the reloader.
pub struct Shared {
    /// The route table; only the reloader stores into it.
    pub table: ArcSwap<RouteTable>,
    pub metrics: Arc<Metrics>,
    status: Mutex<ConfigStatus>,
    reloader: OnceLock<Reloader>,
    /// Shutdown signal and drain tracker for WebSocket sessions, which outlive their request.
    pub sessions: crate::backends::websocket::Sessions,
    /// The file watcher (when watching), and the directories it watches besides the config's.
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
    watched: Mutex<std::collections::HashSet<PathBuf>>,
    /// The last minutes of traffic, sampled every second, for the dashboard.
    pub history: admin::ui::History,
    /// Set when the gateway starts draining (`server.drain_delay`): `/readyz` answers 503 and
    /// HTTP/1.1 answers close their connection.
    pub draining: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub fn status(&self) -> ConfigStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
    pub fn update_status(&self, f: impl FnOnce(&mut ConfigStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }
    /// Watches the directories of the files a build read (protos, descriptor sets), so that a
    /// change to one reloads; directories already watched are left as they are.
    pub fn watch_files(&self, files: &[PathBuf]) {
        let mut watcher = self.watcher.lock().unwrap_or_else(|e| e.into_inner());
        let Some(watcher) = watcher.as_mut() else {
            return;
        };
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        for dir in files.iter().filter_map(|f| f.parent()) {
            if watched.contains(dir) {
                continue;
            }
            use notify::Watcher;
            match watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(dir.to_path_buf());
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "Cannot watch a directory the config reads from; edits there need a reload.");
                }
            }
        }
    }

    pub fn reloader(&self) -> &Reloader {
        self.reloader
            .get()
            .expect("the reloader starts with the app")
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    /// Watch the config's directory and reload on change.
    pub watch: bool,
    /// Reload on SIGHUP (process-wide; the binary enables it, in-process tests do not).
    pub sighup: bool,
    /// The largest config file read (`config::DEFAULT_MAX_FILE_SIZE` unless raised).
    pub max_config_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration:\n{}", .0.join("\n"))]
    Config(Vec<String>),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] server::tls::TlsError),
    #[error("cannot watch the config directory: {0}")]
    Watch(#[from] notify::Error),
}

/// A running gateway.
pub struct Running {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    grace: Duration,
    /// The per-core workers, when serving per core; dropped last, ending their runtimes.
    _workers: Option<server::percore::Workers>,
}

/// The public listener(s), bound before anything else starts.
enum Front {
    Shared(TcpListener),
    PerCore(Vec<std::net::TcpListener>),
}

impl Front {
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Front::Shared(l) => l.local_addr(),
            Front::PerCore(ls) => ls
                .first()
                .ok_or_else(|| std::io::Error::other("no listener"))?
                .local_addr(),
        }
    }
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Loads the config and starts serving. Backends are not waited for.
pub async fn start(opts: Options) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::new());
    let (spec, hash) = reload::load_spec(&opts.config, opts.max_config_size, None)
        .await
        .map_err(StartError::Config)?
        .ok_or_else(|| StartError::Config(vec!["the config could not be read".into()]))?;
    // The listeners are bound before anything connects to a broker or opens the state store:
    // a second instance started by mistake fails here, without disturbing the running one
    // (an MQTT broker would drop the running instance's connection for a second client with
    // its client id).
    let server = spec.server.clone();
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let front = match server.runtime {
        crate::config::RuntimeMode::Shared => Front::Shared(bind(server.listen).await?),
        crate::config::RuntimeMode::PerCore => {
            // Each worker serves its share of `max_connections` (connections the kernel hands
            // a worker wait for that worker): never more workers than connections.
            let workers = server
                .workers
                .unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
                })
                .min(server.limits.max_connections.max(1));
            Front::PerCore(
                server::percore::bind(server.listen, workers).map_err(|source| {
                    StartError::Bind {
                        addr: server.listen,
                        source,
                    }
                })?,
            )
        }
    };
    let admin_listener = bind(server.admin).await?;
    let listen = front.local_addr().map_err(|source| StartError::Bind {
        addr: server.listen,
        source,
    })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: server.admin,
            source,
        })?;
    let (table, hash) = reload::build_table(spec, hash, &opts.config, 1, None, &metrics)
        .await
        .map_err(StartError::Config)?;
    let shutdown = CancellationToken::new();
    let base = opts
        .config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let tls = match &server.tls {
        Some(t) => Some(server::tls::acceptor(
            resolve(&base, &t.cert),
            resolve(&base, &t.key),
            t.client_auth.as_ref().map(|c| {
                (
                    resolve(&base, &c.ca),
                    c.mode == crate::config::ClientAuthMode::Required,
                )
            }),
            shutdown.clone(),
        )?),
        None => None,
    };
    metrics.reload(true, 1);
    let now = SystemTime::now();
    let tracker = TaskTracker::new();
    let shared = Arc::new(Shared {
        table: ArcSwap::from_pointee(table),
        metrics,
        status: Mutex::new(ConfigStatus {
            version: 1,
            path: opts.config.clone(),
            hash,
            last_reload: Some(now),
            last_attempt: Some(now),
            last_error: None,
        }),
        reloader: OnceLock::new(),
        sessions: crate::backends::websocket::Sessions {
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
        },
        watcher: Mutex::new(None),
        watched: Mutex::new(Default::default()),
        history: Default::default(),
        draining: Default::default(),
    });
    shared.table.load().activate();
    let reloader = reload::spawn(
        shared.clone(),
        opts.config.clone(),
        opts.max_config_size,
        shutdown.clone(),
    );
    let _ = shared.reloader.set(reloader.clone());
    if opts.watch {
        let watcher = reload::watch(&opts.config, reloader.clone())?;
        *shared.watcher.lock().unwrap_or_else(|e| e.into_inner()) = Some(watcher);
        shared.watch_files(&shared.table.load().files);
    }
    if opts.sighup {
        let token = shutdown.clone();
        let reloader = reloader.clone();
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            loop {
                tokio::select! {
                    _ = hup.recv() => reloader.trigger(Trigger::Signal),
                    _ = token.cancelled() => break,
                }
            }
        });
    }
    let max_connections = server.limits.max_connections;
    let workers = match front {
        Front::Shared(listener) => {
            tokio::spawn(server::serve(
                listener,
                shared.clone(),
                tls,
                shutdown.clone(),
                tracker.clone(),
                Arc::new(tokio::sync::Semaphore::new(max_connections)),
            ));
            None
        }
        Front::PerCore(listeners) => Some(
            server::percore::start(
                listeners,
                shared.clone(),
                tls,
                shutdown.clone(),
                &tracker,
                max_connections,
            )
            .map_err(|source| StartError::Bind {
                addr: listen,
                source,
            })?,
        ),
    };
    tokio::spawn(admin::serve(
        admin_listener,
        shared.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(admin::ui::sample(shared.clone(), shutdown.clone()));
    tracing::info!(%listen, admin = %admin_addr, version = 1, "Switchyard listening.");
    Ok(Running {
        listen,
        admin: admin_addr,
        shared,
        shutdown,
        tracker,
        grace: server.shutdown_grace.0,
        _workers: workers,
    })
}

impl Running {
    /// The start of a shutdown: for `server.drain_delay`, the gateway goes on serving while
    /// `/readyz` says it is draining and HTTP/1.1 answers close their connections, so that a
    /// load balancer stops sending before the port closes. A second signal (`stop`) ends the
    /// wait early.
    pub async fn drain(&self, stop: impl std::future::Future<Output = ()>) {
        let delay = self.shared.table.load().spec.server.drain_delay.0;
        self.shared
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if delay.is_zero() {
            return;
        }
        tracing::info!(
            ?delay,
            "Draining: not ready, still serving until the delay is over."
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop => {}
        }
    }

    /// Stops accepting, lets in-flight requests finish within the grace period, and returns
    /// whether every connection drained in time.
    pub async fn shutdown(self) -> bool {
        self.shutdown.cancel();
        self.tracker.close();
        let drained = tokio::time::timeout(self.grace, self.tracker.wait())
            .await
            .is_ok();
        if drained {
            tracing::info!("All connections drained.");
        } else {
            tracing::warn!(grace = ?self.grace, "Grace period over; closing the remaining connections.");
        }
        drained
    }

    /// The version of the config being served.
    pub fn version(&self) -> u64 {
        self.shared.table.load().version
    }
}
