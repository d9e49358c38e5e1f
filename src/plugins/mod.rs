//! Plugins: the open set of per-route request/response processing, wrapped around a route's
//! middleware and backend when the route is built (see `middleware::stack`).
//!
//! A plugin validates its settings without I/O and then wraps the route's inner service. The
//! registry is an explicit list: adding a plugin means adding it to [`REGISTRY`].

pub mod api_key;
pub mod headers;

use crate::RouteService;

pub trait Plugin: Send + Sync + 'static {
    /// The key that names the plugin in a route's `plugins:` list.
    fn name(&self) -> &'static str;
    /// Checks the plugin's settings. Pure.
    fn validate(&self, config: &serde_json::Value) -> Result<(), String>;
    /// Wraps `inner` with this plugin. Called once per route when config loads.
    fn wrap(&self, config: &serde_json::Value, inner: RouteService)
    -> Result<RouteService, String>;
}

/// Every plugin Switchyard knows.
pub static REGISTRY: &[&dyn Plugin] = &[&api_key::ApiKeyPlugin, &headers::HeadersPlugin];

pub fn find(name: &str) -> Option<&'static dyn Plugin> {
    REGISTRY.iter().copied().find(|p| p.name() == name)
}

pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|p| p.name()).collect()
}
