//! Configuration: the routes.yaml model, its one parse, and pure validation. Everything here
//! runs when config loads (start-up and reload), before anything is built; nothing does I/O
//! except reading the file itself in [`read_file`].

pub mod model;
pub mod source;
pub mod state;
pub mod template;
pub mod types;
pub mod validate;

use std::fmt;
use std::path::Path;

pub use model::*;
pub use source::{Locator, Pos};
pub use validate::validate;

/// One problem found in a config file, with where it is and what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub route: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub fn at(file: &str, line: usize, column: usize, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_string(),
            line,
            column,
            route: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if let Some(r) = &self.route {
            write!(f, "route `{r}`: ")?;
        }
        // Messages quote what was written, which may hold a URL's credentials.
        f.write_str(&crate::telemetry::redact::secrets(&self.message))
    }
}

/// A setting refused while building (a gRPC method the descriptors do not hold, a plugin's
/// settings): the message, and the setting it is about, relative to the route or backend
/// (`grpc.method`, `plugins[0]`), so that the problem is placed at it in routes.yaml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: Option<String>,
    pub message: String,
}

impl FieldError {
    pub fn at(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

impl From<String> for FieldError {
    fn from(message: String) -> Self {
        FieldError {
            field: None,
            message,
        }
    }
}

impl From<&str> for FieldError {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// All problems of one load attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The process environment, as seen by `${VAR}` interpolation.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Parses and validates config text. Pure apart from env lookups.
pub fn load_str(
    file: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ConfigSpec, ConfigErrors> {
    let (spec, loc) = source::parse(file, text, env).map_err(ConfigErrors)?;
    let errors = validate(file, &spec, &loc);
    if errors.is_empty() {
        Ok(spec)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// The largest config file read by default (`--max-config-size` raises it): a file this large
/// already holds tens of thousands of routes, and parsing is bounded by it.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 16 * 1024 * 1024;

/// Reads a config file of at most `max` bytes (the only I/O of this module).
pub fn read_file(path: &Path, max: u64) -> Result<String, ConfigErrors> {
    use std::io::Read;
    let fail = |message: String| {
        ConfigErrors(vec![ConfigError::at(
            &path.display().to_string(),
            1,
            1,
            message,
        )])
    };
    let file = std::fs::File::open(path).map_err(|e| fail(format!("cannot read the file: {e}")))?;
    let mut text = String::new();
    file.take(max.saturating_add(1))
        .read_to_string(&mut text)
        .map_err(|e| fail(format!("cannot read the file: {e}")))?;
    if text.len() as u64 > max {
        return Err(fail(format!(
            "the file is larger than the {max}-byte limit; raise it with `--max-config-size`"
        )));
    }
    Ok(text)
}

/// The JSON Schema of routes.yaml.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(ConfigSpec)).unwrap_or_default()
}
