//! Routing: path normalisation, the immutable [`RouteTable`] held in an `ArcSwap`, and the
//! [`reload::Reloader`], the only writer of that table. Sits between the front end and each
//! route's stack.

pub mod build_error;
pub mod normalize;
pub mod reload;
pub mod table;

pub use build_error::{BuildError, BuildErrors};
pub use table::{Lookup, RouteTable};
