//! MCP object shapes the server describes itself with: tools (name, schema, annotations) and
//! resources.

use serde_json::{Map, Value, json};

/// Behaviour hints for clients (MCP tool annotations). Hints, not guarantees: authorization never
/// depends on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Annotations {
    /// Only reads.
    pub read_only: bool,
    /// May destroy or overwrite (meaningful when not read-only).
    pub destructive: bool,
    /// Repeating the call has no further effect.
    pub idempotent: bool,
    /// Talks to things outside the broker (hosts, APIs).
    pub open_world: bool,
}

/// A tool as `tools/list` shows it.
#[derive(Clone, Copy, Debug)]
pub struct ToolDescriptor<'a> {
    /// Name.
    pub name: &'a str,
    /// Display title.
    pub title: &'a str,
    /// What it does, for the model.
    pub description: &'a str,
    /// JSON Schema of the arguments.
    pub input_schema: &'a Value,
    /// JSON Schema of a successful result's `structuredContent` (2025-06-18 on).
    pub output_schema: Option<&'a Value>,
    /// Hints.
    pub annotations: Annotations,
}

impl ToolDescriptor<'_> {
    /// The `Tool` object.
    pub fn to_json(self) -> Value {
        let mut v = json!({
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "inputSchema": self.input_schema,
            "annotations": {
                "title": self.title,
                "readOnlyHint": self.annotations.read_only,
                "destructiveHint": self.annotations.destructive,
                "idempotentHint": self.annotations.idempotent,
                "openWorldHint": self.annotations.open_world,
            },
        });
        if let Some(o) = self.output_schema {
            v["outputSchema"] = o.clone();
        }
        v
    }
}

/// A resource as `resources/list` shows it.
#[derive(Clone, Copy, Debug)]
pub struct ResourceDescriptor<'a> {
    /// `ephyr://...`.
    pub uri: &'a str,
    /// Short name.
    pub name: &'a str,
    /// Display title.
    pub title: &'a str,
    /// What it holds.
    pub description: &'a str,
    /// Media type.
    pub mime_type: &'a str,
}

impl ResourceDescriptor<'_> {
    /// The `Resource` object.
    pub fn to_json(self) -> Value {
        json!({
            "uri": self.uri,
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "mimeType": self.mime_type,
        })
    }
}

/// A `resources/read` contents entry.
pub fn text_contents(uri: &str, mime_type: &str, text: String) -> Value {
    let mut m = Map::new();
    m.insert("uri".into(), Value::from(uri));
    m.insert("mimeType".into(), Value::from(mime_type));
    m.insert("text".into(), Value::from(text));
    Value::Object(m)
}
