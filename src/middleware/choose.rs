//! The backend choice of a route with `alternatives`, below its overall timeout: the request
//! goes on to the tries, breaker, limits and bridge of the backend a script chose
//! (`req.backend`), or of the route's `backend` when none did.

use std::sync::Arc;

use crate::{DirectCall, Request, ResponseFuture, RouteService};

/// The backend a script chose for a request, in its extensions.
#[derive(Clone, Debug)]
pub struct Chosen(pub Arc<str>);

/// The stacks below the choice: the route's backend first, then its alternatives.
pub struct Choose {
    main: RouteService,
    alternatives: Vec<(Arc<str>, RouteService)>,
}

impl Choose {
    pub fn new(main: RouteService, alternatives: Vec<(Arc<str>, RouteService)>) -> Self {
        Choose { main, alternatives }
    }
}

impl DirectCall for Choose {
    fn call(&self, req: Request) -> ResponseFuture {
        // The script checked the name against the route's backends when it set it.
        let chosen = req.extensions().get::<Chosen>().and_then(|c| {
            self.alternatives
                .iter()
                .find(|(name, _)| *name == c.0)
                .map(|(_, svc)| svc)
        });
        chosen.unwrap_or(&self.main).call_shared(req)
    }
}
