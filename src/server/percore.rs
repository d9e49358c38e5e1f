//! The per-core front end (`server.runtime: per_core`): one OS thread per worker, each running a
//! single-threaded Tokio runtime that accepts on its own `SO_REUSEPORT` socket (the kernel
//! spreads connections over them) and serves its connections through [`super::serve`] itself,
//! so a request's front-end work never leaves its thread. Backends, brokers, the reloader and
//! the admin API stay on the shared runtime.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::Shared;

/// The number of per-core workers of this process (0 when serving on the shared runtime); set
/// once, when the listeners are bound, before any backend is built.
static WORKERS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The worker this thread is, on a per-core worker's thread.
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The per-core worker this thread is, and how many there are (0 on the shared runtime): for
/// values kept in one slot per worker, such as the request metrics' shards.
pub fn worker() -> (Option<usize>, usize) {
    (WORKER.with(Cell::get), WORKERS.load(Ordering::Relaxed))
}

/// One value per per-core worker, made when that worker first asks, and one for every other
/// thread: what must not be shared between workers so that a request never wakes another
/// thread (an upstream connection pool, whose connections are driven by the runtime that
/// opened them).
pub struct PerWorker<T> {
    shared: T,
    own: Box<[OnceLock<T>]>,
    make: Box<dyn Fn() -> T + Send + Sync>,
}

impl<T> PerWorker<T> {
    pub fn new(make: impl Fn() -> T + Send + Sync + 'static) -> Self {
        PerWorker {
            shared: make(),
            own: (0..WORKERS.load(Ordering::Relaxed))
                .map(|_| OnceLock::new())
                .collect(),
            make: Box::new(make),
        }
    }

    /// This thread's value.
    pub fn get(&self) -> &T {
        match WORKER.with(Cell::get).and_then(|i| self.own.get(i)) {
            Some(cell) => cell.get_or_init(|| (self.make)()),
            None => &self.shared,
        }
    }
}

/// Binds `workers` listening sockets to `addr` with `SO_REUSEPORT`. The address is first bound
/// alone, without the option: a port another process holds (a second instance started by
/// mistake, even one serving per core) is refused as with one listener, and port 0 is given
/// its number.
pub fn bind(addr: SocketAddr, workers: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let probe = std::net::TcpListener::bind(addr)?;
    let addr = probe.local_addr()?;
    drop(probe);
    WORKERS.store(workers.max(1), Ordering::Relaxed);
    (0..workers.max(1))
        .map(|_| {
            use socket2::{Domain, Protocol, Socket, Type};
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            Ok(socket.into())
        })
        .collect()
}

/// The running workers: their connections are tracked by the app's `tracker` through one
/// task per worker, which ends when the worker's connections have drained.
pub struct Workers {
    /// Cancelled when the app is done draining: the workers' runtimes end then (WebSocket
    /// sessions and jobs spawned on them ran until that moment).
    finished: CancellationToken,
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.finished.cancel();
    }
}

/// Starts one worker per listener. Called from the shared runtime. Each worker serves its
/// share of `max_connections`: a connection the kernel gave a worker can only be served by it,
/// so one budget shared by all would let a worker hold the last slot while waiting on its own
/// empty socket, and a connection waiting on another's never be served.
pub fn start(
    listeners: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
    max_connections: usize,
) -> std::io::Result<Workers> {
    let finished = CancellationToken::new();
    let n = listeners.len().max(1);
    for (i, listener) in listeners.into_iter().enumerate() {
        let share = max_connections / n + usize::from(i < max_connections % n);
        let slots = Arc::new(Semaphore::new(share.max(1)));
        let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
        let (shared, tls, shutdown, finished) = (
            shared.clone(),
            tls.clone(),
            shutdown.clone(),
            finished.clone(),
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("switchyard-w{i}"))
            .spawn(move || {
                WORKER.with(|w| w.set(Some(i)));
                runtime.block_on(async move {
                    let serving = async {
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(listener) => {
                                let local = TaskTracker::new();
                                super::serve(listener, shared, tls, shutdown, local.clone(), slots)
                                    .await;
                                local.close();
                                local.wait().await;
                            }
                            Err(e) => {
                                tracing::error!(worker = i, error = %e, "A worker cannot accept.")
                            }
                        }
                    };
                    // An app dropped without draining ends its workers too.
                    tokio::select! {
                        _ = serving => {}
                        _ = finished.cancelled() => {}
                    }
                    let _ = drained_tx.send(());
                    finished.cancelled().await;
                });
            })?;
        tracker.spawn(async move {
            let _ = drained_rx.await;
        });
    }
    Ok(Workers { finished })
}
