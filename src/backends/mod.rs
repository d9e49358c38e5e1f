//! Backends: the closed set of protocol bridges at the bottom of every route's stack. A backend
//! is built (connections, pools, probes) when config loads and kept across reloads that leave
//! its spec unchanged; each route then gets its own service on top of the shared backend.

pub mod http;

use std::collections::HashMap;
use std::sync::Arc;

use crate::RouteService;
use crate::config::{BackendSpec, RouteSpec, template::PathTemplate};

/// A built backend: its shared connection state and a readiness view.
pub struct BuiltBackend {
    pub name: String,
    pub spec: BackendSpec,
    handle: Handle,
}

enum Handle {
    Http(Arc<http::HttpBackend>),
}

impl BuiltBackend {
    /// Builds the backend. Never fails because a backend is unreachable: connections are made
    /// lazily or in the background, and readiness reports the state.
    pub fn build(name: &str, spec: &BackendSpec) -> Self {
        let handle = match spec {
            BackendSpec::Http(h) => Handle::Http(Arc::new(http::HttpBackend::new(name, h))),
        };
        BuiltBackend {
            name: name.to_string(),
            spec: spec.clone(),
            handle,
        }
    }

    /// Whether the backend can take requests now.
    pub fn ready(&self) -> bool {
        match &self.handle {
            Handle::Http(h) => h.ready(),
        }
    }

    pub fn kind(&self) -> &'static str {
        self.spec.kind()
    }

    /// The service at the bottom of `route`'s stack.
    pub fn route_service(&self, route: &RouteSpec, template: &PathTemplate) -> RouteService {
        match &self.handle {
            Handle::Http(h) => RouteService::new(http::HttpRouteService::new(
                h.clone(),
                route.http.clone().unwrap_or_default(),
                template,
            )),
        }
    }
}

/// Backends by name, reused across reloads when their spec is unchanged.
#[derive(Default)]
pub struct BackendSet {
    pub by_name: HashMap<String, Arc<BuiltBackend>>,
}

impl BackendSet {
    /// The backends for a new config: unchanged specs keep their connections.
    pub fn rebuild(&self, specs: &std::collections::BTreeMap<String, BackendSpec>) -> BackendSet {
        let by_name = specs
            .iter()
            .map(|(name, spec)| {
                let built = match self.by_name.get(name) {
                    Some(old) if old.spec == *spec => old.clone(),
                    _ => Arc::new(BuiltBackend::build(name, spec)),
                };
                (name.clone(), built)
            })
            .collect();
        BackendSet { by_name }
    }
}
