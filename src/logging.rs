//! Log output in Praefect's shapes: `text` for people, `json` for log pipelines with the keys
//! GitLab's tooling reads (`time`, `level`, `msg`, `pid`, plus each event's own fields).

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::Logging;

/// Installs the global logger for the server. Subcommands do not call this, so that their
/// output stays free of log noise.
pub fn init(config: &Logging) {
    let level = match config.level.to_ascii_lowercase().as_str() {
        "warning" => "warn".to_string(),
        "fatal" | "panic" => "error".to_string(),
        other => other.to_string(),
    };
    let filter = EnvFilter::try_from_env("PRAEFECT_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},sqlx=warn,h2=warn,hyper=warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let result = if config.format == "json" {
        builder
            .with_ansi(false)
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(JsonLine)
            .finish()
            .with(RecentErrors)
            .try_init()
    } else {
        builder.finish().with(RecentErrors).try_init()
    };
    // A logger installed earlier (tests) stays in place.
    let _ = result;
}

/// One JSON object per line.
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut object = Map::new();
        object.insert(
            "time".into(),
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        object.insert(
            "level".into(),
            Value::String(event.metadata().level().as_str().to_ascii_lowercase()),
        );
        object.insert("pid".into(), Value::from(std::process::id()));
        object.insert(
            "component".into(),
            Value::String(event.metadata().target().to_string()),
        );
        // Fields of the enclosing spans (correlation ids, methods, the routed repository)
        // come first, as keys of their own, so an event's own fields win on a name clash.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(fields) = span
                    .extensions()
                    .get::<tracing_subscriber::fmt::FormattedFields<N>>()
                {
                    match serde_json::from_str::<Map<String, Value>>(fields) {
                        Ok(fields) => object.extend(fields),
                        Err(_) if !fields.is_empty() => {
                            object
                                .insert(span.name().to_string(), Value::String(fields.to_string()));
                        }
                        Err(_) => {}
                    }
                }
            }
        }
        let mut visitor = JsonVisitor(&mut object);
        event.record(&mut visitor);
        let line = serde_json::to_string(&object).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl JsonVisitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        let name = if field.name() == "message" {
            "msg"
        } else {
            field.name()
        };
        self.0.insert(name.to_string(), value);
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }
}

/// How many warnings and errors the status page lists.
pub const RECENT_ERRORS: usize = 20;

/// One warning or error the router logged.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LoggedError {
    /// RFC 3339, UTC.
    pub time: String,
    pub level: String,
    /// The message and the event's fields, `key=value`.
    pub message: String,
}

static RECENT: std::sync::Mutex<std::collections::VecDeque<LoggedError>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());

/// The latest warnings and errors, newest first: the status page shows them so that an
/// operator sees what went wrong without access to the log pipeline.
pub fn recent_errors() -> Vec<LoggedError> {
    RECENT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .rev()
        .cloned()
        .collect()
}

/// Keeps the last [`RECENT_ERRORS`] warnings and errors in memory.
struct RecentErrors;

impl<S: Subscriber> tracing_subscriber::Layer<S> for RecentErrors {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level != tracing::Level::WARN && level != tracing::Level::ERROR {
            return;
        }
        let mut fields = TextFields::default();
        event.record(&mut fields);
        let entry = LoggedError {
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            level: level.as_str().to_ascii_lowercase(),
            message: fields.text(),
        };
        let mut recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_ERRORS {
            recent.pop_front();
        }
        recent.push_back(entry);
    }
}

/// An event's message and fields as one line of text.
#[derive(Default)]
struct TextFields {
    message: String,
    fields: Vec<String>,
}

impl TextFields {
    fn text(self) -> String {
        let mut text = self.message;
        for field in self.fields {
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(&field);
        }
        text
    }
}

impl Visit for TextFields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields.push(format!("{}={value:?}", field.name()));
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.fields.push(format!("{}={value}", field.name()));
        }
    }
}
