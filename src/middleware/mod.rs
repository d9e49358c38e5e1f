//! Tower middleware shared by every route, and [`stack`], THE function that orders a route's
//! layers. It runs once per route when config loads; the request path only clones the result.

pub mod context;
pub mod correlation;
pub mod timeout;

use tower::Layer;

use crate::RouteService;
use crate::config::{DefaultsSpec, RouteSpec};
use crate::plugins;

/// Failure to assemble a route's stack (a plugin refusing its settings).
#[derive(Debug, thiserror::Error)]
#[error("route `{route}`: plugin `{plugin}`: {message}")]
pub struct StackError {
    pub route: String,
    pub plugin: String,
    pub message: String,
}

/// Builds one route's service around its backend. Outermost first, the order is:
///
/// 1. **Correlation ID, trace context and the error edge** — applied by the front end
///    (`server::dispatch`) around the router itself, not here, because 400/404/405 answers made
///    before any route is chosen must carry the correlation ID too.
/// 2. **Plugins**, in the order the route lists them: they see the request first and the
///    response last, and a plugin's rejection (auth, for instance) must not count as a backend
///    failure or use up time from the backend's deadline.
/// 3. **Overall timeout**: one deadline for everything the backend side does; it sets the
///    `Deadline` extension so backends can pass the remaining time on.
/// 4. **Backend**: the protocol bridge itself.
pub fn stack(
    route: &RouteSpec,
    defaults: &DefaultsSpec,
    backend: RouteService,
) -> Result<RouteService, StackError> {
    let timeout = route.timeout.unwrap_or(defaults.timeout).0;
    let mut svc = RouteService::new(timeout::TimeoutLayer::new(timeout).layer(backend));
    for p in route.plugins.iter().rev() {
        let plugin = plugins::find(&p.name).ok_or_else(|| StackError {
            route: route.id.clone(),
            plugin: p.name.clone(),
            message: "unknown plugin".into(),
        })?;
        svc = plugin.wrap(&p.config, svc).map_err(|message| StackError {
            route: route.id.clone(),
            plugin: p.name.clone(),
            message,
        })?;
    }
    Ok(svc)
}
